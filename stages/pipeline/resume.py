"""A training run's resumable state, in a checkpoints folder that DVC keeps between runs (never cached):
run.json (the run's hash and its MLflow run id), last.pt (the trainer's whole state and the loss history)
and grids/ (the per-epoch sample grids). A rerun with the same hash (params, data and code) continues
from last.pt in the same MLflow run; any other run clears the folder and starts afresh."""

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ddpm import Trainer, atomic_save, config_hash, guide_path, posthoc_path, safe_load, save_model

from .deps import ROOT, code_deps
from .io import atomic_dir, save_figure, write_json
from .plots import loss_curve
from .tracking import Tracker

LONG_HOURS = 3  # a run forecast to train longer says so, with the command for a shorter one


def source_hash(stage: str = "stages.train", root: Path = ROOT) -> str:
    """A hash of the code that `stage` runs (its files as dvc.yaml's deps list them, `deps.code_deps`), so that
    a checkpoint that other code wrote is not resumed."""
    h = hashlib.sha256()
    for path in sorted(code_deps(stage, root)):
        h.update(path.encode() + b"\0" + (root / path).read_bytes())
    return h.hexdigest()[:16]


class TrainState:
    """The checkpoints folder of one run, identified by `run_hash`; `history` holds a
    (step, loss, lr, seconds) row per optimizer step, and the rows not yet logged to MLflow are pending."""

    def __init__(self, folder: Path, run_hash: str):
        self.folder, self.run_hash = Path(folder), run_hash
        self.grids = self.folder / "grids"
        self.history: list[tuple[int, float, float, float]] = []
        self.pending: list[tuple[int, float, float, float]] = []

    @classmethod
    def of(cls, folder: Path, unet, diffusion, config, seed: int, data_hash: str,
           init_hash: str | None = None) -> "TrainState":
        """The state of the run that these configs, seed, data, the library's code and, when fine-tuning, the
        weights it starts from (`init_hash`) define."""
        # how a step's batch is split into micro-batches is no more part of the run than train.nproc is
        train = {k: v for k, v in asdict(config).items() if k != "micro_batches"}
        run = {"unet": asdict(unet), "diffusion": asdict(diffusion), "train": train, "seed": seed,
               "data": data_hash, "code": source_hash()}
        return cls(folder, config_hash(run | ({"init": init_hash} if init_hash else {})))

    def previous_run_id(self) -> str | None:
        """The MLflow run id of this exact run if it was started before; otherwise clear the folder."""
        path = self.folder / "run.json"
        state = json.loads(path.read_text()) if path.is_file() else {}
        if state.get("run_hash") != self.run_hash and self.folder.exists():
            print(f"ignoring {self.folder}: it holds a run with other params, data or code; starting afresh")
            shutil.rmtree(self.folder)
            return None
        return state.get("run_id")

    def begin(self, run_id: str | None) -> None:
        """Start or resume the run in MLflow run `run_id`; first remove what a run killed in the middle of a
        write left behind (`atomic_write`'s temporaries: a half-written last.pt or grid)."""
        for stale in [*self.folder.glob(".*.tmp[0-9]*"), *self.grids.glob(".*.tmp[0-9]*")]:
            stale.unlink(missing_ok=True)
        write_json(self.folder / "run.json", {"run_hash": self.run_hash, "run_id": run_id})

    def restore(self, trainer: Trainer, tracker: Tracker) -> None:
        """Restore `trainer` from last.pt when this run made it; the steps after the last one MLflow has
        are pending."""
        self.grids.mkdir(parents=True, exist_ok=True)
        path = self.folder / "last.pt"
        if not path.exists():
            return
        state = safe_load(path, ("run_hash", "history", "step"))
        if state["run_hash"] != self.run_hash:
            print(f"ignoring {path}: it was trained with other params, data or code; starting afresh")
            return
        trainer.load_state_dict(state)
        print(f"resuming from {path} at step {trainer.step}")
        self.history = [(int(s), v, lr, sec) for s, v, lr, sec in state["history"].tolist()][:trainer.step]
        logged = tracker.last_step("loss")
        self.pending = [h for h in self.history if h[0] > logged]

    def record(self, trainer: Trainer, loss: float, seconds: float) -> None:
        self.history.append((trainer.step, loss, trainer.lr_at(trainer.step - 1), seconds))
        self.pending.append(self.history[-1])

    def save(self, trainer: Trainer, tracker: Tracker) -> None:
        """Write last.pt, then log the pending loss and lr points."""
        atomic_save({**trainer.state_dict(), "run_hash": self.run_hash, "history": torch.tensor(self.history)},
                    self.folder / "last.pt")
        tracker.log_history("loss", [(s, v) for s, v, _, _ in self.pending])
        tracker.log_history("lr", [(s, lr) for s, _, lr, _ in self.pending])
        self.pending.clear()

    def long_run_warning(self, trainer: Trainer, profile: str, variant: str, hours: float = LONG_HOURS) -> str | None:
        """A line saying so when the rest of training, at the rate of the last 10 steps, takes over `hours`."""
        rows = self.history[-10:]
        rate = sum(h[3] for h in rows) / max(1, len(rows))
        left = (trainer.total_steps - trainer.step) * rate / 3600
        if left <= hours:
            return None
        fix = ("for a run of about 1.5 h in all: dvc exp run -S profile=laptop" if profile != "laptop" else
               f"fewer steps: dvc exp run -S train_{variant}.steps=N")
        return f"about {left:.1f} h of training left at {rate:.2f} s/step on this machine; {fix}"

    def epoch_summary(self, steps: int) -> dict:
        """Seconds and mean loss of the last `steps` steps."""
        rows = self.history[-steps:]
        return {"epoch_seconds": sum(h[3] for h in rows), "epoch_loss": sum(h[1] for h in rows) / len(rows)}

    def summary(self, batch_size: int) -> dict:
        """The train stage's metrics: the last 100 steps' mean loss, steps, time and images/s."""
        seconds, last = sum(h[3] for h in self.history), self.history[-100:]
        return {"final_loss": sum(h[1] for h in last) / max(1, len(last)), "steps": len(self.history),
                "train_seconds": round(seconds, 2),
                "images_per_second": round(len(self.history) * batch_size / max(seconds, 1e-9), 2)}

    def write_model(self, out: Path, trainer: Trainer, unet, diffusion, meta: dict) -> None:
        """The finished model folder: model.pt (the EMA weights), model-guide.pt (the guide, if any),
        config.json, the per-epoch grids, loss.png, and model-posthoc.pt (the post-hoc EMA snapshots, if any: records of
        ddpm.posthoc_ema.PowerEMA.snapshot, for ddpm.posthoc_ema.reconstruct)."""
        meta = {**meta, "run_hash": self.run_hash}
        with atomic_dir(out) as tmp:
            save_model(tmp / "model.pt", trainer.ema.module, unet, diffusion, {**meta, "steps": trainer.step})
            if trainer.guide is not None:  # the EMA weights at guide_at of training, for autoguidance
                save_model(guide_path(tmp / "model.pt"), trainer.guide, unet, diffusion,
                           {**meta, "steps": trainer.guide_step})
            write_json(tmp / "config.json", {"unet": asdict(unet), "diffusion": asdict(diffusion)})
            if trainer.snapshots:
                atomic_save({"snapshots": trainer.snapshots, "meta": meta}, posthoc_path(tmp / "model.pt"))
            shutil.copytree(self.grids, tmp / "grids")
            save_figure(loss_curve([h[0] for h in self.history], [h[1] for h in self.history]), tmp / "loss.png")

    def loss_csv(self) -> str:
        return "step,loss,lr\n" + "".join(f"{int(s)},{v:.6f},{lr:.6g}\n" for s, v, lr, _ in self.history)

    def publish(self, out: Path, metrics: dict, tracker: Tracker, model_name: str | None) -> None:
        """Log the train stage's metrics and the finished model folder (`write_model`) to the run, and register
        the folder as a version of `model_name` (None: not registered)."""
        tracker.log_metrics(metrics)
        for name in ("model.pt", guide_path("model.pt").name, "config.json"):
            if (out / name).exists():
                tracker.log_artifact(out / name, "model")
        tracker.log_artifact(out / "loss.png")
        tracker.register_model(out, model_name)
