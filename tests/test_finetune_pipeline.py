"""Fine-tuning through DVC, in a copy of the tiny project with a store of its own: train@cond starts from the
model that train_cond.init_from names, reruns when that model changes (a file replaced, a registry alias
moved) and only then, records where it started in MLflow, and resumes mid-fine-tune as if uninterrupted."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from helpers import run, stages_run
from mlflow.tracking import MlflowClient

from stages.pipeline.io import file_hash

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tiny_repo, tmp_path_factory):
    """A copy of the reproduced tiny project, its MLflow store left behind, its conditional model copied to
    base/cond.pt (out of models/: the pipeline's own outputs cannot be a source)."""
    repo = tmp_path_factory.mktemp("finetune") / "repo"
    shutil.copytree(tiny_repo[0], repo, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    (repo / "base").mkdir()
    shutil.copy(repo / "models/cond/model.pt", repo / "base/cond.pt")
    return repo


def set_params(repo, **sections) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def train_run(repo):
    """The newest train-cond run of the repo's store."""
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ddpm")
    return client, client.search_runs([exp.experiment_id], "attributes.run_name = 'train-cond'",
                                      order_by=["attributes.start_time DESC"])[0]


def weights(path) -> dict:
    return torch.load(path, weights_only=True)["weights"]


def test_training_starts_from_the_source_and_reruns_when_it_changes(repo):
    # a learning rate so small that the fine-tuned weights stay the source's: it started from them
    set_params(repo, train={"lr": 1e-10}, train_cond={"steps": 3, "init_from": "base/cond.pt"})
    out = run(["dvc", "repro", "train@cond"], repo).stdout
    assert stages_run(out) == {"check", "init-from", "train@cond"}
    tuned, base = weights(repo / "models/cond/model.pt"), weights(repo / "base/cond.pt")
    assert all(torch.allclose(tuned[k], base[k], atol=1e-6) for k in base)
    client, first = train_run(repo)
    assert first.data.tags["init_from"] == first.data.params["train_cond.init_from"] == "base/cond.pt"
    assert first.data.tags["init_from_model_hash"] == file_hash(repo / "base/cond.pt")

    out = run(["dvc", "repro", "train@cond"], repo).stdout  # the same source: only its copy is checked
    assert stages_run(out) == {"init-from"} and "Stage 'train@cond' didn't change, skipping" in out

    shutil.copy(repo / "models/uncond/model.pt", repo / "base/cond.pt")  # another architecture
    proc = run(["dvc", "repro", "train@cond"], repo, check=False)
    assert proc.returncode != 0
    (line,) = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error: params.yaml")]
    assert line == ("error: params.yaml: train_cond.init_from = 'base/cond.pt' is a model of another architecture "
                    "than the one params.yaml and the data give: num_classes None (here 10)")

    # a registry alias: the run starts from the version it names, and reruns when the alias moves
    client.set_registered_model_alias("ddpm-cond", "champion", "1")  # the version step one registered
    set_params(repo, train_cond={"init_from": "models:/ddpm-cond@champion"})
    assert "train@cond" in stages_run(run(["dvc", "repro", "train@cond"], repo).stdout)
    _, second = train_run(repo)
    v1 = client.get_model_version("ddpm-cond", "1")  # its source is its logged model, models:/<model id>
    assert second.data.tags["init_from_resolved"] == "models:/ddpm-cond/1" and second.data.tags["init_from_run"] == \
        first.info.run_id
    assert ["models:/" + m.model_id for m in client.get_run(second.info.run_id).inputs.model_inputs] == [v1.source]
    assert stages_run(run(["dvc", "repro", "train@cond"], repo).stdout) == {"init-from"}
    client.set_registered_model_alias("ddpm-cond", "champion", "2")
    assert "train@cond" in stages_run(run(["dvc", "repro", "train@cond"], repo).stdout)
    assert train_run(repo)[1].data.tags["init_from_resolved"] == "models:/ddpm-cond/2"


TRAIN = [sys.executable, "-m", "stages.train", "cond", "--data", "data/prepared", "--init", "models/init/cond",
         "--metrics", "metrics.json", "--plot", "loss.csv"]


def test_a_killed_fine_tune_resumes_to_the_same_result(repo):
    """Resuming restores the checkpoint's weights, not the source's again."""
    set_params(repo, train={"lr": 2e-3, "checkpoint_every": 4}, train_cond={"steps": 30, "init_from": "base/cond.pt"})
    shutil.copy(repo / "models/cond/model.pt", repo / "base/cond.pt")
    run(["dvc", "repro", "init-from"], repo)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    killed = [*TRAIN, "--checkpoints", "ck", "--out", "killed"]
    with open(repo / "killed.log", "w") as log:
        proc = subprocess.Popen(killed, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while not (repo / "ck/last.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (repo / "ck/last.pt").exists(), (repo / "killed.log").read_text()[-2000:]
    at_kill = torch.load(repo / "ck/last.pt", weights_only=True)["step"]
    assert 0 < at_kill < 30 and not (repo / "killed").exists()
    assert f"resuming from ck/last.pt at step {at_kill}" in run(killed, repo).stdout
    run([*TRAIN, "--checkpoints", "ck-straight", "--out", "straight"], repo)
    a, b = weights(repo / "killed/model.pt"), weights(repo / "straight/model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = weights(repo / "base/cond.pt")
    assert not all(torch.equal(a[k], base[k]) for k in a)  # it trained
