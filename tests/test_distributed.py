"""Data-parallel training: the train stage under torchrun with 2 CPU processes (gloo)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, make_repo, merge, run
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
CONFIG = merge(TINY, {"train": {"epochs": 4, "lr": 3e-3, "warmup_steps": 0}})  # 24 steps, global batch 50
TRAIN = [sys.executable, "-m", "stages.train", "uncond", "--data", "data/prepared", "--checkpoints", "ck",
         "--out", "model", "--metrics", "metrics.json", "--plot", "loss.csv"]


_TRAINED: dict[int, Path] = {}


def trained(tmp_path_factory, nproc: int) -> Path:
    """A repository whose train stage ran with train.nproc = `nproc` on CONFIG, once per test session (this
    file and test_multinode share it: conftest keeps them in one worker)."""
    if nproc not in _TRAINED:
        repo = make_repo(tmp_path_factory.mktemp(f"nproc{nproc}") / "repo", merge(CONFIG, {"train": {"nproc": nproc}}))
        run([sys.executable, "-m", "stages.prepare", "data/prepared"], repo)
        run(TRAIN, repo)
        _TRAINED[nproc] = repo
    return _TRAINED[nproc]


def test_two_processes_train_and_rank_0_alone_writes(tmp_path_factory):
    """Two processes learn, and write one set of outputs and one MLflow run (that they train exactly as one
    process of two micro-batches does: test_multinode)."""
    two = trained(tmp_path_factory, 2)
    losses = [float(r.split(",")[1]) for r in (two / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == json.loads((two / "metrics.json").read_text())["steps"] == 24
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:4]) / 4
    # exactly one set of outputs and one MLflow run, written by rank 0
    assert sorted(p.name for p in (two / "model").iterdir()) == ["config.json", "grids", "loss.png", "model-guide.pt",
                                                                 "model-posthoc.pt", "model.pt"]
    client = MlflowClient(f"sqlite:///{two / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id], "tags.stage = 'train'")
    assert len(runs) == 1 and runs[0].data.params["train.nproc"] == "2"
    assert len(client.get_metric_history(runs[0].info.run_id, "loss")) == 24
    weights = torch.load(two / "model/model.pt", weights_only=True)["weights"]
    assert not any(k.startswith("module.") for k in weights)  # the network, not the DDP wrapper


def processes_in(folder: Path) -> list[int]:
    """The live processes working in `folder` (Linux /proc): a stage and all it starts (torchrun starts its
    processes in sessions of their own, so a session would not find them)."""
    pids = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        with contextlib.suppress(OSError):
            state = (cwd.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if cwd.resolve() == folder.resolve() and state != "Z":
                pids.append(int(cwd.parent.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_a_killed_two_process_run_leaves_no_process_behind_and_resumes(tmp_path):
    repo = make_repo(tmp_path / "repo", merge(TINY, {"train": {"nproc": 2, "epochs": 5}}))  # 30 steps
    run([sys.executable, "-m", "stages.prepare", "data/prepared"], repo)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(TRAIN, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (repo / "ck/last.pt").exists() and proc.poll() is None:
            assert time.time() < deadline, "training never wrote a checkpoint"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "training ended before it could be killed"
        deadline = time.time() + 30  # torchrun stops its processes, and they exit
        while processes_in(repo) and time.time() < deadline:
            time.sleep(0.2)
        assert not processes_in(repo), "processes of the killed stage are still running"
    finally:
        for pid in processes_in(repo):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not (repo / "metrics.json").exists(), "the killed stage's processes trained on to the end"
    step = torch.load(repo / "ck/last.pt", weights_only=True)["step"]
    assert 0 < step < 30
    assert f"resuming from ck/last.pt at step {step}" in run(TRAIN, repo).stdout
    assert json.loads((repo / "metrics.json").read_text())["steps"] == 30


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_a_terminated_two_process_run_stops_in_one_line_and_its_mlflow_run_fails(tmp_path):
    repo = make_repo(tmp_path / "repo", merge(TINY, {"train": {"nproc": 2, "epochs": 5}}))  # 30 steps
    run([sys.executable, "-m", "stages.prepare", "data/prepared"], repo)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONUNBUFFERED": "1"}
    with (tmp_path / "stdout").open("w") as stdout:
        proc = subprocess.Popen(TRAIN, cwd=repo, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        deadline = time.time() + 300
        while "watch it in the MLflow UI" not in (tmp_path / "stdout").read_text() and proc.poll() is None:
            assert time.time() < deadline, "training never started"  # its MLflow run open, its processes up
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)  # as a terminal or a job scheduler stops a job: its process group
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, stderr
        lines = [line for line in stderr.splitlines() if line.strip() and not re.match(r"train: +\d+%\|", line)]
        assert lines == ["error: stopped by SIGTERM"], stderr  # beside the progress bar: no traceback, no warnings
        assert not processes_in(repo), "the stage exited before its processes"
    finally:
        for pid in processes_in(repo):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    (train,) = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id], "tags.stage = 'train'")
    assert train.info.status == "FAILED"
    assert client.get_run(train.data.tags["mlflow.parentRunId"]).info.status == "FAILED"
    assert not (repo / "metrics.json").exists()
