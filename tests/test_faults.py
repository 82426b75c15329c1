"""Faults a user can hit, through the real stage processes: a kill mid-write, a diverging run,
a damaged dataset file. Each leaves no partial output and says what went wrong in one line."""

import gzip
import json
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY, make_repo, merge, run
from mlflow.tracking import MlflowClient

from ddpm import UNet, atomic_save, safe_load
from stages.pipeline.io import save_grid
from stages.pipeline.params import load_params
from stages.pipeline.resume import TrainState

pytestmark = pytest.mark.slow
PREPARE = [sys.executable, "-m", "stages.prepare", "data/prepared"]
TRAIN = [sys.executable, "-m", "stages.train", "uncond", "--data", "data/prepared", "--checkpoints", "ck",
         "--out", "model", "--metrics", "metrics.json", "--plot", "loss.csv"]

# The prepare stage, paused right after it wrote train.pt into its temporary folder, so that the
# kill lands in the middle of writing its output every time.
PAUSED_PREPARE = """
import sys, time
from stages import prepare
from stages.pipeline.run import run
def save_then_pause(obj, path, save=prepare.atomic_save):
    save(obj, path)
    time.sleep(600)
prepare.atomic_save = save_then_pause
sys.argv = ["prepare", "data/prepared"]
run(prepare.main)
"""


def set_param(repo: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def kill_prepare_mid_write(repo: Path, sig: int = signal.SIGKILL) -> int:
    """Start the prepare stage, wait until its temporary folder holds train.pt, send it `sig`; its exit code."""
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_PREPARE], cwd=repo, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((repo / "data").glob(".prepared.tmp*/train.pt")) and proc.poll() is None:
        assert time.time() < deadline, "prepare never started writing"
        time.sleep(0.05)
    proc.send_signal(sig)
    return proc.wait()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_stage_killed_mid_write_leaves_no_output(tmp_path):
    repo = make_repo(tmp_path / "repo", TINY)
    assert kill_prepare_mid_write(repo) == -signal.SIGKILL, "prepare ended before it could be killed"
    assert list((repo / "data").glob(".prepared.tmp*")), "the kill did not land mid-write"
    assert not (repo / "data/prepared").exists()

    run(PREPARE, repo)  # the rerun succeeds and clears what the killed run left
    assert not list((repo / "data").glob(".prepared.tmp*"))
    before = snapshot(repo / "data/prepared")
    assert set(before) == {"train.pt", "test.pt", "info.json"}

    set_param(repo, "data", "limit", 200)  # new params, killed again: the old output stays as it was
    assert kill_prepare_mid_write(repo) == -signal.SIGKILL
    assert snapshot(repo / "data/prepared") == before


def test_terminated_stage_cleans_up_and_its_mlflow_run_fails(tmp_path):
    repo = make_repo(tmp_path / "repo", TINY)
    assert kill_prepare_mid_write(repo, signal.SIGTERM) == 128 + signal.SIGTERM
    assert not list((repo / "data").glob(".prepared.tmp*")) and not (repo / "data/prepared").exists()
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    (prepare_run,) = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id],
                                        "tags.stage = 'prepare'")
    assert prepare_run.info.status == "FAILED"


def test_diverging_training_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    # lr 1 instead of 1e-4: the loss turns NaN within a few steps, after the checkpoint at step 2 or 4
    repo = make_repo(tmp_path / "repo", merge(TINY, {"train": {"lr": 1.0, "checkpoint_every": 2}}))
    run(PREPARE, repo)
    proc = run(TRAIN, repo, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert [line for line in lines if "error" in line] == [lines[-1]], proc.stderr
    error = re.fullmatch(r"error: training loss is (nan|inf) at step (\d+); lower the learning rate.*", lines[-1])
    assert error, lines[-1]
    bad_step = int(error[2])
    assert bad_step > 2, f"diverged at step {bad_step}, before the first checkpoint"
    assert not any((repo / name).exists() for name in ("model", "metrics.json", "loss.csv"))

    state = safe_load(repo / "ck/last.pt", ("model", "ema", "step"))
    assert state["step"] == (bad_step - 1) // 2 * 2  # the last checkpoint before the bad step
    unet = load_params(repo / "params.yaml").model.unet(1, 28, None)  # glyphs are 1 x 28 x 28
    for weights in (state["model"], state["ema"]["module"]):
        UNet(unet).load_state_dict(weights)
        assert all(torch.isfinite(w).all() for w in weights.values())

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    (train_run,) = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id], "tags.stage = 'train'")
    assert train_run.info.status == "FAILED"


