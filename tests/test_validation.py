"""Bad params: one line naming the key and what is allowed, exit code 1, nothing written."""

import dataclasses
import sys

import pytest
import yaml
from helpers import ROOT

from stages import prepare
from stages.pipeline.params import ParamsError, validate
from stages.pipeline.run import run

BASE = yaml.safe_load((ROOT / "params.yaml").read_text())
# without a guide model, for the autoguidance cases
BASE["train_uncond"]["guide_at"], BASE["sample"]["autoguidance"], BASE["visualize"]["autoguidance"] = 0, [0.0], 0.0

CASES = [  # (section, key, bad value, expected message fragment)
    ("train", "lrr", 0.1, "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    (None, "trainn", {}, "unknown key 'trainn' (did you mean 'train'?)"),
    ("train", "lr", 0, "train.lr = 0.0 is out of range; allowed: > 0"),
    ("train", "lr", "fast", "train.lr must be float, got 'fast'"),
    ("train", "batch_size", 0, "train.batch_size = 0 is out of range; allowed: >= 1"),
    ("train", "epochs", 2.5, "train.epochs must be int, got 2.5"),
    ("train_cond", "p_uncond", 1.5, "train_cond.p_uncond = 1.5 is out of range; allowed: in [0, 1]"),
    ("train", "p_uncond", 0.1, "train.p_uncond is now train_cond.p_uncond"),
    ("train", "lr", float("inf"), "train.lr must be a finite number, got inf"),
    ("train", "logsnr_normal", [float("nan"), 1.0], "train.logsnr_normal[0] must be a finite number, got nan"),
    ("sample", "guidance", [float("inf")], "sample.guidance[0] must be a finite number, got inf"),
    ("sample", "eta", ["inf"], "sample.eta[0] must be a finite number, got inf"),
    ("train", "ema_decay", 1.0, "train.ema_decay = 1.0 is out of range; allowed: in [0, 1)"),
    ("train", "bf16", True, "train.bf16 is now train.precision: fp32 | tf32 | bf16 | fp16 | auto (bf16: true is "
                            "precision: bf16)"),
    ("train", "precision", "fp8", "train.precision = 'fp8' is out of range; allowed: one of fp32, tf32, bf16, fp16, "
                                  "auto"),
    ("train", "compile", "yes", "train.compile must be bool, got 'yes'"),
    ("sample", "guidance", [-1.0], "sample.guidance = (-1.0,) is out of range; allowed: a list of values >= 0"),
    ("sample", "autoguidance", [1.0], "sample.autoguidance = (1.0,) is out of range; allowed: [0] while "
                                      "train_uncond.guide_at is 0 (the unconditional model has no guide model"),
    ("visualize", "autoguidance", 1.0, "visualize.autoguidance = 1.0 is out of range; allowed: 0 while "
                                       "train_uncond.guide_at is 0 (the unconditional model has no guide model"),
    ("visualize", "autoguidance", -1.0, "visualize.autoguidance = -1.0 is out of range; allowed: >= 0"),
    ("train_uncond", "guide_at", 1.0, "train_uncond.guide_at = 1.0 is out of range; allowed: in [0, 1) (0: no "
                                      "guide model)"),
    ("sample", "ddim_steps", [10, 2000], "sample.ddim_steps = (10, 2000) is out of range; allowed: a list of "
                                         "steps in [1, diffusion.timesteps = 1000]"),
    ("sample", "eta", [-0.1], "sample.eta = (-0.1,) is out of range"),
    ("sample", "num_samples", 0, "sample.num_samples = 0 is out of range"),
    ("sample", "methods", ["ddim", "euler"], "sample.methods = ('ddim', 'euler') is out of range; allowed: a "
                                             "non-empty list of distinct names from ddpm, ddim, dpmsolver"),
    ("data", "name", "imagenet", "data.name = 'imagenet' is out of range; allowed: one of mnist, fashion_mnist"),
    ("data", "limit", 0, "data.limit = 0 is out of range; allowed: >= 1 or null"),
    ("data", "name", "imagefolder", "data.root = None is out of range; allowed: a folder of images (required when "
                                    "data.name is imagefolder)"),
    ("data", "channels", 2, "data.channels = 2 is out of range; allowed: 1, 3 or null"),
    ("data", "image_size", 4, "data.image_size = 4 is out of range; allowed: in [8, 256] or null"),
    ("data", "classes", [], "data.classes = () is out of range; allowed: a non-empty list of distinct class names"),
    ("data", "classes", ["ship", 1.5], "data.classes[1] must be str or int, got 1.5"),
    ("diffusion", "schedule", "quadratic", "diffusion.schedule = 'quadratic' is out of range; allowed: one of linear, "
                                           "cosine"),
    ("diffusion", "timesteps", 0, "diffusion.timesteps = 0 is out of range"),
    ("diffusion", "prediction", "x0", "diffusion.prediction = 'x0' is out of range; allowed: one of eps, v"),
    ("train", "min_snr_gamma", -1, "train.min_snr_gamma = -1.0 is out of range; allowed: >= 0"),
    ("train", "lr_schedule", "step", "train.lr_schedule = 'step' is out of range; allowed: one of constant, cosine"),
    ("train", "logsnr_normal", [2.4, 0], "train.logsnr_normal = (2.4, 0.0) is out of range; allowed: [mean, std] "
                                    "with std > 0, or null (uniform timesteps)"),
    ("train", "logsnr_normal", [2.4], "train.logsnr_normal = (2.4,) is out of range; allowed: [mean, std] "
                                    "with std > 0, or null (uniform timesteps)"),
    ("model", "patch_size", 0, "model.patch_size = 0 is out of range; allowed: >= 1"),
    ("sample", "spacing", "karras", "sample.spacing = 'karras' is out of range; allowed: one of uniform, trailing, "
                                    "quadratic, logsnr"),
    ("model", "dropout", 1.5, "model.dropout = 1.5 is out of range"),
    ("model", "channel_mults", [], "model.channel_mults = () is out of range"),
    ("model", "num_heads", 3, "model.num_heads = 3 is out of range; allowed: a divisor of every level's channel"),
    (None, "device", "tpu", "device = 'tpu' is out of range; allowed: one of auto, cpu, cuda, mps"),
    (None, "seed", "one", "seed must be int, got 'one'"),
]


def run_prepare(tmp_path, monkeypatch, capsys) -> tuple[int, list[str]]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["prepare", "data/prepared"])
    with pytest.raises(SystemExit) as exit_info:
        run(prepare.main)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("section,key,value,message", CASES, ids=[f"{s}.{k}" if s else k for s, k, *_ in CASES])
