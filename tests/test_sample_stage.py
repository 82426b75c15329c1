"""The sample stages' DVC params: each sampler's stage lists every sample key that changes what it
writes, so that DVC never keeps stale samples, and DVC reruns it for no other key."""

import dataclasses
import json
import types

import pytest
import torch
import yaml
from helpers import ROOT, merge
from test_cli import tiny_models

from ddpm import Autocast, generate, load_model
from stages import sample
from stages.pipeline.params import validate
from stages.pipeline.tracking import Tracker

BASE = {"methods": ["ddpm", "ddim", "dpmsolver"], "num_samples": 6, "batch_size": 6, "ddpm_steps": [5],
        "ddim_steps": [2], "eta": [0.0], "dpmsolver_steps": [2], "spacing": "uniform", "guidance": [1.0],
        "autoguidance": [0.0], "guidance_interval": None, "autoguidance_interval": None, "clip_x0": False,
        "grid_size": 4, "precision": "fp32", "sigma_rel": [None]}
CHANGED = {"num_samples": 4, "batch_size": 2, "ddpm_steps": (3,), "ddim_steps": (3,), "eta": (0.5,),
           "dpmsolver_steps": (3,), "spacing": "trailing", "guidance": (3.0,), "autoguidance": (2.0,), "clip_x0": True,
           "guidance_interval": (0.5, 3.0), "autoguidance_interval": (0.5, 3.0), "grid_size": 2, "precision": "bf16",
           "sigma_rel": (0.1,)}


def params(sample: dict):
    """The repository's params.yaml with this sample section."""
    return validate(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), {"sample": sample}))


def dvc_params(method: str, variant: str) -> set[str]:
    """The sample.* keys that dvc.yaml's sample-METHOD@VARIANT stage depends on."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][f"sample-{method}"]
    item = stage["foreach"][variant]
    keys = [k.replace("${item.guidance}", item["guidance"]).replace("${item.interval}", item["interval"])
            for k in stage["do"]["params"]]
    assert not any("${" in k for k in keys), keys
    return {k.removeprefix("sample.") for k in keys if k.startswith("sample.")}


def outputs(model, out, variant: str, method: str, **changes) -> dict:
    """What the stage writes (image tensors, index.json without timings and batch size, grid PNGs) with these
    sample params."""
    p = params(BASE)
    p = dataclasses.replace(p, sample=dataclasses.replace(p.sample, **changes))
    args = types.SimpleNamespace(model=model, out=out, variant=variant, method=method)
    sample.sample(args, p, Tracker(None, None, None))
    written = {}
    for f in sorted(out.iterdir()):
        if f.suffix == ".pt":
            written[f.name] = {k: v.tolist() for k, v in torch.load(f, weights_only=True).items()}
        elif f.name == "index.json":
            written[f.name] = [{k: v for k, v in s.items() if k not in ("seconds", "images_per_second", "batch_size")}
                               for s in json.loads(f.read_text())]
        else:
            written[f.name] = f.read_bytes()
    return written


def test_the_cases_cover_every_sample_key():
    assert set(BASE) == {*CHANGED, "methods"} == {f.name for f in dataclasses.fields(params(BASE).sample)}


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpmsolver"])
@pytest.mark.parametrize("variant", ["uncond", "cond"])
def test_sample_stage_depends_on_exactly_the_keys_that_change_its_output(tmp_path_factory, tmp_path, variant,
                                                                          method):
    model = tiny_models(tmp_path_factory)[variant]
    listed = dvc_params(method, variant)
    before = outputs(model, tmp_path / "base", variant, method)
    changes = CHANGED | {"methods": tuple(m for m in BASE["methods"] if m != method)}  # all but this one
    changed = {key for key, value in changes.items()
               if outputs(model, tmp_path / key, variant, method, **{key: value}) != before}
    assert changed <= listed, f"sample-{method}@{variant} reads {changed - listed} but dvc.yaml does not list them"
    # listed but without effect: batching does not change the images (each sample has its own noise)
    assert listed - changed <= {"batch_size"}


def test_a_left_out_method_writes_an_empty_index_without_loading_the_model(tmp_path, capsys):
    p = params({**BASE, "methods": ["ddim"]})
    args = types.SimpleNamespace(model=tmp_path / "no-model.pt", out=tmp_path / "out", variant="cond",
                                 method="ddpm")
    sample.sample(args, p, Tracker(None, None, None))  # loading the missing model would raise
    assert [f.name for f in args.out.iterdir()] == ["index.json"]
    assert json.loads((args.out / "index.json").read_text()) == []
    assert "cond ddpm: not in sample.methods, nothing to sample" in capsys.readouterr().out


def test_a_null_batch_size_is_sized_for_the_device_and_the_images_stay_the_same(tmp_path_factory, tmp_path, capsys):
    model = tiny_models(tmp_path_factory)["cond"]
    auto = outputs(model, tmp_path / "auto", "cond", "ddim", batch_size=None)
    assert auto == outputs(model, tmp_path / "fixed", "cond", "ddim", batch_size=2)
    index = json.loads((tmp_path / "auto/index.json").read_text())
    assert [s["batch_size"] for s in index] == [6]  # on the CPU: CPU_SAMPLE_BATCH, at most sample.num_samples
    out = capsys.readouterr()
    assert "cond ddim2_eta0_w1: 6 images in batches of 6 on cpu" in out.out
    assert "img/s" in out.err or "img/s" in out.out  # the progress bar counts images: images/s and an ETA


def test_on_the_cpu_a_batch_is_cpu_sample_batch_images_at_most():
    from stages.pipeline.bounds import CPU_SAMPLE_BATCH, sample_batch_size

    net = types.SimpleNamespace(config=types.SimpleNamespace(num_classes=None, sample_shape=(1, 28, 28)))
    assert sample_batch_size(net, torch.device("cpu"), 50_000, guided=True) == CPU_SAMPLE_BATCH == 250
    assert sample_batch_size(net, torch.device("cpu"), 40, guided=False) == 40


def test_each_ema_length_samples_its_reconstructed_weights_at_the_recorded_precision(tmp_path_factory, tmp_path):
    model = tiny_models(tmp_path_factory)["uncond"]
    written = outputs(model, tmp_path / "out", "uncond", "dpmsolver", sigma_rel=(None, 0.1), precision="bf16")
    assert [(s["tag"], s["sigma_rel"], s["precision"]) for s in written["index.json"]] == [
        ("dpmsolver2", None, "bf16"), ("dpmsolver2_ema0.1", 0.1, "bf16")]
    for tag, sigma_rel in (("dpmsolver2", None), ("dpmsolver2_ema0.1", 0.1)):
        net, diffusion, _ = load_model(model, sigma_rel=sigma_rel)
        expected = generate(Autocast(net, "bf16"), diffusion, 6, (1, 28, 28), seed=0, method="dpmsolver", steps=2)
        assert written[f"{tag}.pt"]["images"] == expected.tolist(), tag
