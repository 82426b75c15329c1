"""train: fit the unconditional or the class-conditional model, resumably, tracked in MLflow.

usage: python -m stages.train VARIANT --data DIR --checkpoints DIR --out DIR --metrics FILE --plot FILE
Work in progress (checkpoint, loss history, per-epoch grids, the MLflow run id) lives in
--checkpoints, which DVC keeps between runs; a rerun resumes from it if it was made with the same
params, data and code, and continues the same MLflow run.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ddpm import Diffusion, Trainer, UNet, atomic_save, config_hash, generate, guide_path, safe_load, save_model
from ddpm.plots import loss_curve

from .common import (
    atomic_dir,
    barrier,
    class_names,
    init_distributed,
    load_info,
    load_prepared,
    path_parser,
    run,
    save_figure,
    save_grid,
    seed_everything,
    source_hash,
    write_json,
    write_text,
)
from .params import Params, load_params, sections
from .tracking import Tracker, stage_run

# The train key that only one variant reads: the unconditional model's guide snapshot (the conditional
# model is guided by its own label-free prediction) and the conditional model's label drop rate. The
# other variant trains with it at 0, and dvc.yaml lists each train stage's keys to match, so that
# changing one of them retrains only the model that reads it.
OWN_KEY = {"uncond": "guide_at", "cond": "p_uncond"}


def unread_key(variant: str) -> str:
    """The train key that `variant`'s training does not read: the other variant's own key."""
    return OWN_KEY["cond" if variant == "uncond" else "uncond"]


def variant_params(p: Params, variant: str) -> Params:
    """`p` as `variant`'s training reads it: its unread train key at 0, also in the run hash."""
    return dataclasses.replace(p, train=dataclasses.replace(p.train, **{unread_key(variant): 0.0}))


def main(argv: list[str]) -> None:
    ap = path_parser("--data", "--checkpoints", "--out", "--metrics", "--plot")
    ap.add_argument("variant", choices=("uncond", "cond"))
    a = ap.parse_args(argv)
    p = load_params()
    if p.train.nproc > 1 and "WORLD_SIZE" not in os.environ:  # relaunch as train.nproc processes
        sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc_per_node={p.train.nproc}", "-m", "stages.train", *argv]))
    p = variant_params(p, a.variant)
    info = load_info(a.data)
    num_classes = len(class_names(info, "conditional training")) if a.variant == "cond" else None
    unet = p.model.unet(info["shape"][0], info["shape"][1], num_classes)
    run_hash = config_hash({"unet": dataclasses.asdict(unet), "diffusion": dataclasses.asdict(p.diffusion),
                            "train": dataclasses.asdict(p.train), "seed": p.seed, "data": info["content_hash"],
                            "code": source_hash()})
    rank, world_size, device = init_distributed(p.device)
    if rank > 0:  # only rank 0 writes files and talks to MLflow
        barrier()
        return train(a, p, unet, num_classes, run_hash, Tracker(None, None, None), device, rank, world_size)
    previous = read_state(a.checkpoints, run_hash)
    barrier()
    params = sections(p, "seed", "device", "diffusion", "model", "train")
    del params["train"][unread_key(a.variant)]
    with stage_run("train", a.variant, params, info["content_hash"], previous.get("run_id")) as tracker:
        write_json(a.checkpoints / "run.json", {"run_hash": run_hash, "run_id": tracker.run_id})
        train(a, p, unet, num_classes, run_hash, tracker, device, rank, world_size)


def read_state(folder: Path, run_hash: str) -> dict:
    """The saved run.json if it belongs to this exact run; otherwise clear the folder and start afresh."""
    path = folder / "run.json"
    state = json.loads(path.read_text()) if path.is_file() else {}
    if state.get("run_hash") != run_hash and folder.exists():
        print(f"ignoring {folder}: it holds a run with other params, data or code; starting afresh")
        shutil.rmtree(folder)
        return {}
    return state