def write_idx(path: Path, array: np.ndarray) -> None:
    """uint8 `array` as a gzipped idx file (magic 0x0801 labels, 0x0803 images)."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def damage(data: bytes, how: str) -> bytes:
    if how == "truncated":
        return data[: len(data) // 2]
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 16]) + data[middle + 16:]


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_damaged_idx_file_is_one_line_naming_it(tmp_path, how):
    raw = tmp_path / "mnist"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 10)):
        write_idx(raw / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    bad = raw / "train-images-idx3-ubyte.gz"
    bad.write_bytes(damage(bad.read_bytes(), how))

    repo = make_repo(tmp_path / "repo", {"data": {"name": "mnist", "root": str(raw), "limit": None,
                                                  "test_limit": None}})
    proc = run(PREPARE, repo, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: cannot read idx file {bad}: "), lines[0]
    assert not (repo / "data/prepared").exists()  # data/ holds the profile record, nothing else


# The train stage with its checkpoint writes (TrainState.save -> atomic_save) patched: the second one either
# fails half-way with a full disk (raising OSError, or in torch.save on a disk that fills up, which torch wraps
# in a RuntimeError), or pauses half-way so that a kill lands in the middle of it. The first checkpoint (step 4
# of 12 with TINY) is then the one that must survive.
FAULTY_TRAIN = """
import errno, io, os, sys, time
import torch
from ddpm import checkpoint
from stages import train
from stages.pipeline import resume
from stages.pipeline.run import run
from ddpm.files import atomic_write
mode, saves = sys.argv[1], []
class FillingDisk(io.FileIO):  # 1,000 bytes free
    free = 1000
    def write(self, data):
        if len(data) > FillingDisk.free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        FillingDisk.free -= len(data)
        return super().write(data)
