"""A training stage killed between logging an epoch and checkpointing it logs that epoch once."""

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers import TINY, make_repo, merge, run
from mlflow.tracking import MlflowClient
from test_mlflow_store import image_series

pytestmark = pytest.mark.slow
ARGS = ["uncond", "--data", "data/prepared", "--checkpoints", "ck", "--out", "model", "--metrics", "metrics.json",
        "--plot", "loss.csv"]

# The train stage, paused at the end of its first epoch after logging it and before checkpointing it
# (its last checkpoint is at step 4 of 6), so that the kill lands there every time.
PAUSED_TRAIN = f"""
import sys, time
from pathlib import Path
from stages import train
from stages.pipeline.resume import TrainState
from stages.pipeline.run import run
save = TrainState.save
def pause_at_first_epoch_end(self, trainer, tracker):
    if trainer.step == trainer.steps_per_epoch:
        Path("paused").touch()
        time.sleep(600)
    save(self, trainer, tracker)
TrainState.save = pause_at_first_epoch_end
sys.argv = ["train", *{ARGS!r}]
run(train.main)
"""


def test_resumed_training_logs_each_epoch_once(tmp_path):
    repo = make_repo(tmp_path / "repo", merge(TINY, {"train": {"epochs": 2, "checkpoint_every": 4}}))
    run([sys.executable, "-m", "stages.prepare", "data/prepared"], repo)
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_TRAIN], cwd=repo, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (repo / "paused").exists():
        assert proc.poll() is None and time.time() < deadline, "training never reached its first epoch's end"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run([sys.executable, "-m", "stages.train", *ARGS], repo)
    assert "resuming from ck/last.pt at step 4" in resumed.stdout

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    (train,) = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id], "tags.stage = 'train'")
    for name in ("epoch_loss", "epoch_seconds"):
        assert sorted(m.step for m in client.get_metric_history(train.info.run_id, name)) == [1, 2], name
    assert sorted(m.step for m in client.get_metric_history(train.info.run_id, "loss")) == list(range(1, 13))
    pngs = [a.path for a in client.list_artifacts(train.info.run_id, "images") if a.path.endswith(".png")]
    assert image_series(client, train.info.run_id) == {("epoch_grid", 1), ("epoch_grid", 2)} and len(pngs) == 2

    # a param that does not make it another run (how each step is split), changed: the finished run is reopened,
    # nothing retrains, and MLflow keeps the value it started with beside the tag of the new one
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(merge(params, {"train": {"micro_batches": 2}})))
    assert "resuming from ck/last.pt at step 12" in run([sys.executable, "-m", "stages.train", *ARGS], repo).stdout
    (again,) = client.search_runs([train.info.experiment_id], "tags.stage = 'train'")
    assert again.info.run_id == train.info.run_id and again.info.status == "FINISHED"
    assert again.data.params["train.micro_batches"] == "1"
    assert again.data.tags["resumed_with.train.micro_batches"] == "2"
    assert len(client.get_metric_history(train.info.run_id, "loss")) == 12


def test_a_step_budget_ends_inside_an_epoch_with_its_grid_and_at_most_train_grids(tmp_path):
    # 15 steps of 6 per epoch: epochs 1 and 2, and 3 steps of epoch 3; 2 grids over 3 epochs: epochs 2 and 3
    repo = make_repo(tmp_path / "repo", merge(TINY, {"train": {"grids": 2}, "train_uncond": {"steps": 15}}))
    run([sys.executable, "-m", "stages.prepare", "data/prepared"], repo)
    run([sys.executable, "-m", "stages.train", *ARGS], repo)
    assert json.loads((repo / "metrics.json").read_text())["steps"] == 15
    assert sorted(p.name for p in (repo / "model" / "grids").iterdir()) == ["epoch_002.png", "epoch_003.png"]
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    (train,) = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id], "tags.stage = 'train'")
    assert sorted(m.step for m in client.get_metric_history(train.info.run_id, "epoch_loss")) == [1, 2, 3]
    assert image_series(client, train.info.run_id) == {("epoch_grid", 2), ("epoch_grid", 3)}
