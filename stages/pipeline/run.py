"""How every stage runs: one-line user errors, SIGTERM as an orderly stop, seeding, the code hash
that resumes check, and the data-parallel process group."""

import argparse
import ctypes
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
from ddpm.files import disk_full

from .io import why_unwritable
from .params import ParamsError
from .tracking import TrackingError


class NotWritableError(OSError):
    """An output folder the stage could not write to (read-only, not a folder, no permission)."""


# Errors a user can act on: reported as one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (ParamsError, CheckpointError, DataError, TrackingError, NotWritableError, FileNotFoundError,
               FloatingPointError)


def run(main) -> None:
    """Run a stage's main(argv); a user error, or a full disk (naming what was being written), is one line on
    stderr and exit code 1. SIGTERM (from `kill` or a job scheduler) unwinds like Ctrl-C: partial outputs are
    removed, the MLflow run ends FAILED."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main(sys.argv[1:])
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:
        if (full := disk_full(e)) is None:
            raise
        where = f" writing {full.filename}" if full.filename else ""
        print(f"error: {full.strerror}{where}; free some space and rerun (outputs are written whole or not at all, "
              "and training resumes from its last checkpoint)", file=sys.stderr)
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


def check_writable(*paths: str | Path) -> None:
    """Before any work, that each output can be written: the folder that will hold it (its nearest existing
    parent, which the stage creates folders in) and, if it is a folder already, the folder itself (replaced
    or written into). Probed with an unnamed temporary file, so permissions, ACLs and read-only mounts all
    count."""
    for path in map(Path, paths):
        if why := why_unwritable(path):
            raise NotWritableError(f"cannot write {path}: {why}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def relaunch(nproc: int, module: str, argv: list[str]) -> int:
    """Run `python -m module argv` as `nproc` data-parallel processes (torchrun) and wait; their exit code.
    Torchrun is bound to this process: should this one die, even by SIGKILL, torchrun gets SIGTERM and stops
    its processes, so a killed stage leaves none behind to write on into its outputs."""
    parent = os.getpid()
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={nproc}", "-m", module, *argv],
                           preexec_fn=lambda: _die_with(parent))


def _die_with(parent: int) -> None:
    """Have the kernel send this process SIGTERM when its parent `parent` exits (Linux; elsewhere nothing)."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun, join the process group: nccl on CUDA, gloo on the CPU."""
    device = ddpm.resolve_device(device_name)
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    import torch.distributed as dist

    _die_with(os.getppid())  # should torchrun be killed, its processes stop too
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
