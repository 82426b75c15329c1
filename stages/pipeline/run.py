"""How every stage runs: one-line user errors, SIGTERM as an orderly stop, seeding, the code hash
that resumes check, and the data-parallel process group."""

import argparse
import contextlib
import ctypes
import hashlib
import io
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
from .store import TrackingError
from .workspace import WorkspaceBusyError, hold_workspace


class NotWritableError(OSError):
    """An output folder the stage could not write to (read-only, not a folder, no permission)."""


# Errors a user can act on: reported as one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (ParamsError, CheckpointError, DataError, TrackingError, NotWritableError, FileNotFoundError,
               FloatingPointError, WorkspaceBusyError)


class Stopped(SystemExit):
    """The stage was sent SIGTERM: it unwinds as from Ctrl-C and exits with the shell's code for the signal."""


def run(main) -> None:
    """Run a stage's main(argv); a user error, or a full disk (naming what was being written), is one line on
    stderr and exit code 1. SIGTERM (from `kill` or a job scheduler) unwinds like Ctrl-C: partial outputs are
    removed, the MLflow run ends FAILED, and the stage says so in one line."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        hold_workspace()  # first: a second pipeline in this workspace stops here, before it reads anything
        main(sys.argv[1:])
    except Stopped:
        if "WORLD_SIZE" not in os.environ:  # the stage, not each of its data-parallel processes
            print("error: stopped by SIGTERM", file=sys.stderr)
        raise
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
    # Stopping from here on: a repeated signal (torchrun forwards one, the kernel sends another when torchrun
    # dies) must not interrupt the cleanup, or the exit handlers, with a second traceback.
    signal.signal(signum, signal.SIG_IGN)
    raise Stopped(128 + signum)  # the shell's exit status for a process killed by this signal


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


def relaunch(nproc: int, module: str, argv: list[str], nnodes: int = 1, rdzv_endpoint: str | None = None) -> int:
    """Run `python -m module argv` as `nproc` data-parallel processes (torchrun) and wait; their exit code.
    Torchrun is bound to this process: should this one die, even by SIGKILL, torchrun gets SIGTERM and stops
    its processes, so a killed stage leaves none behind to write on into its outputs. Stopped (SIGTERM,
    Ctrl-C), this process stops torchrun, which stops its processes in order, and waits for it: the MLflow
    run has ended FAILED when the stage exits. Torchrun runs in a session of its own, so that a signal to the
    stage's process group reaches it once, from here, and quietly (stages/pipeline/torchrun.py)."""
    parent = os.getpid()
    torchrun = subprocess.Popen(torchrun_command(nproc, nnodes, rdzv_endpoint, module, argv),
                                start_new_session=True, preexec_fn=lambda: _die_with(parent))
    try:
        return torchrun.wait()
    except BaseException:
        torchrun.terminate()
        try:
            torchrun.wait(60)  # torchrun gives its processes 30 s, then kills them
        except subprocess.TimeoutExpired:
            torchrun.kill()
        raise


def join_or_relaunch(t, module: str, argv: list[str]) -> int:
    """The number of processes this stage runs as. Started by an external launcher (torchrun, or Slurm's
    srun), it joins that job; else with train.nproc x train.nnodes > 1 it runs `module argv` under its own
    torchrun and exits with its exit code."""
    if launched():
        return int(os.environ["WORLD_SIZE"])
    if t.nproc * t.nnodes > 1:
        sys.exit(relaunch(t.nproc, module, argv, t.nnodes, t.rdzv_endpoint))
    return 1


def launched() -> bool:
    """Whether this process is a rank of a job an external launcher started: torchrun's (WORLD_SIZE set) or a
    task of a Slurm job step (srun sets SLURM_STEP_ID; a batch script has none), whose torch.distributed
    environment is then taken from Slurm's (MASTER_ADDR and MASTER_PORT exported by the batch script)."""
    if "WORLD_SIZE" in os.environ:
        return True
    if "SLURM_STEP_ID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return False
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ParamsError(f"a Slurm task of {os.environ['SLURM_NTASKS']} needs {' and '.join(missing)} in its "
                          "environment (export them in the batch script: stages/slurm.sbatch)")
    os.environ.update(WORLD_SIZE=os.environ["SLURM_NTASKS"], RANK=os.environ["SLURM_PROCID"],
                      LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    return True


def torchrun_command(nproc: int, nnodes: int, endpoint: str | None, module: str, argv: list[str]) -> list[str]:
    """One node: torchrun --standalone. Several: torchrun on each node meeting at `endpoint` (c10d), under a
    rendezvous id the same on every node (from the command); inside a Slurm allocation, but not in one of its
    tasks, srun starts that torchrun on each of the job's first `nnodes` nodes, so the pipeline runs once."""
    torchrun = [sys.executable, "-m", "stages.pipeline.torchrun"]
    if nnodes == 1:
        return [*torchrun, "--standalone", f"--nproc-per-node={nproc}", "-m", module, *argv]
    rdzv_id = hashlib.sha256(" ".join([module, *argv]).encode()).hexdigest()[:16]
    command = [*torchrun, f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}", "-m", module, *argv]
    if "SLURM_JOB_ID" in os.environ and "SLURM_STEP_ID" not in os.environ:
        return ["srun", f"--nodes={nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", *command]
    return command


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


def rank0_first(make, rank: int):
    """make() in rank 0, then in the other processes once it is done there, quietly (rank 0 has said what
    there was to say): what rank 0 downloaded, they find cached, instead of downloading it at once."""
    if rank == 0:
        made = make()
        barrier()
        return made
    barrier()
    with contextlib.redirect_stdout(io.StringIO()):
        return make()