def test_bad_param_is_one_clear_line(tmp_path, monkeypatch, capsys, section, key, value, message):
    params = yaml.safe_load(yaml.safe_dump(BASE))
    (params[section] if section else params)[key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code, err = run_prepare(tmp_path, monkeypatch, capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: params.yaml: ") and message in err[0], err[0]
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


def test_several_processes_cannot_share_one_named_gpu(tmp_path, monkeypatch, capsys):
    params = yaml.safe_load(yaml.safe_dump(BASE))
    params["device"], params["train"]["nproc"] = "cuda:1", 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code, err = run_prepare(tmp_path, monkeypatch, capsys)
    assert code == 1 and err == ["error: params.yaml: train.nproc = 2 is out of range; allowed: 1 when device is "
                                 "cuda:1 (one GPU); with device cuda or auto the processes use cuda:0 to "
                                 "cuda:<nproc-1>"], err
    assert not (tmp_path / "data").exists()


def test_params_file_that_is_not_yaml(tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    code, err = run_prepare(tmp_path, monkeypatch, capsys)
    assert code == 1 and len(err) == 1 and "params.yaml: not valid YAML" in err[0]


def test_dvc_style_float_without_a_dot_is_accepted():
    params = yaml.safe_load(yaml.safe_dump(BASE))
    params["train"]["lr"] = "2e-4"
    assert validate(params).train.lr == 2e-4


def test_a_missing_key_is_named(tmp_path, monkeypatch, capsys):
    """params.yaml is the one place the pipeline's values are set: a key removed from it is not filled in."""
    params = yaml.safe_load(yaml.safe_dump(BASE))
    del params["train"]["lr"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code, err = run_prepare(tmp_path, monkeypatch, capsys)
    assert code == 1 and len(err) == 1 and "params.yaml: missing key 'train.lr'" in err[0], err


def test_patch_size_must_divide_the_data_image_size():
    """Known only once the data is: checked where the train stage builds the network, before training."""
    model = validate(yaml.safe_load(yaml.safe_dump(BASE))).model
    with pytest.raises(ParamsError, match=r"^params.yaml: model.patch_size 3 does not divide the image size 28$"):
        dataclasses.replace(model, patch_size=3).unet(1, 28, None)
    unet = dataclasses.replace(model, patch_size=2).unet(1, 28, None)
    assert (unet.patch_size, unet.attention_resolutions) == (2, (4,))  # two halvings of 14 patches: 7, then 4
