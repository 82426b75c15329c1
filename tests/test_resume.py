"""A training stage killed with SIGKILL resumes from its last checkpoint and ends as if uninterrupted."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import TINY, make_repo, merge, run
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
CONFIG = merge(TINY, {"train": {"epochs": 10, "checkpoint_every": 4}})  # 60 steps of 50 images
TRAIN = [sys.executable, "-m", "stages.train", "uncond", "--data", "data/prepared", "--checkpoints", "ck",
         "--out", "model", "--metrics", "metrics.json", "--plot", "loss.csv"]


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """Two copies of the tiny project with prepared data: one to kill, one to run straight through."""
    out = []
    for name in ("killed", "straight"):
        repo = make_repo(tmp_path_factory.mktemp(name) / "repo", CONFIG)
        run([sys.executable, "-m", "stages.prepare", "data/prepared"], repo)
        out.append(repo)
    return out


def test_killed_training_resumes_to_the_same_result(repos):
    killed, straight = repos
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    proc = subprocess.Popen(TRAIN, cwd=killed, env={**env, "DVC_EXP_NAME": "first"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "ck/last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "training finished before it could be killed"
    steps_at_kill = torch.load(killed / "ck/last.pt", weights_only=True)["step"]
    assert 0 < steps_at_kill < 60

    resumed = run(TRAIN, killed, env={"DVC_EXP_NAME": "second"})  # another pipeline run resumes it
    assert f"resuming from ck/last.pt at step {steps_at_kill}" in resumed.stdout
    run(TRAIN, straight)

    # same step count, and a loss history without gaps or duplicates, in the CSV and in MLflow
    for repo in (killed, straight):
        rows = (repo / "loss.csv").read_text().splitlines()[1:]
        assert [int(r.split(",")[0]) for r in rows] == list(range(1, 61))
    client = MlflowClient(f"sqlite:///{killed / 'mlflow.db'}")
    (train_run,) = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id], "tags.stage = 'train'")
    assert train_run.info.status == "FINISHED"
    parent = client.get_run(train_run.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == "second" and train_run.data.tags["DVC_EXP_NAME"] == "second"
    assert sorted(m.step for m in client.get_metric_history(train_run.info.run_id, "loss")) == list(range(1, 61))

    # the resumed run is the uninterrupted run: same losses, same EMA weights
    assert (killed / "loss.csv").read_text() == (straight / "loss.csv").read_text()
    a = torch.load(killed / "model/model.pt", weights_only=True)["weights"]
    b = torch.load(straight / "model/model.pt", weights_only=True)["weights"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_other_params_is_not_reused(repos):
    killed, _ = repos
    assert (killed / "ck/last.pt").exists()
    params = (killed / "params.yaml").read_text().replace("lr: 0.002", "lr: 0.0005")
    (killed / "params.yaml").write_text(params)
    out = run(TRAIN, killed).stdout
    assert "ignoring ck: it holds a run with other params, data or code; starting afresh" in out
    assert "resuming" not in out
