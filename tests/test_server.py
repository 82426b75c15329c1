"""A full tiny pipeline run on real Fashion-MNIST, logged to an `mlflow server` on the loopback."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import ALL_STAGES, TINY, make_repo, merge, run, stages_run
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` with a SQLite backend and an artifact root, on a free port of 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "server-artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield uri, tmp_path / "server-artifacts"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_pipeline_logs_to_a_tracking_server(tmp_path, mlflow_server):
    uri, artifacts = mlflow_server
    repo = make_repo(tmp_path / "fashion", merge(TINY, {"data": {"name": "fashion_mnist"}}))
    proc = run(["dvc", "repro"], repo, env={"MLFLOW_TRACKING_URI": uri})
    assert stages_run(proc.stdout) == ALL_STAGES
    info = json.loads((repo / "data/prepared/info.json").read_text())
    assert info["class_names"][0] == "T-shirt/top" and info["train_count"] == 300
    assert "fid" in json.loads((repo / "metrics/eval.json").read_text())["cond"]["ddpm_w1"]

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    names = {r.info.run_name for r in runs}
    assert {"prepare", "classifier", "reference", "train-uncond", "train-cond", "evaluate", "visualize"} <= names
    assert len(runs) == len(ALL_STAGES - {"profile", "check"}) + 1  # and the parent (those two log nothing)
    assert not (repo / "mlflow.db").exists()  # nothing went to the default local store
    assert list(artifacts.rglob("model.pt")) and list(artifacts.rglob("epoch_001.png"))