def train(a, p, unet, num_classes, run_hash, tracker, device, rank, world_size) -> None:
    seed_everything(p.seed)  # the same initial weights on every rank
    images, labels, info = load_prepared(a.data, "train")
    model = UNet(unet).to(device)
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        seed_everything(p.seed + rank)  # each rank its own dropout
    trainer = Trainer(model, Diffusion.from_config(p.diffusion), images, labels if num_classes else None, p.train,
                      device, p.seed, rank, world_size)
    history = resume(trainer, a.checkpoints / "last.pt", run_hash)
    logged = tracker.last_step("loss")  # points after it are in the checkpoint but not yet in MLflow
    pending = [h for h in history if h[0] > logged]
    grids = a.checkpoints / "grids"
    grids.mkdir(parents=True, exist_ok=True)

    def checkpoint():
        if rank > 0:
            return
        atomic_save({**trainer.state_dict(), "run_hash": run_hash, "history": torch.tensor(history)},
                    a.checkpoints / "last.pt")
        tracker.log_history("loss", [(s, v) for s, v, _, _ in pending])
        tracker.log_history("lr", [(s, lr) for s, _, lr, _ in pending])
        pending.clear()

    def on_step(tr, loss, seconds):
        history.append((tr.step, loss, tr.lr_at(tr.step - 1), seconds))
        pending.append(history[-1])
        if tr.step % p.train.checkpoint_every == 0:
            checkpoint()

    def on_epoch_end(tr, epoch):
        if rank > 0:
            return
        n = p.train.grid_size
        y = torch.arange(n) % num_classes if num_classes else None
        grid = generate(tr.ema.module, tr.diffusion, n, tuple(images.shape[1:]), seed=p.seed,
                        steps=p.train.grid_ddim_steps, labels=y, batch_size=n)
        save_grid(grid, grids / f"epoch_{epoch + 1:03d}.png", nrow=num_classes)
        tracker.log_artifact(grids / f"epoch_{epoch + 1:03d}.png", "grids")
        epoch_steps = history[-tr.steps_per_epoch:]
        tracker.log_metrics({"epoch_seconds": sum(h[3] for h in epoch_steps),
                             "epoch_loss": sum(h[1] for h in epoch_steps) / len(epoch_steps)}, step=epoch + 1)
        checkpoint()

    start = time.time()
    trainer.fit(on_step, on_epoch_end, progress=rank == 0)
    checkpoint()
    if rank > 0:
        return
    seconds = sum(h[3] for h in history)
    metrics = {"final_loss": sum(h[1] for h in history[-100:]) / max(1, len(history[-100:])),
               "steps": trainer.step, "train_seconds": round(seconds, 2), "wall_seconds": round(time.time() - start, 2),
               "images_per_second": round(trainer.step * p.train.batch_size / max(seconds, 1e-9), 2)}
    with atomic_dir(a.out) as tmp:
        save_model(tmp / "model.pt", trainer.ema.module, unet, p.diffusion,
                   {"variant": a.variant, "class_names": info["class_names"], "steps": trainer.step,
                    "run_hash": run_hash})
        if trainer.guide is not None:  # the EMA weights at train.guide_at, for autoguidance
            save_model(guide_path(tmp / "model.pt"), trainer.guide, unet, p.diffusion,
                       {"variant": a.variant, "class_names": info["class_names"], "steps": trainer.guide_step,
                        "run_hash": run_hash})
        write_json(tmp / "config.json",
                   {"unet": dataclasses.asdict(unet), "diffusion": dataclasses.asdict(p.diffusion)})
        shutil.copytree(grids, tmp / "grids")
        save_figure(loss_curve([h[0] for h in history], [h[1] for h in history]), tmp / "loss.png")
    write_text(a.plot, "step,loss,lr\n" + "".join(f"{int(s)},{v:.6f},{lr:.6g}\n" for s, v, lr, _ in history))
    write_json(a.metrics, metrics)
    tracker.log_metrics(metrics)
    for name in ("model.pt", guide_path("model.pt").name, "config.json"):
        if (a.out / name).exists():
            tracker.log_artifact(a.out / name, "model")
    tracker.log_artifact(a.out / "loss.png")
    if os.environ.get("DDPM_MODEL_NAME", "ddpm"):
        tracker.register_model("model", f"{os.environ.get('DDPM_MODEL_NAME', 'ddpm')}-{a.variant}")


def resume(trainer: Trainer, path: Path, run_hash: str) -> list:
    """Restore the trainer from `path` when it was made by this exact run; return the loss history."""
    if not path.exists():
        return []
    state = safe_load(path, ("run_hash", "history", "step"))
    if state["run_hash"] != run_hash:
        print(f"ignoring {path}: it was trained with other params, data or code; starting afresh")
        return []
    trainer.load_state_dict(state)
    print(f"resuming from {path} at step {trainer.step}")
    return [(int(s), v, lr, sec) for s, v, lr, sec in state["history"].tolist()][:trainer.step]


if __name__ == "__main__":
    run(main)
