"""Your own images end to end: a folder of RGB PNGs of odd sizes through the whole pipeline at 32 px, with the
cifar10 profile (its network layout and the standard protocol) at toy size."""

import json

import numpy as np
import pytest
import torch
import yaml
from helpers import ROOT, TINY, make_image_folder, make_repo, merge, run, stages_run

from ddpm import load_model

pytestmark = pytest.mark.slow


def folder_config(root) -> dict:
    return merge(TINY, {
        "data": {"name": "imagefolder", "root": str(root), "image_size": 32, "limit": None, "test_limit": None},
        "model": {"channel_mults": None, "attention_resolutions": None},  # the defaults that follow the size
        "classifier": {"epochs": 2},
        "train": {"epochs": 1, "batch_size": 18},
        "sample": {"num_samples": 12, "batch_size": 12, "ddpm_steps": [5], "ddim_steps": [5]},  # DDPM: a strided chain
    })


@pytest.fixture(scope="module")
def folder_repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imagefolder")
    root = make_image_folder(tmp / "shapes", per_class=30)
    repo = make_repo(tmp / "repo", folder_config(root))
    params = repo / "params.yaml"  # switched to the cifar10 profile by hand: the toy sizes, yours, are kept
    params.write_text(params.read_text().replace("profile: laptop\n", "profile: cifar10\n"))
    proc = run(["dvc", "repro"], repo)
    return repo, proc.stdout + proc.stderr


def test_every_stage_runs_on_rgb_images_at_32px(folder_repo):
    repo, output = folder_repo
    assert {"prepare", "classifier", "train@uncond", "train@cond", "evaluate", "visualize"} <= stages_run(output)
    info = json.loads((repo / "data/prepared/info.json").read_text())
    assert info["shape"] == [3, 32, 32] and info["class_names"] == ["circle", "square"]
    assert info["train_count"] == 54 and info["test_count"] == 6
    model, _, meta = load_model(repo / "models/cond/model.pt")
    assert "profile cifar10:" in output and "kept model.base_channels = 8" in output
    assert model.config.channel_mults == (1, 2, 2, 2) and model.config.attention_resolutions == (16,)
    assert model.config.num_classes == 2 and model.config.num_res_blocks == 2
    assert meta["class_names"] == ["circle", "square"]
    for variant, tag in [("uncond", "ddim5_eta0"), ("cond", "ddim5_eta0_w1")]:
        images = torch.load(repo / f"samples/{variant}/ddim/{tag}.pt", weights_only=True)["images"]
        assert images.shape == (12, 3, 32, 32) and images.dtype == torch.uint8
    scores = json.loads((repo / "metrics/eval.json").read_text())
    assert scores["cond"]["ddim5_eta0_w1"]["fid"] >= 0
    protocol = scores["protocol"]  # FID against the statistics of all 54 training images; the 6 test ones the floor
    assert (protocol["name"], protocol["num_real"], protocol["num_floor"]) == ("standard", 54, 6)
    summary = json.loads((repo / "metrics/eval_summary.json").read_text())
    assert set(summary) == {"standard-12"} and summary["standard-12"]["inception"] == "unavailable (offline)"
    assert (repo / "plots/pictures/cond_classes.png").is_file()


def test_cli_draws_the_rgb_model(folder_repo, tmp_path):
    repo, _ = folder_repo
    run(["ddpm", "sample", "--model", "models/cond/model.pt", "--num", "4", "--steps", "3",
         "--save-array", str(tmp_path / "s.npz"), "--out", str(tmp_path / "s.png")], repo)
    assert np.load(tmp_path / "s.npz")["images"].shape == (4, 3, 32, 32)


@pytest.mark.parametrize("classes, have", [((), "no classes"), (("circle",), "only class 'circle'")])
def test_conditional_stages_refuse_folders_without_two_classes(tmp_path, classes, have):
    root = make_image_folder(tmp_path / "photos", per_class=10, classes=classes)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                                                               folder_config(root))))
    env = {"PYTHONPATH": str(ROOT), "DDPM_TRACKING": "off"}
    run("python -m stages.prepare data/prepared", tmp_path, env=env)
    for cmd, who in [("python -m stages.train cond --data data/prepared --checkpoints checkpoints/cond "
                      "--out models/cond --metrics m.json --plot p.csv", "conditional training"),
                     ("python -m stages.classifier --data data/prepared --out models/classifier --metrics c.json",
                      "the classifier behind FID/IS")]:
        proc = run(cmd, tmp_path, check=False, env=env)
        assert proc.returncode == 1
        assert proc.stderr.strip().startswith(f"error: {who} needs at least 2 classes but the prepared data has {have}")
    assert not (tmp_path / "models").exists() and not (tmp_path / "checkpoints").exists()


def test_unlabelled_folder_trains_and_samples_unconditionally(tmp_path):
    root = make_image_folder(tmp_path / "photos", per_class=20, classes=())
    repo = make_repo(tmp_path / "repo", folder_config(root))
    samplers = ["sample-ddpm@uncond", "sample-ddim@uncond", "sample-dpmsolver@uncond"]
    proc = run(["dvc", "repro", *samplers], repo)  # what the refusal suggests
    assert stages_run(proc.stdout) == {"profile", "check", "prepare", "init-from", "train@uncond", *samplers}
    images = torch.load(repo / "samples/uncond/ddim/ddim5_eta0.pt", weights_only=True)["images"]
    assert images.shape == (12, 3, 32, 32)
