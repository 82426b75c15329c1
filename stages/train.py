"""train: fit the unconditional or the class-conditional model, resumably.

usage: python -m stages.train VARIANT --data DIR --checkpoints DIR --out DIR --metrics FILE --plot FILE
Work in progress (checkpoint, loss history, per-epoch grids) lives in --checkpoints, which DVC
keeps between runs; a rerun resumes from it if it was made with the same params and code.
"""

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import torch

from ddpm import (
    Diffusion,
    Trainer,
    UNet,
    atomic_save,
    config_hash,
    generate,
    resolve_device,
    safe_load,
    save_model,
)

from .common import (
    atomic_dir,
    load_prepared,
    run,
    save_grid,
    seed_everything,
    source_hash,
    write_json,
    write_text,
)
from .params import load_params

VARIANTS = ("uncond", "cond")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", choices=VARIANTS)
    for name in ("--data", "--checkpoints", "--out", "--metrics", "--plot"):
        ap.add_argument(name, type=Path, required=True)
    a = ap.parse_args(argv)
    p = load_params()
    seed_everything(p.seed)
    device = resolve_device(p.device)
    images, labels, info = load_prepared(a.data, "train")
    num_classes = len(info["class_names"]) if a.variant == "cond" else None
    unet = p.model.unet(images.shape[1], images.shape[2], num_classes)
    model = UNet(unet).to(device)
    diffusion = Diffusion(p.diffusion.betas())
    trainer = Trainer(model, diffusion, images, labels if num_classes else None, p.train, device, p.seed)
    run_hash = config_hash({"unet": dataclasses.asdict(unet), "diffusion": dataclasses.asdict(p.diffusion),
                            "train": dataclasses.asdict(p.train), "seed": p.seed, "data": info["content_hash"],
                            "code": source_hash()})
    history = resume(trainer, a.checkpoints, run_hash)
    grids = a.checkpoints / "grids"
    grids.mkdir(parents=True, exist_ok=True)

    def checkpoint():
        atomic_save({**trainer.state_dict(), "run_hash": run_hash, "history": torch.tensor(history)},
                    a.checkpoints / "last.pt")

    def on_step(tr, loss, seconds):
        history.append((tr.step, loss, tr.lr_at(tr.step - 1), seconds))
        if tr.step % p.train.checkpoint_every == 0:
            checkpoint()

    def on_epoch_end(tr, epoch):
        n = p.train.grid_size
        y = torch.arange(n) % num_classes if num_classes else None
        grid = generate(tr.ema.module, tr.diffusion, n, tuple(images.shape[1:]), seed=p.seed,
                        steps=p.train.grid_ddim_steps, labels=y, batch_size=n)
        save_grid(grid, grids / f"epoch_{epoch + 1:03d}.png", nrow=num_classes)
        checkpoint()

    start = time.time()
    trainer.fit(on_step, on_epoch_end)
    seconds = sum(h[3] for h in history)
    with atomic_dir(a.out) as tmp:
        save_model(tmp / "model.pt", trainer.ema.module, unet, p.diffusion,
                   {"variant": a.variant, "class_names": info["class_names"], "steps": trainer.step,
                    "run_hash": run_hash})
        shutil.copytree(grids, tmp / "grids")
    write_text(a.plot, "step,loss,lr\n" + "".join(f"{int(s)},{v:.6f},{lr:.6g}\n" for s, v, lr, _ in history))
    write_json(a.metrics, {"final_loss": sum(h[1] for h in history[-100:]) / max(1, len(history[-100:])),
                           "steps": trainer.step, "train_seconds": round(seconds, 2),
                           "wall_seconds": round(time.time() - start, 2),
                           "images_per_second": round(trainer.step * p.train.batch_size / max(seconds, 1e-9), 2)})


def resume(trainer: Trainer, folder: Path, run_hash: str) -> list:
    """Restore the trainer from folder/last.pt when it was made by this exact run; return the loss history."""
    path = folder / "last.pt"
    if not path.exists():
        return []
    state = safe_load(path, ("run_hash", "history", "step"))
    if state["run_hash"] != run_hash:
        print(f"ignoring {path}: it was trained with other params, data or code; starting afresh")
        shutil.rmtree(folder)
        return []
    trainer.load_state_dict(state)
    print(f"resuming from {path} at step {trainer.step}")
    return [tuple(r) for r in state["history"].tolist()][:trainer.step]


if __name__ == "__main__":
    run(main)
