"""`ddpm --model` takes what the MLflow registry holds (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/...) as
it takes a model file or an export folder, from a real SQLite store, and samples identically from each."""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT
from mlflow.tracking import MlflowClient

from ddpm import DiffusionConfig, UNet, UNetConfig, guide_path, save_model
from ddpm.checkpoint import export_model
from ddpm.cli import main
from ddpm.sources import local_model
from stages.pipeline.tracking import stage_run


def random_model(folder: Path, num_classes: int | None, guide: bool) -> Path:
    """A tiny model file (and its guide) with random weights, none zero (a new UNet's output layer is): sampling
    it is as deterministic as sampling a trained one, and the guide's samples differ."""
    config = UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                        attention_resolutions=(), num_heads=2, num_classes=num_classes)
    folder.mkdir(parents=True)
    for seed, path in ((0, folder / "model.pt"), (1, guide_path(folder / "model.pt"))):
        torch.manual_seed(seed)
        net = UNet(config)
        with torch.no_grad():
            for w in net.parameters():
                w.normal_(0, 0.1)
        save_model(path, net, config, DiffusionConfig(timesteps=10), {"class_names": ["a", "b", "c"]})
        if not guide:
            break
    return folder / "model.pt"


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> dict:
    """An unconditional model with its guide, registered as version 1 of ddpm-uncond (alias champion) in a SQLite
    store, its files also logged as the run's model/ artifacts (as the train stage logs them); and exported."""
    root = tmp_path_factory.mktemp("registry")
    model = random_model(root / "models/uncond", None, guide=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for name in ("DDPM_TRACKING", "MLFLOW_EXPERIMENT_NAME", "DVC_EXP_NAME"):
            mp.delenv(name, raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        with stage_run("train", "uncond") as tracker:
            for f in (model, guide_path(model)):
                tracker.log_artifact(f, "model")
            tracker.register_model(model.parent, "ddpm-uncond")
    client = MlflowClient(uri)
    client.set_registered_model_alias("ddpm-uncond", "champion", "1")
    export_model(model, root / "exported")
    return {"root": root, "uri": uri, "model": model, "run_id": tracker.run_id}


def sample(source, out: Path, *flags: str) -> np.ndarray:
    assert main(["sample", "--model", str(source), "--num", "2", "--steps", "2", "--device", "cpu",
                 "--out", str(out / "grid.png"), "--save-array", str(out / "images.npz"), *flags]) == 0
    return np.load(out / "images.npz")["images"]


def test_every_kind_of_source_samples_the_same_images(registry, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    run_id = registry["run_id"]
    sources = [registry["model"], registry["root"] / "exported", "models:/ddpm-uncond@champion",
               "models:/ddpm-uncond/1", f"runs:/{run_id}/model"]
    # autoguided: the guide logged beside the model comes with it from every source
    images = [sample(s, tmp_path, "--autoguidance", "1") for s in sources]
    assert images[0].shape == (2, 1, 8, 8)
    assert all(np.array_equal(images[0], other) for other in images[1:])
    plain = sample(registry["model"], tmp_path)
    assert not np.array_equal(plain, images[0])
    assert np.array_equal(sample(f"runs:/{run_id}/model/model.pt", tmp_path), plain)  # one file of a run
    assert main(["sample", "--model", f"runs:/{run_id}/model/model.pt", "--autoguidance", "1"]) == 2  # no guide
    assert "needs the guide model model-guide.pt beside runs:/" in capsys.readouterr().err
    assert not list(Path(tempfile.gettempdir()).glob("ddpm-model-*")), "a download was left behind"


@pytest.mark.parametrize("uri, words", [
    ("models:/ddpm-uncond@nope", ["models:/ddpm-uncond@nope does not resolve", "alias nope not found"]),
    ("models:/ddpm-uncond/7", ["models:/ddpm-uncond/7 does not resolve", "version=7"]),
    ("models:/no-such-model/1", ["models:/no-such-model/1 does not resolve", "no-such-model"]),
    ("runs:/0123abcd/model", ["runs:/0123abcd/model does not resolve", "0123abcd"]),
    ("models:/ddpm-uncond", ["models:/ddpm-uncond is not a model URI", "models:/NAME@ALIAS"]),
])
def test_a_uri_that_does_not_resolve_is_one_line_naming_it(registry, tmp_path, monkeypatch, capsys, uri, words):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    assert main(["sample", "--model", uri, "--out", str(tmp_path / "x.png"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "x.png").exists()


def test_a_uri_without_a_store_is_one_line_and_creates_none(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # MLflow's default store: mlflow.db here, which is not there
    assert main(["sample", "--model", "models:/ddpm-cond@champion", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: models:/ddpm-cond@champion: there is no MLflow store ") and "mlflow.db" in err
    assert not (tmp_path / "mlflow.db").exists() and len(err.strip().splitlines()) == 1


def test_local_model_removes_its_download(registry):
    with local_model("models:/ddpm-uncond/1", registry["uri"]) as path:
        assert path.name == "model.pt" and guide_path(path).is_file()
    assert not path.exists()
    with local_model(registry["model"]) as path:  # a path is itself
        assert path == registry["model"]


def test_the_library_imports_without_mlflow():
    code = "import sys, ddpm, ddpm.cli, ddpm.sources; assert 'mlflow' not in sys.modules, 'mlflow imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
