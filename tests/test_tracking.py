"""MLflow tracking of the tiny pipeline, queried back from the real store."""

import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import ALL_STAGES, run
from mlflow.tracking import MlflowClient
from test_mlflow_store import image_series, load_table, tracking_at

from ddpm import generate, load_model
from ddpm.samplers import METHODS

pytestmark = pytest.mark.slow
FAST = "fast-40"  # the headline's protocol key: the tiny project's 40 samples, scored by the fast protocol
STAGE_RUNS = {s.replace("@", "-") for s in ALL_STAGES - {"profile", "check", "init-from"}}  # a run per stage, by name


def client_for(repo: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def runs_of(client: MlflowClient, parent_id: str) -> dict:
    exp = client.get_experiment_by_name("ddpm")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.info.run_name: r for r in children}


def first_parent(client: MlflowClient):
    exp = client.get_experiment_by_name("ddpm")
    parents = client.search_runs([exp.experiment_id], "tags.role = 'pipeline'", order_by=["attributes.start_time ASC"])
    return parents[0]


def test_every_stage_is_a_nested_run_with_tags(tiny_repo):
    repo, _ = tiny_repo
    client = client_for(repo)
    parent = first_parent(client)
    runs = runs_of(client, parent.info.run_id)
    assert set(runs) == STAGE_RUNS
    data_hash = yaml.safe_load((repo / "data/prepared/info.json").read_text())["content_hash"]
    commit = run(["git", "rev-parse", "HEAD~1"], repo).stdout.strip()  # the commit before "reproduced"
    for name, r in runs.items():
        assert r.info.status == "FINISHED", name
        assert r.data.tags["stage"] == name.removesuffix("-" + r.data.tags["variant"])
        assert r.data.tags["git_commit"] == commit
        assert len(r.data.tags["params_hash"]) == 16
    assert runs["train-cond"].data.tags["variant"] == "cond"
    assert runs["train-cond"].data.tags["data_hash"] == data_hash
    assert runs["evaluate"].data.tags["data_hash"] == data_hash


def test_params_match_params_yaml(tiny_repo):
    repo, _ = tiny_repo
    client = client_for(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    train = runs_of(client, first_parent(client).info.run_id)["train-uncond"].data.params
    assert float(train["train.lr"]) == params["train"]["lr"]
    assert int(train["diffusion.timesteps"]) == params["diffusion"]["timesteps"]
    assert train["model.channel_mults"] == str(params["model"]["channel_mults"])
    assert not any(k.startswith(("sample.", "data.")) for k in train)  # only what the stage read


def test_loss_history_has_one_point_per_step(tiny_repo):
    repo, _ = tiny_repo
    client = client_for(repo)
    train = runs_of(client, first_parent(client).info.run_id)["train-cond"]
    history = client.get_metric_history(train.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 13))
    csv = (repo / "plots/loss_cond.csv").read_text().splitlines()[1:]
    assert [round(m.value, 6) for m in sorted(history, key=lambda m: m.step)] == [float(r.split(",")[1]) for r in csv]
    assert len(client.get_metric_history(train.info.run_id, "lr")) == 12


def test_parent_carries_headline_metrics(tiny_repo):
    repo, _ = tiny_repo
    metrics = first_parent(client_for(repo)).data.metrics
    headline = {f"{FAST}.{key}" for key in ("uncond.fid", "uncond.fid_over_floor", "uncond.ddpm.fid", "uncond.ddim.fid",
                                            "cond.is_mean", "cond.cond_accuracy", "cond.dpmsolver.fid", "floor.fid")}
    assert headline | {"classifier_test_accuracy"} <= set(metrics)  # keyed by protocol: never compared across two
    best = min(metrics[f"{FAST}.uncond.{m}.fid"] for m in ("ddpm", "ddim", "dpmsolver"))
    assert metrics[f"{FAST}.uncond.fid"] == best


