"""Profiles: one value per key in force, in params.yaml; switching keeps what a user changed, knowing it from
the profile stage's record rather than guessing; params.yaml stays valid whatever layout DVC's -S left."""

import json
import re
import shutil
import subprocess

import pytest
import yaml
from dvc.utils.hydra import apply_overrides
from helpers import ROOT, make_repo, run

from stages.pipeline import profiles as profiles_module
from stages.pipeline.keys import flatten
from stages.pipeline.params import ParamsError, validate
from stages.pipeline.profiles import committed_profile, read_profiles, read_record, rewrite_params, switch, unrecorded

PROFILES = read_profiles(ROOT / "profiles.yaml")
LAPTOP = unrecorded(PROFILES, "laptop")


def with_values(params: dict, values: dict) -> dict:
    """params.yaml's mapping with the flat `values` written in."""
    out = json.loads(json.dumps(params))
    for key, value in values.items():
        section, name = key.split(".")
        out[section][name] = value
    return out


def test_params_yaml_holds_the_laptop_profile_it_names_and_the_committed_record_says_so():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["profile"] == "laptop" and set(PROFILES) == {"laptop", "gpu", "paper", "cifar10"}
    flat = flatten(params)
    assert {k: flat[k] for k in PROFILES["laptop"]} == PROFILES["laptop"]
    # the record a fresh clone starts from: laptop's values written, none of them a user's
    assert read_record(ROOT / "data/profile.json", PROFILES) == LAPTOP


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_gives_valid_params(name):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    result = switch(flatten(params), PROFILES, name, LAPTOP)
    assert not result.yours and result.record == {"profile": name, "values": PROFILES[name], "yours": {}}
    assert validate({**with_values(params, result.set), "profile": name}).profile == name
    assert (name == "laptop") == (not result.set)


