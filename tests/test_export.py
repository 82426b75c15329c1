"""`ddpm export`: a model file as a folder of safetensors weights, config.json, a model card and a sample
grid, which every command loads back (without pickle) to the same samples as the model file."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_cli import CLASS_NAMES, tiny_models

from ddpm import checkpoint, load_model
from ddpm.cli import main


@pytest.fixture
def models(tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tiny_models(tmp_path_factory)


def export(model, out="exported", *extra) -> None:
    assert main(["export", "--model", str(model), "--out", out, "--num", "4", "--steps", "3", "--device", "cpu",
                 *map(str, extra)]) == 0


@pytest.mark.parametrize("variant, guidance", [("uncond", ["--autoguidance", "2"]), ("cond", ["--guidance", "1"])])
def test_an_exported_folder_samples_byte_identical_images_to_its_model_file(models, tmp_path, variant, guidance):
    export(models[variant])
    names = {"uncond": ["README.md", "config.json", "model-guide.safetensors", "model.safetensors", "samples.png"],
             "cond": ["README.md", "config.json", "model.safetensors", "samples.png"]}[variant]
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == names
    for source, name in ((models[variant], "file"), (tmp_path / "exported", "folder")):
        assert main(["sample", "--model", str(source), "--num", "4", "--steps", "3", "--device", "cpu", *guidance,
                     "--out", f"{name}.png", "--save-array", f"{name}.npz"]) == 0
        assert main(["sample", "--model", str(source), "--num", "4", "--steps", "3", "--device", "cpu",
                     "--out", f"{name}-plain.png"]) == 0
    assert (tmp_path / "folder.png").read_bytes() == (tmp_path / "file.png").read_bytes()
    np.testing.assert_array_equal(np.load(tmp_path / "folder.npz")["images"], np.load(tmp_path / "file.npz")["images"])
    # samples.png is the grid of the command its card gives
    assert (tmp_path / "exported/samples.png").read_bytes() == (tmp_path / "file-plain.png").read_bytes()
    card = (tmp_path / "exported/README.md").read_text()
    assert "`ddpm sample --model exported --num 4 --seed 0 --steps 3`" in card


def test_an_exported_folder_loads_without_unpickling_anything(models, tmp_path, monkeypatch):
    export(models["cond"])
    expected, _, _ = load_model(models["cond"])

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")
    monkeypatch.setattr(torch, "load", refuse)
    model, diffusion, meta = load_model(tmp_path / "exported")
    assert meta["class_names"] == CLASS_NAMES and meta["variant"] == "cond"
    assert model.config == expected.config and diffusion.timesteps == 20
    for (name, a), (_, b) in zip(model.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(a, b), name
    config = json.loads((tmp_path / "exported/config.json").read_text())
    assert config["format"] == "ddpm-export-v1" and config["class_names"] == CLASS_NAMES and config["guide"] is None


def test_the_card_gives_the_params_and_the_fid_table_when_given(models, tmp_path):
    params = {"profile": "laptop", "seed": 0, "data": {"name": "glyphs"}, "train": {"epochs": 1},
              "train_cond": {"p_uncond": 0.1}, "sample": {"eta": [0.0]}}
    floor = {"fid": 2.0, "is_mean": 3.0, "cond_accuracy": 0.99}
    scores = {"cond": {"ddim5_eta0_w1": {"fid": 9.0, "fid_over_floor": 4.5, "is_mean": 2.5, "cond_accuracy": 0.8},
                       "dpmsolver5_w1": {"fid": 5.0, "fid_over_floor": 2.5, "is_mean": 2.75, "cond_accuracy": 0.9}},
              "floor": {"classifier": floor}, "protocol": {"num_generated": 40, "num_real": 100, "dataset": "glyphs"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "eval.json").write_text(json.dumps(scores))
    export(models["cond"], "with", "--params", "params.yaml", "--metrics", "eval.json")
    card = (tmp_path / "with/README.md").read_text()
    assert "trained on glyphs; classes: zero, one, two" in card
    assert "train_cond: {p_uncond: 0.1}" in card and "sample:" not in card  # training params only
    table = [line for line in card.splitlines() if line.startswith("| dpmsolver5_w1")
             or line.startswith("| ddim5_eta0_w1") or line.startswith("| floor")]
    assert table == ["| dpmsolver5_w1 | 5.000 | 2.50 | 2.750 | 0.900 |",  # best first
                     "| ddim5_eta0_w1 | 9.000 | 4.50 | 2.500 | 0.800 |",
                     "| floor (real train images) | 2.000 | 1.00 | 3.000 | 0.990 |"]
    export(models["cond"], "without")
    card = (tmp_path / "without/README.md").read_text()
    assert "## Evaluation" not in card and "Params not given" in card


def test_the_card_opens_with_the_metadata_a_model_hub_reads(models, tmp_path):
    """Parsed by the Hugging Face Hub's own reader: license, tags, datasets and the best setting's scores."""
    from huggingface_hub import ModelCard

    scores = {"uncond": {"ddim5_ag1": {"fid": 9.0, "fid_over_floor": 4.5, "is_mean": 2.5},
                         "dpmsolver5_ag1": {"fid": 5.0, "fid_over_floor": 2.5, "is_mean": 2.75}},
              "floor": {"classifier": {"fid": 2.0}}, "protocol": {"dataset": "fashion_mnist"}}
    (tmp_path / "eval.json").write_text(json.dumps(scores))
    export(models["uncond"], "scored", "--metrics", "eval.json", "--license", "mit")
    card = ModelCard((tmp_path / "scored/README.md").read_text())
    assert card.data.license == "mit" and card.data.datasets == ["zalando-datasets/fashion_mnist"]
    assert {"diffusion", "ddpm", "unconditional", "safetensors"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "unconditional-image-generation"
    results = {r.metric_type: r for r in card.data.eval_results}
    assert {k: r.metric_value for k, r in results.items()} == {"fid": 5.0, "fid_over_floor": 2.5,
                                                                 "inception_score": 2.75}
    assert "dpmsolver5_ag1" in results["fid"].metric_name and results["fid"].dataset_split == "test"
    assert card.text.lstrip().startswith("# ddpm-uncond")
    export(models["cond"], "plain")
    card = ModelCard((tmp_path / "plain/README.md").read_text())
    assert card.data.license == "unknown" and "class-conditional" in card.data.tags and not card.data.eval_results


def corrupt(folder, case: str) -> None:
    weights = folder / "model.safetensors"
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif case == "not safetensors":
        weights.write_bytes(b"PK\x03\x04 a zip, say, or a pickle renamed")
    elif case == "empty":
        weights.write_bytes(b"")
    elif case == "config missing":
        (folder / "config.json").unlink()
    else:  # a tensor of the wrong shape
        from safetensors.torch import load_file, save_file
        state = load_file(weights)
        state[next(iter(state))] = torch.zeros(1)
        save_file(state, weights)


@pytest.mark.parametrize("case, words", [("truncated", ["model.safetensors", "safetensors"]),
                                         ("not safetensors", ["model.safetensors", "safetensors"]),
                                         ("empty", ["model.safetensors"]),
                                         ("config missing", ["config.json", "no such file"]),
                                         ("wrong shape", ["model.safetensors", "does not match its config"])])
def test_a_damaged_export_is_one_error_line(models, tmp_path, capsys, case, words):
    export(models["uncond"])
    corrupt(tmp_path / "exported", case)
    capsys.readouterr()
    assert main(["sample", "--model", "exported", "--out", "out/x.png", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


def test_a_damaged_export_in_a_real_process_is_one_line_without_traceback(models, tmp_path):
    export(models["uncond"])
    corrupt(tmp_path / "exported", "truncated")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's ddpm
    proc = subprocess.run([sys.executable, "-m", "ddpm", "sample", "--model", "exported", "--device", "cpu"],
                          cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and "exported/model.safetensors" in proc.stderr


def test_export_replaces_an_earlier_export_but_no_other_folder(models, tmp_path, capsys):
    export(models["cond"])
    export(models["uncond"])  # over the earlier export
    assert json.loads((tmp_path / "exported/config.json").read_text())["meta"]["variant"] == "uncond"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    (tmp_path / "bad.yaml").write_text("a: [unclosed")
    capsys.readouterr()
    for args, words in ((["--out", "mine"], ["--out mine", "not an export folder"]),
                        (["--out", "new", "--params", "bad.yaml"], ["bad.yaml"]),
                        (["--out", "new", "--metrics", "missing.json"], ["missing.json"])):
        assert main(["export", "--model", str(models["cond"]), "--device", "cpu", *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"] and not (tmp_path / "new").exists()
    assert not list(tmp_path.glob(".*tmp*"))


_EXPORTS: dict[str, Path] = {}


def fresh_export(models, tmp_path_factory, tmp_path) -> Path:
    """A copy of one export of the conditional model (exported once per session) in tmp_path/exported."""
    if not _EXPORTS:
        folder = tmp_path_factory.mktemp("export")
        export(models["cond"], str(folder / "exported"))
        _EXPORTS["cond"] = folder / "exported"
    return Path(shutil.copytree(_EXPORTS["cond"], tmp_path / "exported"))


def sample_error(capsys, tmp_path) -> str:
    """`ddpm sample` of tmp_path/exported: its one error line (and nothing written)."""
    capsys.readouterr()
    assert main(["sample", "--model", "exported", "--out", "out/x.png", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert not (tmp_path / "out").exists()
    return err


BAD_CONFIGS = {  # name: (a change to config.json, the words of the error line)
    "timesteps 10^10": (lambda c: c["diffusion"].update(timesteps=10**10),
                        ["exported/config.json: diffusion.timesteps = 10000000000 is out of range; allowed: in [1, "]),
    "timesteps -5": (lambda c: c["diffusion"].update(timesteps=-5),
                     ["exported/config.json: diffusion.timesteps = -5 is out of range"]),
    "timesteps a string": (lambda c: c["diffusion"].update(timesteps="1000"),
                           ["exported/config.json: diffusion.timesteps must be int, got '1000'"]),
    "unet a list": (lambda c: c.update(unet=[1, 2]),
                    ["exported/config.json: unet must be a mapping of UNetConfig's fields, got [1, 2]"]),
    "no unet": (lambda c: c.pop("unet"), ["exported/config.json: no 'unet' field"]),
    "unknown unet field": (lambda c: c["unet"].update(width=3), ["exported/config.json: unet.width is not a field"]),
    "mults with a string": (lambda c: c["unet"].update(channel_mults=[1, "2"]),
                            ["exported/config.json: unet.channel_mults[1] must be int, got '2'"]),
    "no schedule": (lambda c: c["diffusion"].update(schedule="quadratic"),
                    ["exported/config.json: diffusion.schedule = 'quadratic' is out of range"]),
    "NaN beta": (lambda c: c["diffusion"].update(beta_start=float("nan")),
                 ["exported/config.json: diffusion.beta_start must be a finite number, got nan"]),
    "guide a number": (lambda c: c.update(guide=5), ["exported/config.json: guide must be null or a mapping"]),
    "class names of another model": (lambda c: c.update(class_names=["a"]),
                                     ["exported/config.json: class_names must be a list of 3 names or null"]),
    "base 3000 over base-8 weights": (lambda c: c["unet"].update(base_channels=3000),
                                      ["exported/model.safetensors: does not match its config (config.json: "
                                       "time_embed.0.weight is 12000 x 3000 in the config, 32 x 8 in the weights)"]),
    "one more level": (lambda c: c["unet"].update(channel_mults=[1, 2, 2]),
                       ["exported/model.safetensors: does not match its config (config.json: "]),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_a_bad_config_json_is_one_line_before_any_network_is_built(models, tmp_path_factory, tmp_path, capsys,
                                                                  monkeypatch, case):
    """config.json is checked, and the network it describes matched against the weights' shapes in the
    safetensors header, before anything is allocated from it (base_channels 3000 would be gigabytes)."""
    folder = fresh_export(models, tmp_path_factory, tmp_path)
    change, words = BAD_CONFIGS[case]
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))

    def no_network(config):
        raise AssertionError(f"a network was built from a bad config.json: {config}")
    monkeypatch.setattr(checkpoint, "make_unet", no_network)
    err = sample_error(capsys, tmp_path)
    assert all(w in err for w in words), err


def test_an_export_whose_weights_are_nan_is_one_line_not_black_images(models, tmp_path_factory, tmp_path, capsys):
    folder = fresh_export(models, tmp_path_factory, tmp_path)
    weights = load_file(folder / "model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, folder / "model.safetensors")
    err = sample_error(capsys, tmp_path)
    assert "exported/model.safetensors: weight " in err and "NaN" in err, err