def test_model_artifact_loads_and_samples(tiny_repo, tmp_path):
    repo, _ = tiny_repo
    client = client_for(repo)
    train = runs_of(client, first_parent(client).info.run_id)["train-cond"]
    assert image_series(client, train.info.run_id) == {("epoch_grid", 1), ("epoch_grid", 2)}
    local = client.download_artifacts(train.info.run_id, "model", str(tmp_path))
    model, diffusion, meta = load_model(Path(local) / "model.pt")
    images = generate(model, diffusion, 4, (1, 28, 28), seed=0, steps=3, labels=torch.arange(4))
    assert images.shape == (4, 1, 28, 28) and images.dtype == torch.uint8
    versions = client.search_model_versions("name = 'ddpm-cond'")
    assert any(v.run_id == train.info.run_id for v in versions)
    runs = runs_of(client, first_parent(client).info.run_id)  # only the unconditional model keeps a guide
    for variant, names in (("cond", {"model.pt", "config.json"}),
                           ("uncond", {"model.pt", "model-guide.pt", "config.json"})):
        listed = {a.path for a in client.list_artifacts(runs[f"train-{variant}"].info.run_id, "model")}
        assert listed == {f"model/{n}" for n in names}, (variant, listed)


def test_registered_model_loads_and_samples_through_mlflow(tiny_repo):
    repo, _ = tiny_repo
    client = client_for(repo)
    with tracking_at(client.tracking_uri):
        cond = mlflow.pyfunc.load_model("models:/ddpm-cond/latest")
        uncond = mlflow.pyfunc.load_model("models:/ddpm-uncond/latest")
    request = pd.DataFrame({"num": [3], "seed": [7], "class": [2], "steps": [3], "guidance": [1.0]})
    images = cond.predict(request)
    assert images.shape == (3, 1, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images, cond.predict(request))
    assert not np.array_equal(images, cond.predict(request.assign(seed=8)))
    # a guidance interval: one that holds every noise level is guidance at every step, one that holds none none
    assert np.array_equal(images, cond.predict(request.assign(interval_low=0.0, interval_high=1e30)))
    assert np.array_equal(cond.predict(request.assign(guidance=0.0)),
                          cond.predict(request.assign(interval_low=1e30, interval_high=1e31)))
    with pytest.raises(Exception, match="both interval_low and interval_high"):
        cond.predict(request.assign(interval_low=0.5))
    # the unconditional model is autoguided by the guide model logged beside it
    assert uncond.predict({"num": [2], "steps": [3], "guidance": [1.0]}).shape == (2, 1, 28, 28)
    assert cond.metadata.get_input_schema().required_input_names() == ["num"]


def test_versions_carry_their_data_and_the_best_is_the_champion(tiny_repo):
    """Each train run logs the prepared data as its input dataset and its version the data's hash; evaluate tags
    the versions it scored with their score and protocol, and ddpm-<variant>@champion is the best of those
    scored like it (experiments may have scored more since)."""
    repo, _ = tiny_repo
    client = client_for(repo)
    runs = runs_of(client, first_parent(client).info.run_id)
    info = yaml.safe_load((repo / "data/prepared/info.json").read_text())
    for variant in ("uncond", "cond"):
        train = client.get_run(runs[f"train-{variant}"].info.run_id)
        (dataset,) = [d.dataset for d in train.inputs.dataset_inputs]
        assert (dataset.name, dataset.digest) == ("glyphs", info["content_hash"][:32])
        versions = client.search_model_versions(f"name = 'ddpm-{variant}'")
        (first,) = [v for v in versions if v.run_id == train.info.run_id]
        assert first.tags["data_hash"] == info["content_hash"] and first.tags["comparability_key"]
        champion = client.get_model_version_by_alias(f"ddpm-{variant}", "champion")
        peers = [float(v.tags["fid"]) for v in versions if v.tags.get("comparability_key") ==
                 champion.tags["comparability_key"]]
        assert float(champion.tags["fid"]) == min(peers)
    with tracking_at(client.tracking_uri):
        model = mlflow.pyfunc.load_model("models:/ddpm-cond@champion")
    assert model.predict({"num": [2], "steps": [2]}).shape[:2] == (2, 1)


def test_parent_run_spans_the_pipeline(tiny_repo):
    repo, _ = tiny_repo
    client = client_for(repo)
    parent = first_parent(client)
    children = runs_of(client, parent.info.run_id).values()
    assert parent.info.status == "FINISHED"
    assert parent.info.start_time == min(r.info.start_time for r in children)
    assert parent.info.end_time == max(r.info.end_time for r in children)


