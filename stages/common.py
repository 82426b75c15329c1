"""What every stage shares: error reporting, seeding, atomic outputs, the prepared data."""

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sys
from pathlib import Path

import torch

import ddpm
from ddpm import CheckpointError, safe_load
from ddpm.data import DataError
from ddpm.pictures import grid_image

from .params import ParamsError
from .tracking import TrackingError

# Errors a user can act on: reported as one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (ParamsError, CheckpointError, DataError, TrackingError, FileNotFoundError, FloatingPointError)


def run(main) -> None:
    """Run a stage's main(argv); a user error is one line on stderr and exit code 1. SIGTERM (from `kill`
    or a job scheduler) unwinds like Ctrl-C: partial outputs are removed, the MLflow run ends FAILED."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main(sys.argv[1:])
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # the shell's exit status for a process killed by this signal


def path_parser(*options: str) -> argparse.ArgumentParser:
    """An argv parser with the given required path options ("--data", "--out", ...); a stage adds its
    positional arguments, if any."""
    ap = argparse.ArgumentParser()
    for name in options:
        ap.add_argument(name, type=Path, required=True)
    return ap


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename,
    on failure it is removed, so a failed stage never leaves a partial output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    """Write a file atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    """Save uint8 images (N, C, H, W) as one PNG grid."""
    nrow = nrow or max(1, int(len(images) ** 0.5))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    grid_image(images, nrow).save(tmp)
    os.replace(tmp, path)


def save_figure(fig, path: str | Path) -> None:
    """Save a matplotlib figure as PNG atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def load_info(folder: str | Path) -> dict:
    """info.json of the prepared data (counts, shape, class names, content hash)."""
    path = Path(folder) / "info.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; run the prepare stage first (dvc repro prepare)")
    return json.loads(path.read_text())


def class_names(info: dict, needed_by: str) -> list[str]:
    """The prepared data's class names; `needed_by` (conditional training, the classifier) needs two or more."""
    names = info["class_names"]
    if len(names) < 2:
        have = f"only class {names[0]!r}" if names else "no classes (an image folder without class subfolders)"
        raise DataError(f"{needed_by} needs at least 2 classes but the prepared data has {have}; "
                        "use class subfolders or data.classes, or run only the unconditional stages "
                        "(dvc repro sample-ddpm@uncond sample-ddim@uncond sample-dpmsolver@uncond)")
    return names


def load_prepared(folder: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(images uint8 (N, C, H, W), labels int64 (N,), info) of a split written by the prepare stage."""
    info = load_info(folder)
    data = safe_load(Path(folder) / f"{split}.pt", ("images", "labels"))
    return data["images"], data["labels"], info


def source_hash(modules=("diffusion", "ema", "schedules", "training", "unet")) -> str:
    """A hash of the library code that training depends on, so checkpoints from other code are not reused."""
    h = hashlib.sha256()
    for name in modules:
        h.update((Path(ddpm.__file__).parent / f"{name}.py").read_bytes())
    return h.hexdigest()[:16]


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun, join the process group: nccl on CUDA, gloo on the CPU."""
    device = ddpm.resolve_device(device_name)
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def barrier() -> None:
    """Wait for every process of the group (nothing to wait for without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
