"""train: fit the unconditional or the class-conditional model, resumably, tracked in MLflow.

usage: python -m stages.train VARIANT --data DIR --checkpoints DIR --out DIR --metrics FILE --plot FILE [--init DIR]
Work in progress lives in --checkpoints (stages/pipeline/resume.py): a rerun with the same params, data
and code resumes from it and continues the same MLflow run. The outputs (--out, --plot, --metrics) are written
to temporaries and moved into place only after the model is logged and registered in MLflow: a stage that
fails or is killed before leaves the previous outputs as they were. --init: the folder the init-from
stage wrote, whose model (train_<variant>.init_from) training starts from (stages/pipeline/finetune.py).
"""

import math
import os
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ddpm import Autocast, Diffusion, Trainer, generate, make_unet

from .pipeline.finetune import InitSource
from .pipeline.io import class_names, load_info, load_prepared, save_grid, staged_files, write_json, write_text
from .pipeline.params import ParamsError, load_params, sections, train_config
from .pipeline.registry import record_lineage, registered_name
from .pipeline.resume import TrainState
from .pipeline.run import barrier, check_writable, init_distributed, join_or_relaunch, path_parser, run, seed_everything
from .pipeline.store import mlflow_ui_command, mlflow_ui_url
from .pipeline.tracking import Tracker, stage_run


def main(argv: list[str]) -> None:
    ap = path_parser("--data", "--checkpoints", "--out", "--metrics", "--plot")
    ap.add_argument("variant", choices=("uncond", "cond"))
    ap.add_argument("--init", type=Path, help="the init-from stage's folder for this model")
    a = ap.parse_args(argv)
    p = load_params()
    check_writable(a.checkpoints, a.out, a.metrics, a.plot)
    if p.train.batch_size % (join_or_relaunch(p.train, "stages.train", argv) * p.train.micro_batches):
        raise ParamsError(f"params.yaml: train.batch_size = {p.train.batch_size} is not divisible by the "
                          f"launcher's {os.environ['WORLD_SIZE']} processes x train.micro_batches "
                          f"{p.train.micro_batches}")
    info = load_info(a.data)
    num_classes = len(class_names(info, "conditional training")) if a.variant == "cond" else None
    unet, config = p.model.unet(info["shape"][0], info["shape"][1], num_classes), train_config(p, a.variant)
    key = f"train_{a.variant}.init_from"
    init = InitSource.of(a.init, getattr(p, f"train_{a.variant}").init_from, key)
    weights = init.weights(unet, key)  # a model of another architecture stops here, before any work
    state = TrainState.of(a.checkpoints, unet, p.diffusion, config, p.seed, info["content_hash"], init.model_hash)
    rank, world_size, device = init_distributed(p.device)
    if rank > 0:  # only rank 0 writes files and talks to MLflow
        barrier()
        return train(a, p, unet, config, state, Tracker(None, None, None), device, rank, world_size, weights)
    run_id = state.previous_run_id()
    barrier()
    params = sections(p, "seed", "device", "diffusion", "model", "train", f"train_{a.variant}")
    with stage_run("train", a.variant, params, info["content_hash"], run_id) as tracker:
        state.begin(tracker.run_id)
        record_lineage(tracker, info, a.data, init)
        train(a, p, unet, config, state, tracker, device, rank, world_size, weights)


def train(a, p, unet, config, state: TrainState, tracker, device, rank: int, world_size: int,
          weights: dict | None = None) -> None:
    seed_everything(p.seed)  # the same initial weights on every rank
    images, labels, info = load_prepared(a.data, "train", mmap=True)
    memory_format = torch.channels_last if config.channels_last else torch.preserve_format
    model = make_unet(unet)
    if weights is not None:  # fine-tuning: the source model's weights (a resumed run then loads its own)
        model.load_state_dict(weights)
    model = model.to(device, memory_format=memory_format)
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    trainer = Trainer(model, Diffusion.from_config(p.diffusion), images, labels if unet.num_classes else None,
                      config, device, p.seed, rank, world_size)
    state.restore(trainer, tracker)
    tracker.set_tags({"precision": trainer.precision})  # what train.precision (e.g. auto) means on this device
    save = (lambda tr: state.save(tr, tracker)) if rank == 0 else (lambda tr: None)
    first = trainer.step
    if rank == 0:
        where = f", then {mlflow_ui_url(tracker.experiment_id)}" if tracker.experiment_id else ""
        print(f"train@{a.variant}: {trainer.precision} on {device}; watch it in the MLflow UI "
              f"(`{mlflow_ui_command()}`{where}) and its per-epoch grids in {state.grids}/")

    def on_step(tr, loss, seconds):
        state.record(tr, loss, seconds)
        if tr.step % p.train.checkpoint_every == 0:
            save(tr)
        if tr.step == first + 10 and rank == 0 and (warning := state.long_run_warning(tr, p.profile, a.variant)):
            print(f"train@{a.variant}: {warning}")

    def on_epoch_end(tr, epoch):
        if rank == 0:
            logged = tracker.logged("epoch_loss", epoch + 1)  # a killed run may have logged it before its checkpoint
            if grid_due(tr, epoch, p.train.grids):
                grid = state.grids / f"epoch_{epoch + 1:03d}.png"
                save_grid(epoch_grid(tr, p, unet), grid, nrow=unet.num_classes)
                if not logged:
                    tracker.log_image(grid, "epoch_grid", step=epoch + 1)
            if not logged:
                tracker.log_metrics(state.epoch_summary(tr.step - epoch * tr.steps_per_epoch), step=epoch + 1)
            save(tr)

    start = time.time()
    trainer.fit(on_step, on_epoch_end, progress=rank == 0)
    save(trainer)
    if rank == 0:  # the outputs go in place only once published, the metrics last
        metrics = {**state.summary(config.batch_size), "wall_seconds": round(time.time() - start, 2)}
        with staged_files([a.out, a.plot, a.metrics], f".train-{a.variant}") as tmp:
            state.write_model(tmp[a.out], trainer, unet, p.diffusion,
                              {"variant": a.variant, "class_names": info["class_names"]})
            write_text(tmp[a.plot], state.loss_csv())
            write_json(tmp[a.metrics], metrics)
            state.publish(tmp[a.out], metrics, tracker, registered_name(a.variant))


def grid_due(trainer: Trainer, epoch: int, grids: int) -> bool:
    """Whether epoch `epoch` (from 0) ends with a sample grid: at most `grids` of them, evenly spread, every
    epoch when training has no more epochs than that, and always the last."""
    epochs = math.ceil(trainer.total_steps / trainer.steps_per_epoch)
    return (epoch + 1) % math.ceil(epochs / grids) == 0 or epoch + 1 == epochs


def epoch_grid(trainer: Trainer, p, unet) -> torch.Tensor:
    """train.grid_size images from the EMA weights with DDIM, labels cycling through the classes, the network
    at the training precision (bf16 about halves a grid's time on a CPU that has it natively)."""
    n, k = p.train.grid_size, unet.num_classes
    return generate(Autocast(trainer.ema.module, trainer.precision), trainer.diffusion, n, unet.sample_shape,
                    seed=p.seed, steps=p.train.grid_ddim_steps, labels=torch.arange(n) % k if k else None,
                    batch_size=min(n, p.train.batch_size))  # the images do not depend on it


if __name__ == "__main__":
    run(main)