def test_sample_runs_log_grid_series_and_a_timings_table(tiny_repo, tmp_path):
    repo, _ = tiny_repo
    client = client_for(repo)
    runs = runs_of(client, first_parent(client).info.run_id)
    assert image_series(client, runs["sample-ddim-cond"].info.run_id) == {("ddim_eta0_w1", 5), ("ddim_eta0_w1", 10)}
    assert image_series(client, runs["sample-dpmsolver-uncond"].info.run_id) == {("dpmsolver", 5),
                                                                                 ("dpmsolver_ag1", 5)}
    run_ = runs["sample-ddim-uncond"]
    # sample.precision as params.yaml has it, and what it means on this machine (the tiny project's: fp32)
    assert (run_.data.params["sample.precision"], run_.data.tags["precision"]) == ("fp32", "fp32")
    table = load_table(client, run_.info.run_id, "samples/timings.json", tmp_path)
    assert set(table["tag"]) == {"ddim5_eta0", "ddim10_eta0", "ddim5_eta0_ag1", "ddim10_eta0_ag1"}
    assert (table["seconds"] > 0).all() and (table["images_per_second"] > 0).all()
    assert set(table["precision"]) == {"fp32"}
    for name, r in runs.items():  # a handful of metric keys per stage run (evaluate's are its own)
        assert name == "evaluate" or len(r.data.metrics) <= 25, (name, sorted(r.data.metrics))
        assert not any(k.endswith((".seconds", ".images_per_second")) for k in r.data.metrics), name


def test_experiments_get_their_own_parent_runs(tiny_repo, tiny_experiments):
    repo, _ = tiny_repo
    client = client_for(repo)
    exp = client.get_experiment_by_name("ddpm")
    for name, stages in [("eta-half", {"sample-ddim-uncond", "evaluate"}), ("gpu", {"train-uncond", "evaluate"})]:
        (parent,) = client.search_runs([exp.experiment_id], f"tags.DVC_EXP_NAME = '{name}' and tags.role = 'pipeline'")
        children = runs_of(client, parent.info.run_id)
        assert stages <= set(children) and "prepare" not in children
        assert all(r.data.tags["DVC_EXP_NAME"] == name for r in children.values())
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))  # the --temp run logged into the main store


def test_tracking_uri_from_the_environment_is_used(tiny_repo, tmp_path):
    repo, _ = tiny_repo
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    run([sys.executable, "-m", "stages.prepare", str(tmp_path / "prepared")], repo, env={"MLFLOW_TRACKING_URI": uri})
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id], "tags.stage = 'prepare'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_unreachable_tracking_server_is_one_clear_line(tiny_repo, tmp_path):
    repo, _ = tiny_repo
    proc = run([sys.executable, "-m", "stages.prepare", str(tmp_path / "prepared")], repo, check=False,
               env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1
    assert lines[-1].startswith("error: MLflow tracking store http://127.0.0.1:9 is unreachable")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "prepared").exists()
    proc = run([sys.executable, "-m", "stages.prepare", str(tmp_path / "prepared")], repo, check=False,
               env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "DDPM_TRACKING": "warn"})
    assert proc.returncode == 0 and "unreachable" in proc.stderr and (tmp_path / "prepared/info.json").is_file()


def test_report_lists_experiments_with_fid(tiny_repo, tiny_experiments, tmp_path):
    repo, _ = tiny_repo
    proc = run([sys.executable, "-m", "stages.report", "--csv", str(tmp_path / "table.csv")], repo)
    assert "eta-half" in proc.stdout and "gpu" in proc.stdout and f"{FAST}.uncond.ddpm.fid" in proc.stdout
    table = pd.read_csv(tmp_path / "table.csv", index_col=0)
    assert table.loc["gpu", "train.lr"] == 0.001  # the gpu profile scores with the standard protocol: its own column
    fast = table[f"{FAST}.uncond.ddpm.fid"]
    assert pd.notna(fast["eta-half"]) and pd.isna(fast["gpu"])
    assert pd.notna(table.loc["gpu", "standard-40.uncond.ddpm.fid"])
    assert table.loc["gpu", "profile"] == "gpu" and table.loc["eta-half", "profile"] == "laptop"
    assert table.loc["gpu", "train.lr_schedule"] == "cosine" and table.loc["gpu", "sample.spacing"] == "quadratic"


