"""Data-parallel training: the train stage under torchrun with 2 CPU processes (gloo)."""

import json
import sys

import pytest
import torch
from helpers import TINY, make_repo, merge, run
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
CONFIG = merge(TINY, {"train": {"epochs": 4, "lr": 3e-3, "warmup_steps": 0}})  # 24 steps, global batch 50
TRAIN = [sys.executable, "-m", "stages.train", "uncond", "--data", "data/prepared", "--checkpoints", "ck",
         "--out", "model", "--metrics", "metrics.json", "--plot", "loss.csv"]


def train_with(tmp_path_factory, nproc: int) -> tuple:
    repo = make_repo(tmp_path_factory.mktemp(f"nproc{nproc}") / "repo",
                     merge(CONFIG, {"train": {"nproc": nproc}}))
    run([sys.executable, "-m", "stages.prepare", "data/prepared"], repo)
    run(TRAIN, repo)
    losses = [float(r.split(",")[1]) for r in (repo / "loss.csv").read_text().splitlines()[1:]]
    return repo, losses


def test_two_processes_train_like_one(tmp_path_factory):
    one, losses1 = train_with(tmp_path_factory, 1)
    two, losses2 = train_with(tmp_path_factory, 2)
    assert len(losses1) == len(losses2) == 24
    assert json.loads((two / "metrics.json").read_text())["steps"] == 24
    # training happened in both, and the curves agree
    first, last = (lambda xs: sum(xs[:4]) / 4), (lambda xs: sum(xs[-6:]) / 6)
    assert last(losses1) < 0.8 * first(losses1) and last(losses2) < 0.8 * first(losses2)
    assert abs(last(losses2) - last(losses1)) < 0.15 * last(losses1)
    # exactly one set of outputs and one MLflow run, written by rank 0
    assert sorted(p.name for p in (two / "model").iterdir()) == ["config.json", "grids", "loss.png", "model-guide.pt",
                                                                 "model.pt"]
    client = MlflowClient(f"sqlite:///{two / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id], "tags.stage = 'train'")
    assert len(runs) == 1 and runs[0].data.params["train.nproc"] == "2"
    assert len(client.get_metric_history(runs[0].info.run_id, "loss")) == 24
    weights = torch.load(two / "model/model.pt", weights_only=True)["weights"]
    assert not any(k.startswith("module.") for k in weights)  # the network, not the DDP wrapper
