"""The DVC command that runs a stage: the params.yaml keys its `-S` sets, and a hold on the workspace for
as long as it runs.

DVC lets go of its repository lock while a stage's command runs, so a second `dvc exp run` in the same
workspace could stash the workspace and write its own `-S` values into params.yaml under a running
pipeline, whose later stages would then read them. DVC's experiment commands refuse to touch a workspace
that another live process holds in DVC's experiments lock (.dvc/tmp/exps/rwlock, the path "workspace"):
each stage enters there the DVC process that runs it (the first stage of a pipeline does; the others find
it there), so a second command stops before it writes anything, naming the first. A watcher process
removes the entry when that DVC process ends, however it ends.

usage (the watcher): python -m stages.pipeline.workspace PID ROOT
"""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import psutil

WORKSPACE = "workspace"  # what DVC's experiment commands lock before they stash or change the workspace
HELD = "(running this workspace's pipeline)"
LOCK_DIR = Path(".dvc/tmp/exps")  # DVC's experiments lock, under the repository root


class WorkspaceBusyError(RuntimeError):
    """Another DVC command holds the workspace."""


def dvc_process() -> psutil.Process | None:
    """The DVC process running this stage: the nearest ancestor that DVC did not start as a stage command
    (one without DVC_STAGE in its environment); None outside DVC or where processes cannot be inspected."""
    if "DVC_STAGE" not in os.environ:
        return None
    with contextlib.suppress(psutil.Error):
        for parent in psutil.Process().parents():
            if "DVC_STAGE" not in parent.environ():
                return parent
    return None


def _exp_run_argv(proc: psutil.Process | None) -> list[str]:
    """proc's arguments from `exp run` on, or [] if it is not a `dvc exp run` (a `dvc repro`, a queue worker)."""
    with contextlib.suppress(psutil.Error):
        argv = proc.cmdline() if proc else []
        for i in range(len(argv) - 1):
            if argv[i] in ("exp", "experiments") and argv[i + 1] == "run":
                return argv[i:]
    return []


def set_by_command() -> set[str]:
    """The params.yaml keys ("train.lr") that the `dvc exp run` running this stage sets with -S: read from
    its command line with DVC's own parser. Empty when unknown (a queued experiment runs in a worker)."""
    argv = _exp_run_argv(dvc_process())
    if not argv:
        return set()
    from dvc.cli import parse_args
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import to_hydra_overrides

    try:
        overrides = to_path_overrides(parse_args(argv).set_param or [])
        return {o.key_or_group for o in to_hydra_overrides(overrides.get("params.yaml", []))}
    except (Exception, SystemExit):  # a command line DVC itself accepted; if it cannot be read, none known
        return set()


@contextlib.contextmanager
def _edit(root: Path):
    """DVC's experiments lock of the repository at `root`, read and written back under DVC's own guard."""
    from dvc.config import Config
    from dvc.fs import localfs
    from dvc.rwlock import _edit_rwlock

    hardlink = Config(dvc_dir=str(root / ".dvc"))["core"].get("hardlink_lock", False)
    (root / LOCK_DIR).mkdir(parents=True, exist_ok=True)
    with _edit_rwlock(str(root / LOCK_DIR), localfs, hardlink) as lock:
        yield lock


def _command(proc: psutil.Process) -> str | None:
    """proc's command line from the dvc program on ("dvc exp run -S profile=gpu"); None if it is not the dvc
    command (DVC's Python API in a notebook or another long-lived process)."""
    with contextlib.suppress(psutil.Error):
        argv = proc.cmdline()
        start = next((i for i, a in enumerate(argv) if Path(a).name in ("dvc", "dvc.exe")), None)
        if start is not None:
            return " ".join(["dvc", *argv[start + 1:]])[:200]
    return None


def _holders(lock: dict) -> list[dict]:
    """Every entry for the workspace, readers and writer."""
    writer = lock["write"].get(WORKSPACE)
    return [*lock["read"].get(WORKSPACE, []), *([writer] if writer else [])]


def hold_workspace() -> None:
    """Enter the DVC process running this stage in DVC's experiments lock as holding the workspace; raise
    WorkspaceBusyError if another live process holds it. Nothing to do outside DVC, or in a copy of the
    repository that `dvc exp run --temp` or a queue worker runs in (DVC_ROOT names the user's workspace), nor
    for DVC's Python API, whose process may live on long after the pipeline (the hold would outlive it)."""
    proc, root = dvc_process(), os.environ.get("DVC_ROOT")
    if proc is None or not root or Path(root).resolve() != Path.cwd().resolve() or not (cmd := _command(proc)):
        return
    cmd = f"{cmd} {HELD}"
    with _edit(Path.cwd()) as lock:
        others = [h for h in _holders(lock) if h["pid"] != proc.pid and psutil.pid_exists(h["pid"])]
        if others:
            raise WorkspaceBusyError(f"this workspace is in use by another DVC command (PID {others[0]['pid']}: "
                                     f"{others[0]['cmd']}); wait for it to end")
        readers = lock["read"][WORKSPACE]
        if any(h["pid"] == proc.pid for h in readers):
            return
        readers[:] = [h for h in readers if psutil.pid_exists(h["pid"])]
        readers.append({"pid": proc.pid, "cmd": cmd})
    subprocess.Popen([sys.executable, "-m", __name__, str(proc.pid), str(Path.cwd())], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def release_when_done(pid: int, root: Path) -> None:
    """Wait for process `pid` to end, then remove its hold on the workspace at `root` (if still there)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait()
    if not (root / LOCK_DIR).is_dir():
        return
    with _edit(root) as lock:
        readers = [h for h in lock["read"].get(WORKSPACE, []) if not (h["pid"] == pid and h["cmd"].endswith(HELD))]
        if readers:
            lock["read"][WORKSPACE] = readers
        else:
            lock["read"].pop(WORKSPACE, None)


if __name__ == "__main__":
    release_when_done(int(sys.argv[1]), Path(sys.argv[2]))