def test_queued_experiments_in_parallel_both_land_in_mlflow(tiny_repo):
    repo, _ = tiny_repo
    names = {"queued-a": "[0.2]", "queued-b": "[0.3]"}
    for name, eta in names.items():
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"sample.eta={eta}"], repo)
    run(["dvc", "queue", "start", "-j", "2"], repo)
    deadline = time.time() + 900
    while time.time() < deadline:
        status = run(["dvc", "queue", "status"], repo).stdout
        if not any(s in status for s in ("Queued", "Running")):
            break
        time.sleep(3)
    assert status.count("Success") >= 2, status
    for name in names:  # only sample params changed: the trained models are reused
        log = run(["dvc", "queue", "logs", name], repo).stdout
        assert "Stage 'train@uncond' didn't change, skipping" in log and "Running stage 'train@" not in log, log
    client = client_for(repo)
    exp = client.get_experiment_by_name("ddpm")
    for name in names:
        (parent,) = client.search_runs([exp.experiment_id], f"tags.DVC_EXP_NAME = '{name}' and tags.role = 'pipeline'")
        children = runs_of(client, parent.info.run_id)
        assert set(children) == {"sample-ddim-uncond", "sample-ddim-cond", "evaluate"}  # eta: DDIM only
        assert all(r.info.status == "FINISHED" for r in children.values())
        assert f"{FAST}.uncond.ddim.fid" in parent.data.metrics  # the headline; the setting's own scores in evaluate's
        assert f"sampler.uncond.ddim5_eta{names[name][1:-1]}" in children["evaluate"].data.tags


def test_a_sampler_left_out_of_sample_methods_is_neither_run_nor_scored(tiny_repo):
    repo, _ = tiny_repo
    proc = run(["dvc", "exp", "run", "--temp", "-n", "no-ddpm", "-S", "sample.methods=[ddim,dpmsolver]"], repo)
    assert "cond ddpm: not in sample.methods, nothing to sample" in proc.stdout
    client = client_for(repo)
    exp = client.get_experiment_by_name("ddpm")
    (parent,) = client.search_runs([exp.experiment_id], "tags.DVC_EXP_NAME = 'no-ddpm' and tags.role = 'pipeline'")
    fids = [key for key in parent.data.metrics if key.endswith(".fid")]  # e.g. cond.ddim5_eta0_w1.fid
    scored = {(variant, method) for variant in ("uncond", "cond") for method in METHODS
              if any(key.startswith(f"{FAST}.{variant}.{method}") for key in fids)}
    assert scored == {(v, m) for v in ("uncond", "cond") for m in ("ddim", "dpmsolver")}, fids



def test_reopening_a_run_the_store_lacks_starts_a_new_one(tmp_path, monkeypatch, capsys):
    """Checkpoints outlive the store (mlflow.db removed): the resumed stage logs to a new run."""
    from stages.pipeline.tracking import stage_run

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    gone = "0" * 32
    with stage_run("train", "uncond", {"seed": 0}, run_id=gone) as tracker:
        tracker.log_history("loss", [(1, 0.5), (2, 0.4)])
    assert f"MLflow run {gone} is not in {uri}: logging to a new run" in capsys.readouterr().out
    new = MlflowClient(uri).get_run(tracker.run_id)
    assert tracker.run_id != gone and new.info.run_name == "train-uncond" and new.info.status == "FINISHED"
    assert [m.step for m in MlflowClient(uri).get_metric_history(tracker.run_id, "loss")] == [1, 2]


def test_train_says_where_to_watch_it(tiny_repo):
    """Its first line gives the MLflow UI command, the address of the runs table in it, and the grids folder."""
    repo, output = tiny_repo
    experiment = client_for(repo).get_experiment_by_name("ddpm").experiment_id
    for variant in ("uncond", "cond"):
        assert (f"train@{variant}: fp32 on cpu; watch it in the MLflow UI (`mlflow ui --backend-store-uri "
                f"sqlite:///mlflow.db`, then http://127.0.0.1:5000/#/experiments/{experiment}/runs?"
                f"workflowType=machine_learning) and its per-epoch grids in checkpoints/{variant}/grids/") in output
