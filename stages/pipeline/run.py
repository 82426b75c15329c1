"""How every stage runs: one-line user errors, SIGTERM as an orderly stop, seeding, the code hash
that resumes check, and the data-parallel process group."""

import argparse
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch

import ddpm
from ddpm import CheckpointError
from ddpm.data import DataError

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


def relaunch(nproc: int, module: str, argv: list[str]) -> None:
    """Run `python -m module argv` as `nproc` data-parallel processes (torchrun) and exit with its status."""
    sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={nproc}", "-m", module, *argv]))


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
