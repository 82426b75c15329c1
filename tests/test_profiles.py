"""Profiles: one value per key in force, in params.yaml; switching keeps what a user changed."""

import shutil

import pytest
import yaml
from helpers import ROOT

from stages.pipeline.params import ParamsError, validate
from stages.pipeline.profiles import apply_profile, read_profiles, rewrite_params
from stages.pipeline.tracking import flatten

PROFILES = read_profiles(ROOT / "profiles.yaml")


def test_params_yaml_holds_the_laptop_profile_it_names():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["profile"] == "laptop" and set(PROFILES) == {"laptop", "gpu", "paper"}
    flat = flatten(params)
    assert {k: flat[k] for k in PROFILES["laptop"]} == PROFILES["laptop"]


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_gives_valid_params(name):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    changed, kept = apply_profile(params, PROFILES, name)
    assert not kept and validate({**params, "profile": name}).profile == name
    assert (name == "laptop") == (not changed)


def test_switching_writes_the_profile_and_back_restores_the_file_byte_for_byte(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    changed, kept = rewrite_params(path, "paper", ROOT / "profiles.yaml")
    assert changed["diffusion.schedule"] == "linear" and changed["sample.ddim_steps"] == [5, 10, 20, 50] and not kept
    text = path.read_text()
    assert "schedule: linear      # linear (Ho et al. 2020) | cosine" in text  # comments stay
    assert "  ddim_steps: [5, 10, 20, 50]\n" in text  # lists stay on one line
    rewrite_params(path, "laptop", ROOT / "profiles.yaml")
    assert path.read_text() == (ROOT / "params.yaml").read_text()


def test_a_value_changed_by_hand_is_kept_and_reported():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["lr"], params["model"]["patch_size"] = 5e-4, 2  # one key a profile sets, one no profile sets
    changed, kept = apply_profile(params, PROFILES, "gpu")
    assert kept == {"train.lr": 5e-4} and "train.lr" not in changed
    assert params["train"]["lr"] == 5e-4 and params["model"]["patch_size"] == 2
    assert params["model"]["base_channels"] == PROFILES["gpu"]["model.base_channels"]
    changed, kept = apply_profile(params, PROFILES, "laptop")  # and back: still yours
    assert kept == {"train.lr": 5e-4} and params["model"]["base_channels"] == 32


def test_an_unknown_profile_names_the_valid_ones():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    with pytest.raises(ParamsError, match=r"^params.yaml: profile = 'tpu' is not a profile; valid: laptop, gpu, "
                                          r"paper$"):
        apply_profile(params, PROFILES, "tpu")
    with pytest.raises(ParamsError, match="profile = 'tpu' is out of range; allowed: one of laptop, gpu, paper"):
        validate({**params, "profile": "tpu"})


def test_profiles_must_set_the_same_keys(tmp_path):
    (tmp_path / "profiles.yaml").write_text("a: {train: {lr: 1}}\nb: {train: {epochs: 2}}\n")
    with pytest.raises(ParamsError, match="profile 'b' and profile 'a' differ in the keys they set: train.epochs"):
        read_profiles(tmp_path / "profiles.yaml")
