"""MLflow tracking without a pipeline: stage runs opened in-process (or by a small stage script) on a
SQLite store in a temporary folder, queried back from the store."""

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import ROOT
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

import ddpm
from ddpm import DiffusionConfig, UNet, UNetConfig, save_model
from stages.pipeline.io import file_hash
from stages.pipeline.registry import describe_model_versions, registered_name
from stages.pipeline.store import mlflow_ui_url
from stages.pipeline.tracking import Tracker, stage_run

# A stage as small as can be: one run with one metric, then its output file.
STAGE = """
from pathlib import Path
from stages.pipeline.run import run
from stages.pipeline.tracking import stage_run
def main(argv):
    with stage_run("prepare", params={"seed": 0}) as tracker:
        tracker.log_metrics({"x": 1.0})
        Path("done").write_text("")
run(main)
"""


@pytest.fixture
def store(tmp_path, monkeypatch) -> MlflowClient:
    """A client on mlflow.db in tmp_path, where the stage runs log (the working directory)."""
    monkeypatch.chdir(tmp_path)
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def run_stage(cwd: Path, env: dict | None = None, prefix: tuple = ()) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([*prefix, sys.executable, "-c", STAGE], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    return line


def test_experiment_is_marked_as_model_training(store):
    with stage_run("prepare"):
        pass
    assert store.get_experiment_by_name("ddpm").tags["mlflow.experimentKind"] == "custom_model_development"
    other = store.create_experiment("made-before")  # an experiment made without the tag gets it
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "made-before"
    with stage_run("prepare"):
        pass
    assert store.get_experiment(other).tags["mlflow.experimentKind"] == "custom_model_development"


def test_ui_address_opens_the_runs_table(store):
    """The MLflow UI opens an experiment in its runs table or its GenAI view by the page address's workflowType
    (else by the browser's last choice, GenAI at first), whatever the store holds."""
    with stage_run("prepare") as tracker:
        pass
    url = f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning"
    assert mlflow_ui_url(tracker.experiment_id) == url
    os.environ["MLFLOW_TRACKING_URI"] = "http://tracking.example:8080/"
    assert mlflow_ui_url("7") == "http://tracking.example:8080/#/experiments/7/runs?workflowType=machine_learning"
    ui = list((Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js").glob("main.*.js"))
    if not ui:
        pytest.skip("this MLflow has no UI (mlflow-skinny)")
    code = ui[0].read_text(errors="replace")
    assert '.get("workflowType")' in code and 'MACHINE_LEARNING="machine_learning"' in code


def test_parent_run_spans_its_stages(store):
    with stage_run("prepare") as first:
        time.sleep(0.3)
        assert store.get_run(first.parent_id).info.status == "RUNNING"
    with stage_run("train", "cond") as last:
        time.sleep(0.3)
    parent = store.get_run(last.parent_id)
    assert first.parent_id == last.parent_id and parent.info.status == "FINISHED"
    assert parent.info.start_time == store.get_run(first.run_id).info.start_time
    assert parent.info.end_time == store.get_run(last.run_id).info.end_time
    assert parent.info.end_time - parent.info.start_time >= 600


def test_parent_run_failed_until_the_stage_succeeds(store):
    with stage_run("prepare") as ok:
        pass
    with pytest.raises(RuntimeError), stage_run("train", "cond"):
        raise RuntimeError("diverged")
    assert store.get_run(ok.parent_id).info.status == "FAILED"
    with stage_run("train", "cond") as rerun:
        pass
    parent = store.get_run(ok.parent_id)
    assert parent.info.status == "FINISHED" and parent.info.end_time == store.get_run(rerun.run_id).info.end_time


def test_images_and_tables(store, tmp_path):
    grid = tmp_path / "grid.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(grid)
    with stage_run("sample-ddim", "cond") as tracker:
        for step in (5, 10):
            tracker.log_image(grid, "ddim_eta0_w1", step=step)
        tracker.log_table([{"tag": "ddim5_eta0_w1", "seconds": 1.5}, {"tag": "ddim10_eta0_w1", "seconds": 3.0}],
                          "samples/timings.json")
    assert image_series(store, tracker.run_id) == {("ddim_eta0_w1", 5), ("ddim_eta0_w1", 10)}
    table = load_table(store, tracker.run_id, "samples/timings.json", tmp_path)
    assert list(table["seconds"]) == [1.5, 3.0] and not store.get_run(tracker.run_id).data.metrics


def load_table(client: MlflowClient, run_id: str, artifact_file: str, folder: Path) -> pd.DataFrame:
    """A table logged with log_table (MlflowClient.load_table searches the global tracking URI's store)."""
    return pd.read_json(client.download_artifacts(run_id, artifact_file, str(folder)), orient="split")


def image_series(client: MlflowClient, run_id: str) -> set[tuple[str, int]]:
    """(key, step) of the images logged with log_image(key=, step=): images/<key>+step+<step>+...png."""
    names = [Path(a.path).name for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    return {(n.split("+")[0], int(n.split("+")[2])) for n in names}


@pytest.mark.parametrize("enabled", [True, False])
def test_system_metrics_follow_mlflows_switch(store, enabled):
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "0.2"
    (mlflow.config.enable_system_metrics_logging if enabled else mlflow.config.disable_system_metrics_logging)()
    with stage_run("prepare") as tracker:
        time.sleep(1)
    metrics = store.get_run(tracker.run_id).data.metrics
    assert ("system/cpu_utilization_percentage" in metrics) == enabled
    assert any(k.startswith("system/") for k in metrics) == enabled


def test_quotes_in_experiment_and_pipeline_names(store):
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "Bob's \"best\" runs"
    os.environ["DVC_EXP_NAME"] = "o'brien"
    with stage_run("prepare") as first:
        pass
    with stage_run("train", "cond") as second:
        pass
    assert first.parent_id == second.parent_id
    assert store.get_run(first.parent_id).info.run_name == "o'brien"
    os.environ["DVC_EXP_NAME"] = "o_brien"  # LIKE's wildcard matches it too: another pipeline all the same
    with stage_run("prepare") as third:
        pass
    assert third.parent_id != first.parent_id


def test_empty_store_file_is_refused(tmp_path):
    (tmp_path / "mlflow.db").touch()
    line = one_line_error(run_stage(tmp_path))
    assert line == (f"error: MLflow store {tmp_path / 'mlflow.db'} is an empty file, not a store: its runs are gone; "
                    f"remove it to start a new store (rm {tmp_path / 'mlflow.db'}), or restore it from a backup")
    assert (tmp_path / "mlflow.db").stat().st_size == 0 and not (tmp_path / "done").exists()


def test_truncated_store_is_corrupt(store, tmp_path):
    with stage_run("prepare"):
        pass
    db = tmp_path / "mlflow.db"
    os.truncate(db, db.stat().st_size // 2)
    line = one_line_error(run_stage(tmp_path))
    assert line.startswith(f"error: MLflow store {db} is corrupt (")
    assert line.endswith(f"move it away to start a new store (mv {db} {db}.corrupt)")
    assert not (tmp_path / "done").exists()


def test_read_only_store_is_one_line(store, tmp_path):
    with stage_run("prepare"):
        pass
    db = tmp_path / "mlflow.db"
    db.chmod(0o444)
    # root writes read-only files anyway: drop that capability for the stage
    prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search") if os.geteuid() == 0 else ()
    if prefix and not shutil.which("setpriv"):
        pytest.skip("needs setpriv to run as root without CAP_DAC_OVERRIDE")
    line = one_line_error(run_stage(tmp_path, prefix=prefix))
    assert line == (f"error: MLflow store {db} is read-only (it and its folder must be writable): fix its "
                    "permissions, or set MLFLOW_TRACKING_URI to another store")
    assert not (tmp_path / "done").exists()
    with contextlib.closing(sqlite3.connect(db)) as con:
        assert con.execute("select count(*) from runs").fetchone() == (2,)  # the earlier stage and its parent


@contextlib.contextmanager
def tracking_at(uri: str):
    """mlflow's global tracking URI (which `models:/` URIs resolve through) set to `uri`, then unset."""
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # also unsets MLFLOW_TRACKING_URI, which hermetic_environment restores


def tiny_model(folder: Path, num_classes: int | None) -> Path:
    torch.manual_seed(0)
    config = UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                        attention_resolutions=(), num_heads=2, num_classes=num_classes)
    folder.mkdir()
    save_model(folder / "model.pt", UNet(config), config, DiffusionConfig(timesteps=10))
    return folder


def test_registered_model_loads_through_mlflow_and_is_described(store, tmp_path):
    folder = tiny_model(tmp_path / "model", num_classes=3)
    with stage_run("train", "cond") as tracker:
        tracker.register_model(folder, "ddpm-cond")
    with stage_run("evaluate") as evaluate:
        describe_model_versions(evaluate, {"cond": {"fid": 12.5, "fid_over_floor": 2.25, "sampler": "ddim5_eta0_w1"}})
    (version,) = store.search_model_versions("name = 'ddpm-cond'")
    assert version.run_id == tracker.run_id
    assert version.tags["model_hash"] == file_hash(folder / "model.pt")  # which model file it is, for evaluate
    assert {k: version.tags[k] for k in ("fid", "fid_over_floor", "sampler")} == \
        {"fid": "12.5", "fid_over_floor": "2.25", "sampler": "ddim5_eta0_w1"}
    assert "fid 12.5" in version.description and "ddim5_eta0_w1" in version.description
    with tracking_at(store.tracking_uri):
        model = mlflow.pyfunc.load_model("models:/ddpm-cond/latest")
    assert model.input_example.to_dict("list") == {"num": [4], "seed": [0]}  # shown in the MLflow UI
    request = {"num": [4], "seed": [3], "steps": [2], "guidance": [1.0]}
    images = model.predict(request)
    assert images.shape == (4, 1, 8, 8) and images.dtype == np.uint8
    assert np.array_equal(images, model.predict(request))
    assert model.predict({"num": [2], "class": [1], "steps": [2]}).shape == (2, 1, 8, 8)


def test_models_register_under_ddpm_model_name(monkeypatch):
    assert registered_name("cond") == "ddpm-cond"
    monkeypatch.setenv("DDPM_MODEL_NAME", "fashion")
    assert registered_name("cond") == "fashion-cond"
    monkeypatch.setenv("DDPM_MODEL_NAME", "")  # empty: nothing registered
    assert registered_name("cond") is None


def test_describing_without_a_registered_model_does_nothing(store):
    with stage_run("evaluate") as tracker:
        describe_model_versions(tracker, {"uncond": {"fid": 1.0}})
    describe_model_versions(Tracker(None, None, None), {"uncond": {"fid": 1.0}})  # tracking off
    assert not store.search_registered_models()



@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """Registered models loaded back through mlflow.pyfunc, as a user or a model server loads them: a 3-class
    conditional one (its zero-initialised output layers perturbed, so that guidance changes its predictions) and an
    unconditional one without a guide model."""
    folder = tmp_path_factory.mktemp("served")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)  # where the stage runs log, as the `store` fixture has it
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DDPM_TRACKING", "DDPM_MODEL_NAME"):
            mp.delenv(name, raising=False)
        for name, k in (("cond", 3), ("uncond", None)):
            model_folder = tiny_model(folder / name, num_classes=k)
            if k:
                model, _, _ = ddpm.load_model(model_folder / "model.pt")
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.1 * torch.randn_like(p))
                save_model(model_folder / "model.pt", model, model.config, DiffusionConfig(timesteps=10))
            with stage_run("train", name) as tracker:
                tracker.register_model(model_folder, f"ddpm-{name}")
        with tracking_at(f"sqlite:///{folder / 'mlflow.db'}"):
            return {name: mlflow.pyfunc.load_model(f"models:/ddpm-{name}/latest") for name in ("cond", "uncond")}


BAD_REQUESTS = {  # name: (model, request, words of the one-line error)
    "infinite guidance": ("cond", {"guidance": [float("inf")]}, ["row 0: guidance = inf", "finite"]),
    "infinite eta": ("cond", {"eta": [float("inf")]}, ["row 0: eta = inf", "finite"]),
    "NaN guidance": ("cond", {"guidance": [float("nan")]}, ["row 0: guidance has no value (NaN)"]),
    "infinite autoguidance": ("uncond", {"guidance": [float("inf")]}, ["row 0: guidance = inf", "finite"]),
    "autoguidance without a guide": ("uncond", {"guidance": [1.0]}, ["guidance = 1.0", "no guide model"]),
    "infinite interval": ("cond", {"guidance": [1.0], "interval_low": [0.0], "interval_high": [float("inf")]},
                          ["interval_low, interval_high = (0.0, inf)", "finite"]),
    "class k": ("cond", {"class": [3]}, ["row 0: class = 3", "[0, 2]"]),
    "class -1": ("cond", {"class": [-1]}, ["row 0: class = -1", "[0, 2]"]),
    "class -2": ("cond", {"class": [-2]}, ["row 0: class = -2", "[0, 2]"]),
    "class of an unconditional model": ("uncond", {"class": [1]}, ["class = 1", "unconditional"]),
    "num 0": ("cond", {"num": [0]}, ["row 0: num = 0", "[1, "]),
    "num -5": ("cond", {"num": [-5]}, ["row 0: num = -5"]),
    "num 10**9": ("cond", {"num": [10**9]}, ["row 0: num = 1000000000", "10,000"]),
    "num summed over rows": ("cond", {"num": [6000, 6000], "steps": [1, 1]}, ["num: 12000 images over all rows"]),
    "a bad second row": ("cond", {"num": [1, 1], "steps": [2, 2], "guidance": [1.0, float("inf")]},
                         ["row 1: guidance = inf"]),
    "steps above T": ("cond", {"steps": [11]}, ["row 0: steps = 11", "T = 10"]),
    "seed below 0": ("cond", {"seed": [-1]}, ["row 0: seed = -1"]),
    "guidance too large": ("cond", {"guidance": [1e30]}, ["sampling gave NaN", "guidance weight too large"]),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_bad_request_to_the_served_model_is_one_line(served, case):
    """Every request is checked as params.yaml is (ddpm.request), before any image is drawn, and a NaN result is
    an error, never black images."""
    name, request, words = BAD_REQUESTS[case]
    with pytest.raises(MlflowException) as error:
        served[name].predict({"num": [2], "steps": [2], **request})
    message = error.value.message
    assert len(message.splitlines()) == 1 and all(w in message for w in words), message


def test_the_served_model_draws_up_to_its_bound(served):
    images = served["cond"].predict({"num": [3, 2], "class": [2, 0], "steps": [1, 1], "guidance": [1.0, 0.0]})
    assert images.shape == (5, 1, 8, 8) and images.dtype == np.uint8
