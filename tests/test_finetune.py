"""Fine-tuning (train_<variant>.init_from): the param checked before any work, the init-from stage's copy of the
source (a file, an export folder, a registry URI in a real SQLite store), the architecture check, and the run
hash that keeps a resume to its own source. The DAG and resume end to end: test_finetune_pipeline.py."""

import json
from dataclasses import replace

import pytest
import torch
import yaml
from helpers import ROOT
from mlflow.tracking import MlflowClient
from test_model_sources import random_model

from ddpm import DiffusionConfig, TrainConfig, UNetConfig
from ddpm.checkpoint import export_model
from stages.pipeline.finetune import SOURCE, InitSource, fetch
from stages.pipeline.io import file_hash
from stages.pipeline.params import ParamsError, validate
from stages.pipeline.resume import TrainState
from stages.pipeline.tracking import stage_run

BASE = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_init(value, section: str = "train_cond") -> dict:
    params = yaml.safe_load(yaml.safe_dump(BASE))
    params[section]["init_from"] = value
    return params


@pytest.mark.parametrize("value", [None, "models:/ddpm-cond@champion", "models:/ddpm-cond/3",
                                   "runs:/0123abcdef/model", "models:/m-0123abcdef"])
def test_init_from_takes_null_and_model_uris(value):
    assert validate(with_init(value)).train_cond.init_from == value


def test_init_from_takes_a_model_file_and_an_export_folder(tmp_path):
    model = random_model(tmp_path / "base", 10, guide=False)
    export_model(model, tmp_path / "exported")
    for value in (str(model), str(tmp_path / "exported")):
        assert validate(with_init(value, "train_uncond")).train_uncond.init_from == value


@pytest.mark.parametrize("value, message", [
    ("missing.pt", "train_cond.init_from = 'missing.pt' is not there (no such file or folder); allowed: null, a "
                   "model file (.pt), a `ddpm export` folder, or an MLflow model URI (models:/NAME@ALIAS, "),
    ("models:/ddpm-cond", "train_cond.init_from = 'models:/ddpm-cond' is not a model URI of those forms"),
    ("runs:/", "train_cond.init_from = 'runs:/' is not a model URI of those forms"),
    ("{folder}", "is a folder without config.json, not a `ddpm export` folder"),
    (3, "train_cond.init_from must be str, got 3"),
])
def test_a_bad_init_from_is_one_line(tmp_path, value, message):
    value = value.format(folder=tmp_path) if isinstance(value, str) else value
    with pytest.raises(ParamsError) as e:
        validate(with_init(value))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_shared_init_from_points_to_each_models_own():
    params = yaml.safe_load(yaml.safe_dump(BASE))
    params["train"]["init_from"] = "base.pt"
    with pytest.raises(ParamsError, match="train.init_from is now train_uncond.init_from and train_cond.init_from"):
        validate(params)


def test_fetch_copies_a_model_file_or_an_export_and_says_where_it_came_from(tmp_path):
    model = random_model(tmp_path / "base", 3, guide=True)
    export_model(model, tmp_path / "exported")
    for source, files in ((model, {"model.pt", SOURCE}),
                          (tmp_path / "exported", {"model.safetensors", "config.json", SOURCE})):
        folder = tmp_path / "init" / source.name
        folder.mkdir(parents=True)
        written = fetch(str(source), folder, "train_cond.init_from", tmp_path / "models")
        assert {f.name for f in folder.iterdir()} == files  # the weights only: no guide, card or samples
        assert json.loads((folder / SOURCE).read_text()) == written
        init = InitSource.read(folder)
        assert (init.init_from, init.resolved) == (str(source), str(source))
        assert init.tags() == {"init_from": str(source), "init_from_resolved": str(source),
                               "init_from_model_hash": written["model_hash"]}
        weights = init.weights(UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                                          attention_resolutions=(), num_heads=2, num_classes=3), "key")
        saved = torch.load(model, weights_only=True)["weights"]
        assert all(torch.equal(weights[k], saved[k]) for k in saved)
    assert written["model_hash"] == file_hash(tmp_path / "init/exported/model.safetensors")