def test_switching_writes_the_profile_and_back_restores_the_file_byte_for_byte(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    result, kept_comments = rewrite_params(path, PROFILES, LAPTOP)
    assert result.set == {} and kept_comments and path.read_text() == (ROOT / "params.yaml").read_text()
    path.write_text(path.read_text().replace("profile: laptop", "profile: paper"))
    result, _ = rewrite_params(path, PROFILES, LAPTOP)
    assert result.set["diffusion.schedule"] == "linear" and result.set["sample.ddim_steps"] == [5, 10, 20, 50]
    text = path.read_text()
    assert "schedule: linear      # linear (Ho et al. 2020) | cosine" in text  # comments stay
    assert "  ddim_steps: [5, 10, 20, 50]\n" in text  # lists stay on one line
    path.write_text(text.replace("profile: paper", "profile: laptop"))
    rewrite_params(path, PROFILES, result.record)
    assert path.read_text() == (ROOT / "params.yaml").read_text()


def aligned(text: str) -> str:
    """The text with comments one space after their values (a value that outgrew a comment's column pushed it)."""
    return re.sub(r" +#", " #", text)


@pytest.mark.parametrize("route", [["gpu", "laptop"], ["paper", "gpu", "laptop"]])
def test_after_dvcs_own_rewrite_for_set_param_the_file_stays_valid_and_comes_back(tmp_path, route):
    """`dvc exp run -S profile=...` first writes params.yaml in DVC's layout (block lists, empty nulls, comments
    moved): the profile stage's rewrite of that once joined two lines into `evaluate: batch_size: 250`."""
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    record = LAPTOP
    for name in route:
        apply_overrides(str(path), [f"profile={name}"])  # what DVC does for -S, with DVC's own writer
        assert "  - " in path.read_text()  # DVC's layout
        result, kept_comments = rewrite_params(path, PROFILES, record)
        params = flatten(yaml.safe_load(path.read_text()))
        assert kept_comments and {k: params[k] for k in PROFILES[name]} == PROFILES[name] and not result.yours
        record = result.record
    assert aligned(path.read_text()) == aligned((ROOT / "params.yaml").read_text())


def test_a_rewrite_that_does_not_read_back_is_written_without_comments_never_corrupt(tmp_path, monkeypatch):
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    path.write_text(path.read_text().replace("profile: laptop", "profile: gpu"))
    dump = profiles_module._dump
    def joined(tree):  # the joined lines the issue showed, whenever comments are there
        text = dump(tree)
        return text.replace("evaluate:\n  protocol", "evaluate: protocol") if "#" in text else text
    monkeypatch.setattr(profiles_module, "_dump", joined)
    result, kept_comments = rewrite_params(path, PROFILES, LAPTOP)
    text = path.read_text()
    assert not kept_comments and "#" not in text and "  ddim_steps: [5, 10, 20, 50]\n" in text
    params = flatten(yaml.safe_load(text))
    assert {k: params[k] for k in PROFILES["gpu"]} == PROFILES["gpu"] and params["evaluate.batch_size"] == 250
    assert validate(yaml.safe_load(text)).profile == "gpu"


def test_hand_values_that_equal_another_profiles_are_yours_both_ways():
    params = flatten(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params.update({"train.lr": 0.001, "sample.guidance_interval": None})  # both are gpu's values
    to_gpu = switch(params, PROFILES, "gpu", LAPTOP)
    assert to_gpu.yours == {"train.lr": 0.001, "sample.guidance_interval": None}
    assert to_gpu.set["model.base_channels"] == 128 and len(to_gpu.set) == 18
    params.update(to_gpu.set)
    back = switch(params, PROFILES, "laptop", to_gpu.record)
    assert back.yours == to_gpu.yours and back.set["model.base_channels"] == 32
    params.update(back.set)
    assert {k: params[k] for k in PROFILES["laptop"]} == {**PROFILES["laptop"], **to_gpu.yours}


def test_a_value_set_on_the_command_is_yours_even_when_it_equals_the_one_written():
    params = flatten(yaml.safe_load((ROOT / "params.yaml").read_text()))  # train.lr 0.002, laptop's
    assert switch(params, PROFILES, "gpu", LAPTOP).set["train.lr"] == 0.001
    result = switch(params, PROFILES, "gpu", LAPTOP, overridden={"train.lr", "profile"})
    assert result.yours == {"train.lr": 0.002} and "train.lr" not in result.set


def test_a_value_set_back_to_the_profiles_own_follows_the_profiles_again():
    params = flatten(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["train.lr"] = 5e-4
    mine = switch(params, PROFILES, "laptop", LAPTOP)
    assert mine.yours == {"train.lr": 5e-4}
    params["train.lr"] = 0.002  # laptop's again, by hand
    assert switch(params, PROFILES, "gpu", mine.record).set["train.lr"] == 0.001


def test_records_old_form_corrupt_and_missing(tmp_path):
    path = tmp_path / "profile.json"
    assert read_record(path, PROFILES) is None
    path.write_text(json.dumps({"profile": "gpu", "kept": {"train.lr": 5e-4}}))  # what earlier versions wrote
    old = read_record(path, PROFILES)
    assert old["yours"] == {"train.lr": 5e-4} and old["values"] == {**PROFILES["gpu"], "train.lr": 5e-4}
    path.write_text('{"profile": ')
    with pytest.raises(ParamsError, match=r"^.*profile.json: not a record of the profile stage; delete it"):
        read_record(path, PROFILES)


def test_without_a_record_the_committed_params_name_the_profile_in_force(tmp_path):
    path = tmp_path / "params.yaml"
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    gpu = with_values(params, PROFILES["gpu"])
    path.write_text(yaml.safe_dump({**gpu, "profile": "gpu"}))
    assert committed_profile(path, PROFILES, flatten(gpu)) == "gpu"  # no git: the profile it holds most of
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "gpu"]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    path.write_text(yaml.safe_dump({**with_values(gpu, {"train.lr": 0.002}), "profile": "paper"}))  # hand + -S
    result, _ = rewrite_params(path, PROFILES, None)
    assert result.previous == "gpu" and result.yours == {"train.lr": 0.002}


@pytest.mark.parametrize("name", ["tpu", ["laptop"], 3])
def test_a_name_that_is_not_a_profile_is_one_line_naming_the_valid_ones(tmp_path, name):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text().replace("profile: laptop", f"profile: {json.dumps(name)}"))
    before = path.read_text()
    with pytest.raises(ParamsError, match=rf"^params.yaml: profile = {name!r} is not a profile; valid: laptop, "
                                          r"gpu, paper, cifar10$".replace("[", r"\[").replace("]", r"\]")):
        rewrite_params(path, PROFILES, LAPTOP)
    assert path.read_text() == before
    with pytest.raises(ParamsError, match="profile = 'tpu' is out of range; allowed: one of laptop, gpu, paper, "
                                          "cifar10"):
        validate({**yaml.safe_load(before), "profile": "tpu"})


def test_profiles_must_set_the_same_keys(tmp_path):
    (tmp_path / "profiles.yaml").write_text("a: {train: {lr: 1}}\nb: {train: {epochs: 2}}\n")
    with pytest.raises(ParamsError, match="profile 'b' and profile 'a' differ in the keys they set: train.epochs"):
        read_profiles(tmp_path / "profiles.yaml")


def exp_run(repo, *args: str, check: bool = True):
    """`dvc exp run` of the profile stage alone, in the workspace; stdout + stderr and the exit code."""
    proc = run(["dvc", "exp", "run", *args, "profile"], repo, check=check)
    return proc.stdout + proc.stderr, proc.returncode


@pytest.mark.slow
def test_switches_by_dvc_exp_run_in_the_workspace_keep_the_file_valid_and_your_values(tmp_path):
    """Through DVC's own -S, which rewrites params.yaml in its layout before the stage runs: there and back and
    there again, with two hand values that equal gpu's, then a -S value on the same command as the switch."""
    repo = make_repo(tmp_path / "repo", {})
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")  # the project's layout, comments and all
    run(["git", "commit", "-qam", "params.yaml as the project has it"], repo)
    before, train = (ROOT / "params.yaml").read_text().split("\ntrain:\n")
    edited = (before + "\ntrain:\n" + train.replace("\n  lr: 0.002\n", "\n  lr: 0.001\n", 1)).replace(
        "guidance_interval: [0.28, 5.42]", "guidance_interval: null")
    (repo / "params.yaml").write_text(edited)
    yours = {"train.lr": 0.001, "sample.guidance_interval": None}

    def in_force() -> dict:
        params = flatten(yaml.safe_load((repo / "params.yaml").read_text()))
        return {k: params[k] for k in PROFILES["laptop"]}

    out, _ = exp_run(repo, "-n", "to-gpu", "-S", "profile=gpu")
    assert in_force() == {**PROFILES["gpu"], **yours}
    assert "kept train.lr = 0.001" in out and "kept sample.guidance_interval = None" in out
    assert "schedule: cosine      # linear (Ho et al. 2020) | cosine" in (repo / "params.yaml").read_text()
    record = json.loads((repo / "data/profile.json").read_text())
    assert record["profile"] == "gpu" and record["yours"] == yours
    ref = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).stdout.split()
    committed = run(["git", "show", f"{next(r for r in ref if r.endswith('/to-gpu'))}:data/profile.json"], repo)
    assert json.loads(committed.stdout) == record  # the experiment's commit holds its record

    out, _ = exp_run(repo, "-S", "profile=laptop")
    assert in_force() == {**PROFILES["laptop"], **yours} and "kept sample.guidance_interval = None" in out
    assert aligned((repo / "params.yaml").read_text()) == aligned(edited)  # DVC's layout undone, yours kept

    out, _ = exp_run(repo, "-S", "profile=gpu", "-S", "train.lr=0.002")  # laptop's value, but said on the command
    assert in_force() == {**PROFILES["gpu"], **yours, "train.lr": 0.002} and "kept train.lr = 0.002" in out

    record = (repo / "data/profile.json").read_text()
    out, code = exp_run(repo, "-S", "profile=[laptop]", check=False)
    assert code != 0 and ("error: params.yaml: profile = ['laptop'] is not a profile; valid: laptop, gpu, paper, "
                          "cifar10") in out
    assert "Traceback" not in out and (repo / "data/profile.json").read_text() == record


