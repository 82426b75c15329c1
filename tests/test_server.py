"""A full tiny pipeline run on real Fashion-MNIST, logged to an `mlflow server` on the loopback."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ALL_STAGES, TINY, make_repo, merge, run, stages_run, start_server, stop
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def mlflow_server(tmp_path):
    proc, uri = start_server(tmp_path)
    try:
        yield uri, tmp_path / "server-artifacts"
    finally:
        stop(proc)


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_pipeline_logs_to_a_tracking_server(tmp_path, mlflow_server):
    uri, artifacts = mlflow_server
    repo = make_repo(tmp_path / "fashion", merge(TINY, {"data": {"name": "fashion_mnist"}}))
    proc = run(["dvc", "repro"], repo, env={"MLFLOW_TRACKING_URI": uri})
    assert stages_run(proc.stdout) == ALL_STAGES
    info = json.loads((repo / "data/prepared/info.json").read_text())
    assert info["class_names"][0] == "T-shirt/top" and info["train_count"] == 300
    assert "fid" in json.loads((repo / "metrics/eval.json").read_text())["cond"]["ddpm40_w1"]

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    names = {r.info.run_name for r in runs}
    assert {"prepare", "classifier", "reference", "train-uncond", "train-cond", "evaluate", "visualize"} <= names
    assert len(runs) == len(ALL_STAGES - {"profile", "check", "init-from"}) + 1  # and the parent (those log nothing)
    assert not (repo / "mlflow.db").exists()  # nothing went to the default local store
    assert list(artifacts.rglob("model.pt")) and list(artifacts.rglob("images/epoch_grid+step+1+*.png"))


@pytest.mark.parametrize("mode", ["on", "warn"])
def test_tracking_server_dying_mid_stage(tmp_path, mode):
    """Required tracking stops the stage with one line; DDPM_TRACKING=warn finishes it and says what was not
    logged. Neither waits on the dead server."""
    repo = make_repo(tmp_path / "repo", merge(TINY, {"train": {"epochs": 4}}))
    run([sys.executable, "-m", "stages.prepare", "data/prepared"], repo, env={"DDPM_TRACKING": "off"})
    proc, uri = start_server(tmp_path)
    try:
        train = subprocess.Popen([sys.executable, "-m", "stages.train", "uncond", "--data", "data/prepared",
                                  "--checkpoints", "ck", "--out", "model", "--metrics", "metrics.json", "--plot",
                                  "loss.csv"], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "MLFLOW_TRACKING_URI": uri, "DDPM_TRACKING": mode})
        deadline = time.time() + 300
        while not (repo / "ck/last.pt").exists():  # the run is open and has logged its first points
            assert train.poll() is None and time.time() < deadline, train.communicate()
            time.sleep(0.05)
        stop(proc, signal.SIGKILL)
        out, err = train.communicate(timeout=300)
    finally:
        stop(proc, signal.SIGKILL)
    assert "Traceback" not in err, err
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith(("error:", "warning:"))]
    if mode == "on":
        assert train.returncode == 1 and not (repo / "model").exists()
        assert lines == [f"error: MLflow tracking store {uri} stopped answering (MlflowException); rerun the stage "
                         "when it is back (training resumes from its checkpoint), or set DDPM_TRACKING=warn to "
                         "finish without it"]
    else:
        assert train.returncode == 0 and (repo / "model/model.pt").is_file()
        assert lines[0] == (f"warning: MLflow tracking store {uri} stopped answering (MlflowException): the rest "
                            "of this stage is not logged")
        assert lines[1].startswith("warning: not logged to MLflow (run ") and len(lines) == 2
        assert all(name in lines[1] for name in ("epoch_loss", "epoch_grid", "model.pt", "model ddpm-uncond"))