def test_fetch_of_null_is_only_source_json(tmp_path):
    assert fetch(None, tmp_path, "train_cond.init_from", tmp_path / "models") == {"init_from": None}
    assert [f.name for f in tmp_path.iterdir()] == [SOURCE]
    assert InitSource.read(tmp_path) == InitSource() and InitSource().tags() == {}


def test_fetch_refuses_a_model_the_pipeline_trains_and_a_file_that_is_no_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    random_model(tmp_path / "models/cond", 3, guide=False)
    (tmp_path / "init").mkdir()
    with pytest.raises(ParamsError, match="is a model this pipeline trains, so training would start over from its "
                                          "own output at every run"):
        fetch("models/cond/model.pt", tmp_path / "init", "train_cond.init_from", tmp_path / "models")
    (tmp_path / "notes.pt").write_text("not a model")
    with pytest.raises(ParamsError, match=r"^params.yaml: train_cond.init_from = 'notes.pt' is not a model of this "
                                          r"project: not a checkpoint written by this project \(it is not a PyTorch"):
        fetch("notes.pt", tmp_path / "init", "train_cond.init_from", tmp_path / "models")


def test_fetch_pins_a_registry_alias_to_its_version(tmp_path, monkeypatch):
    """models:/NAME@ALIAS is copied from the version it names now, which source.json and the run tags record."""
    monkeypatch.chdir(tmp_path)
    model = random_model(tmp_path / "base", 3, guide=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with stage_run("train", "cond") as tracker:
        tracker.register_model(model.parent, "ddpm-cond")
    logged = MlflowClient(uri).get_model_version("ddpm-cond", "1").source.removeprefix("models:/")  # m-...
    MlflowClient(uri).set_registered_model_alias("ddpm-cond", "champion", "1")
    (tmp_path / "init").mkdir()
    assert logged.startswith("m-")
    written = fetch("models:/ddpm-cond@champion", tmp_path / "init", "train_cond.init_from", tmp_path / "models", uri)
    assert written == {"init_from": "models:/ddpm-cond@champion", "resolved": "models:/ddpm-cond/1",
                       "run_id": tracker.run_id, "model_id": logged, "model_hash": file_hash(model)}
    assert (tmp_path / "init/model.pt").read_bytes() == model.read_bytes()


def test_a_model_of_another_architecture_is_one_line_naming_the_fields(tmp_path):
    folder = tmp_path / "init"
    folder.mkdir()
    fetch(str(random_model(tmp_path / "base", 3, guide=False)), folder, "train_cond.init_from", tmp_path / "models")
    ours = UNetConfig(image_size=8, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                      attention_resolutions=(), num_heads=2, num_classes=10)
    with pytest.raises(ParamsError) as e:
        InitSource.read(folder).weights(ours, "train_cond.init_from")
    assert str(e.value) == (f"params.yaml: train_cond.init_from = '{tmp_path / 'base/model.pt'}' is a model of "
                            "another architecture than the one params.yaml and the data give: base_channels 8 "
                            "(here 16), num_classes 3 (here 10)")


def test_a_checkpoint_resumes_only_from_the_same_source(tmp_path):
    unet, diffusion, config = UNetConfig(), DiffusionConfig(), TrainConfig()
    scratch = TrainState.of(tmp_path, unet, diffusion, config, 0, "data").run_hash
    assert TrainState.of(tmp_path, unet, diffusion, config, 0, "data", None).run_hash == scratch
    a = TrainState.of(tmp_path, unet, diffusion, config, 0, "data", "a").run_hash
    b = TrainState.of(tmp_path, unet, diffusion, config, 0, "data", "b").run_hash
    assert len({scratch, a, b}) == 3
    assert replace(InitSource(), init_from="x").tags() == {"init_from": "x"}