def test_the_laptop_profile_keeps_the_fast_protocol_and_the_others_score_the_papers_way():
    protocols = {name: (p["evaluate.protocol"], p["sample.num_samples"]) for name, p in PROFILES.items()}
    assert protocols == {"laptop": ("fast", 1000), "gpu": ("standard", 10_000), "paper": ("standard", 50_000),
                         "cifar10": ("standard", 50_000)}


def test_the_cifar10_profile_is_ho_et_als_35_7m_parameter_unet_on_cifar10():
    import torch

    from ddpm import UNet

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    p = validate({**with_values(params, PROFILES["cifar10"]), "profile": "cifar10"})
    assert p.data.name == "cifar10" and p.diffusion.schedule == "linear" and p.diffusion.prediction == "eps"
    with torch.device("meta"):
        unet = UNet(p.model.unet(3, 32, None))
    assert round(sum(w.numel() for w in unet.parameters()) / 1e6, 1) == 35.7  # Ho et al. 2020, table 1
    assert unet.config.channel_mults == (1, 2, 2, 2) and unet.config.attention_resolutions == (16,)
    assert (p.train.batch_size, p.train.lr, p.train.ema_decay, p.train_uncond.steps) == (128, 2e-4, 0.9999, 800_000)
    text = (ROOT / "profiles.yaml").read_text()
    assert "3.17 with DDPM over all 1000 steps (Ho et al. 2020, table 1" in text  # the FID to expect, and whence