def faulty_save(obj, path, save=resume.atomic_save):
    saves.append(path)
    if len(saves) < 2:
        return save(obj, path)
    if mode == "filling":
        checkpoint.open = lambda file, mode: FillingDisk(file, "w")
        return save(obj, path)
    data = io.BytesIO()
    torch.save(obj, data)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(data.getvalue()[:len(data.getvalue()) // 2])
        f.flush()
        if mode == "full":
            raise OSError(errno.ENOSPC, "No space left on device")
        time.sleep(600)
resume.atomic_save = faulty_save
sys.argv = ["train", *sys.argv[2:]]
run(train.main)
"""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    repo = make_repo(tmp_path_factory.mktemp("prepared") / "repo", TINY)
    run(PREPARE, repo)
    return repo


def copy_of(repo: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(repo, tmp_path / "repo", symlinks=True))


def assert_resumes_from_step_4(repo: Path) -> None:
    """last.pt holds the first checkpoint, whole; a rerun resumes from it and trains to the end."""
    state = safe_load(repo / "ck/last.pt", ("model", "ema", "step"))
    assert state["step"] == 4
    proc = run(TRAIN, repo)
    assert "resuming from ck/last.pt at step 4" in proc.stdout, proc.stdout
    assert [int(r.split(",")[0]) for r in (repo / "loss.csv").read_text().splitlines()[1:]] == list(range(1, 13))


@pytest.mark.parametrize("mode", ["full", "filling"])
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_is_one_line(prepared, tmp_path, mode):
    repo = copy_of(prepared, tmp_path)
    proc = run([sys.executable, "-c", FAULTY_TRAIN, mode, *TRAIN[3:]], repo, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1] == ("error: No space left on device writing ck/last.pt; free some space and rerun (outputs are "
                         "written whole or not at all, and training resumes from its last checkpoint)"), proc.stderr
    assert not list((repo / "ck").glob(".last.tmp*")), "the half-written checkpoint was left behind"
    assert not any((repo / name).exists() for name in ("model", "metrics.json", "loss.csv"))
    assert_resumes_from_step_4(repo)


def test_a_kill_in_the_middle_of_a_checkpoint_write_keeps_the_previous_one(prepared, tmp_path):
    repo = copy_of(prepared, tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", FAULTY_TRAIN, "pause", *TRAIN[3:]], cwd=repo,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ((repo / "ck/last.pt").exists() and list((repo / "ck").glob(".last.tmp*"))) and proc.poll() is None:
        assert time.time() < deadline, "training never started its second checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "training ended before it could be killed"
    assert list((repo / "ck").glob(".last.tmp*")), "the kill did not land mid-write"
    assert_resumes_from_step_4(repo)
    assert not list((repo / "ck").glob(".last.tmp*")), "the half-written checkpoint was left behind"


def test_a_run_starting_removes_the_temporaries_a_killed_run_left(tmp_path):
    state = TrainState(tmp_path / "ck", "hash")
    atomic_save({"step": 4}, state.folder / "last.pt")
    state.grids.mkdir()
    save_grid(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), state.grids / "epoch_001.png")
    kept = {path: path.read_bytes() for path in (state.folder / "last.pt", state.grids / "epoch_001.png")}
    stale = [state.folder / ".last.tmp4242.pt", state.grids / ".epoch_002.tmp4242.png"]
    for path in stale:
        path.write_bytes(b"half a file")
    state.begin("run-id")
    assert not any(path.exists() for path in stale)
    assert all(path.read_bytes() == data for path, data in kept.items())
    assert json.loads((state.folder / "run.json").read_text()) == {"run_hash": "hash", "run_id": "run-id"}


# A full disk under the MLflow store once the prepare stage's run is open: SQLite fails every write with
# "database or disk is full" (injected where SQLAlchemy hands MLflow's statements to SQLite), reads still work.
FULL_STORE = """
import sqlite3, sys
from sqlalchemy import event
from sqlalchemy.engine import Engine
from stages import prepare
from stages.pipeline.run import run
full = []
@event.listens_for(Engine, "before_cursor_execute")
def execute(conn, cursor, statement, *args):
    if full and not statement.lstrip().upper().startswith(("SELECT", "PRAGMA")):
        raise sqlite3.OperationalError("database or disk is full")
def load_data(p, load=prepare.load_data):
    full.append(True)
    return load(p)
prepare.load_data = load_data
sys.argv = ["prepare", "data/prepared"]
run(prepare.main)
"""


def stage_runs(repo: Path, stage: str) -> list:
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("ddpm").experiment_id], f"tags.stage = '{stage}'",
                              order_by=["attributes.start_time ASC"])


def test_a_full_disk_under_the_mlflow_store_is_one_line_and_its_run_does_not_stay_running(tmp_path):
    repo = make_repo(tmp_path / "repo", TINY)
    proc = run([sys.executable, "-c", FULL_STORE], repo, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: No space left on device writing {(repo / 'mlflow.db').resolve()}; free some space and rerun "
        "(outputs are written whole or not at all, and training resumes from its last checkpoint)"], proc.stderr
    assert not list((repo / "data").glob("*prepared*")), "the stage left an output"
    (full,) = stage_runs(repo, "prepare")
    assert full.info.status == "RUNNING"  # the store could not record its end either

    run(PREPARE, repo)  # space freed: the next stage ends the run its dead process left
    assert [r.info.status for r in stage_runs(repo, "prepare")] == ["KILLED", "FINISHED"]


# The train stage stopped while it publishes the model (Tracker.register_model, its longest step): the tracking
# store stops answering there (every query fails), or the stage pauses there so that a kill lands in it.
PUBLISH_FAULT = """
import sqlite3, sys, time
from pathlib import Path
from sqlalchemy import event
from sqlalchemy.engine import Engine
from stages import train
from stages.pipeline.run import run
from stages.pipeline.tracking import Tracker
mode, down = sys.argv[1], []
@event.listens_for(Engine, "before_cursor_execute")
def execute(*args):
    if down:
        raise sqlite3.OperationalError("unable to open database file")
def register_model(self, *args, register=Tracker.register_model):
    if mode == "down":
        down.append(True)
    else:
        Path("publishing").touch()
        time.sleep(600)
    return register(self, *args)
Tracker.register_model = register_model
sys.argv = ["train", *sys.argv[2:]]
run(train.main)
"""
OUTPUTS = ("model", "loss.csv", "metrics.json")


def train_temporaries(repo: Path) -> list[Path]:
    return [p for p in repo.rglob("*") if ".tmp" in p.name and ".dvc" not in p.parts]


def test_train_puts_its_outputs_in_place_only_once_published(prepared, tmp_path):
    repo = copy_of(prepared, tmp_path)
    proc = run([sys.executable, "-c", PUBLISH_FAULT, "down", *TRAIN[3:]], repo, check=False)
    assert [name for name in OUTPUTS if (repo / name).exists()] == [], "outputs of a stage that failed"
    assert train_temporaries(repo) == []
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.fullmatch(r"error: MLflow tracking store \S+ stopped answering .*", lines[-1]), lines[-1]

    proc = subprocess.Popen([sys.executable, "-c", PUBLISH_FAULT, "kill", *TRAIN[3:]], cwd=repo,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (repo / "publishing").exists() and proc.poll() is None:
        assert time.time() < deadline, "training never started publishing"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "training ended before it could be killed"
    assert [name for name in OUTPUTS if (repo / name).exists()] == [], "outputs of a stage that was killed"

    proc = run(TRAIN, repo)  # the rerun resumes at the end, publishes, and puts the outputs in place
    assert "resuming from ck/last.pt at step 12" in proc.stdout, proc.stdout
    assert all((repo / name).exists() for name in OUTPUTS) and (repo / "model/model.pt").is_file()
    assert train_temporaries(repo) == []
    assert [r.info.status for r in stage_runs(repo, "train")] == ["FINISHED"]  # one run, resumed twice
