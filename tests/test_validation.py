"""Bad params: one line naming the key and what is allowed, exit code 1, nothing written."""

import dataclasses
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, TINY, merge
from mlflow.tracking import MlflowClient

from ddpm import Diffusion, Trainer, UNet, UNetConfig, generate
from ddpm.classifier import fit_classifier
from ddpm.data import floor_subset
from ddpm.metrics import metrics_from_features
from ddpm.request import MAX_SEED
from stages import prepare
from stages.pipeline import bounds
from stages.pipeline.params import ParamsError, train_config, validate
from stages.pipeline.run import NotWritableError, check_writable, run, seed_everything
from stages.pipeline.store import TrackingError
from stages.pipeline.tracking import Tracker, stage_run

TINY_MODEL = UNetConfig(in_channels=1, image_size=28, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                        attention_resolutions=(), num_heads=1)

BASE = yaml.safe_load((ROOT / "params.yaml").read_text())

CASES = [  # (section, key, bad value, expected message fragment)
    ("train", "lrr", 0.1, "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    (None, "trainn", {}, "unknown key 'trainn' (did you mean 'train'?)"),
    ("train", "lr", 0, "train.lr = 0.0 is out of range; allowed: > 0"),
    ("train", "lr", "fast", "train.lr must be float, got 'fast'"),
    ("train", "batch_size", 0, "train.batch_size = 0 is out of range; allowed: >= 1"),
    ("train", "micro_batches", 3, "train.micro_batches = 3 is out of range; allowed: >= 1, with train.nproc x "
     "train.nnodes x train.micro_batches a divisor of train.batch_size"),
    ("train", "epochs", 2.5, "train.epochs must be int, got 2.5"),
    ("train_cond", "steps", 0, "train_cond.steps = 0 is out of range; allowed: >= 1, or null (train.epochs)"),
    ("train_uncond", "steps", 100.5, "train_uncond.steps must be int, got 100.5"),
    ("train", "grids", 0, "train.grids = 0 is out of range; allowed: >= 1"),
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
    ("sample", "guidance", [-1.0], "sample.guidance = (-1.0,) is out of range; allowed: a non-empty list, each a "
                                   "finite number >= 0"),
    ("train_uncond", "guide_at", 0, "sample.autoguidance = (1.0,) is out of range; allowed: [0] while "
                                    "train_uncond.guide_at is 0 (the unconditional model has no guide model"),
    ("visualize", "autoguidance", -1.0, "visualize.autoguidance = -1.0 is out of range; allowed: a finite number >= 0"),
    ("sample", "guidance_interval", [5.42, 0.28], "sample.guidance_interval = (5.42, 0.28) is out of range; allowed: "
                                                  "[low, high] with 0 <= low < high"),
    ("sample", "autoguidance_interval", [1.0], "sample.autoguidance_interval = (1.0,) is out of range; allowed: "
                                               "[low, high] with 0 <= low < high"),
    ("sample", "guidance_interval", 0.28, "sample.guidance_interval = (0.28,) is out of range; allowed: [low, high]"),
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
    ("evaluate", "protocol", "paper", "evaluate.protocol = 'paper' is out of range; allowed: one of fast, standard"),
    ("sample", "batch_size", 0, "sample.batch_size = 0 is out of range; allowed: >= 1, or null (sized for the "
                                "device)"),
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


def test_inception_cannot_be_required_while_it_is_left_out(tmp_path, monkeypatch, capsys):
    params = yaml.safe_load(yaml.safe_dump(BASE))
    params["evaluate"].update(extractors=["classifier"], inception_required=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code, err = run_prepare(tmp_path, monkeypatch, capsys)
    assert code == 1 and err == ["error: params.yaml: evaluate.inception_required = True is out of range; allowed: "
                                 "false while evaluate.extractors leaves out inception"]


def test_no_autoguidance_in_the_pictures_without_a_guide_model():
    params = merge(BASE, {"train_uncond": {"guide_at": 0}, "sample": {"autoguidance": [0]}})
    with pytest.raises(ParamsError, match=r"^params.yaml: visualize.autoguidance = 1.0 is out of range; allowed: 0 "
                                          r"while train_uncond.guide_at is 0 \(the unconditional model has no guide"):
        validate(params)


def test_a_post_hoc_ema_needs_snapshots_and_a_precision_is_one_of_the_known():
    without = {"train": {"posthoc_sigma_rels": [], "posthoc_snapshots": 0}}
    for key, section, value in (("sample.sigma_rel", "sample", [None, 0.1]), ("visualize.sigma_rel", "visualize", 0.1)):
        name = key.split(".")[1]
        with pytest.raises(ParamsError, match=rf"^params.yaml: {key} = .* is out of range; allowed: null while "
                                              r"train.posthoc_sigma_rels is \[\] \(training keeps no post-hoc EMA"):
            validate(merge(BASE, without | {section: {name: value}}))
    validate(merge(BASE, {"sample": {"sigma_rel": [None, 0.05, 0.2]}, "visualize": {"sigma_rel": 0.1}}))
    for value in ([0.1, 0.1], [0.3], []):
        with pytest.raises(ParamsError, match=r"^params.yaml: sample.sigma_rel = .* allowed: a non-empty list of "
                                              r"distinct values, each null \(the fixed-decay EMA\) or in "
                                              r"\(0, 0.2887\)"):
            validate(merge(BASE, {"sample": {"sigma_rel": value}}))
    with pytest.raises(ParamsError, match=r"^params.yaml: sample.precision = 'fp8' is out of range; allowed: one of "
                                          r"fp32, tf32, bf16, fp16, auto"):
        validate(merge(BASE, {"sample": {"precision": "fp8"}}))


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


# Sizes that allocate, on a machine of 16 GB without a GPU (mnist: 1 x 28 x 28 uint8 images).
SIZE_CASES = [
    ("sample", "num_samples", 10**9, "sample.num_samples = 1000000000 needs about 784 GB for its images; this "
                                     "machine has 16 GB; allowed: at most 20000000"),
    ("train", "grid_size", 10**8, "train.grid_size = 100000000 makes a grid of 100000000 images; pictures hold at "
                                  "most 10000; allowed: at most 10000"),
    ("sample", "grid_size", 10**5, "sample.grid_size = 100000 makes a grid of 100000 images"),
    ("sample", "batch_size", 10**6, "sample.batch_size = 1000000 needs about 489 GB for the UNet's activations "
                                    "(an estimate); this machine has 16 GB; allowed: at most 32000"),
    ("train", "batch_size", 10**6, "train.batch_size = 1000000 needs about 1468 GB for the UNet's activations in "
                                   "training (an estimate); this machine has 16 GB; allowed: at most 10000"),
    ("evaluate", "batch_size", 10**8, "evaluate.batch_size = 100000000 needs about"),
    ("classifier", "batch_size", 10**8, "classifier.batch_size = 100000000 needs about"),
    ("visualize", "per_class", 5000, "visualize.per_class = 5000 makes a class grid of 10 classes of 50000 images; "
                                     "pictures hold at most 10000; allowed: at most 1000"),
    ("visualize", "num_images", 10**6, "visualize.num_images = 1000000 makes a reverse-process picture"),
    ("visualize", "frames", 10**6, "visualize.frames = 1000000 makes a reverse-process picture (8 rows) of 8000000 "
                                   "images; pictures hold at most 10000; allowed: at most 1250"),
    ("diffusion", "timesteps", 10**9, "diffusion.timesteps = 1000000000 needs about 100 GB for the diffusion "
                                      "schedule; this machine has 16 GB; allowed: at most 160000000"),
]


@pytest.fixture
def machine(monkeypatch):
    """A machine of 16 GB without CUDA or MPS."""
    monkeypatch.setattr(bounds, "ram", lambda: 16 * 10**9)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("section,key,value,message", SIZE_CASES, ids=[f"{s}.{k}" for s, k, *_ in SIZE_CASES])
def test_a_size_beyond_the_machine_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, machine, section, key,
                                                               value, message):
    params = yaml.safe_load(yaml.safe_dump(BASE))
    params[section][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code, err = run_prepare(tmp_path, monkeypatch, capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: params.yaml: ") and message in err[0], err[0]
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


def test_the_data_must_fit_in_memory(monkeypatch, machine):
    monkeypatch.setattr(bounds, "ram", lambda: 4 * 10**9)
    params = merge(BASE, {"data": {"image_size": 256, "channels": 3}})
    with pytest.raises(ParamsError, match=r"^params.yaml: data.image_size = 256 needs about 14 GB for 70000 images "
                                          r"of 3 x 256 x 256; this machine has 4.0 GB; allowed: at most 138$"):
        validate(params)


def test_the_networks_weights_must_fit_in_training(monkeypatch, machine):
    """A network too wide for its weights, their gradients, AdamW's moments, the EMA and the guide copies, though
    its activations fit (batches of one): one line with the widest network that fits, which does."""
    small = {"train": {"batch_size": 1, "grid_size": 1, "posthoc_sigma_rels": [], "posthoc_snapshots": 0},
             "sample": {"batch_size": 1}, "evaluate": {"batch_size": 1}}
    with pytest.raises(ParamsError, match=r"^params.yaml: model.base_channels = 20000 needs about 10359 GB for the "
                                          r"network's weights in training \(4.3e\+11 parameters, 6 float32 copies: "
                                          r"weights, gradients, AdamW's two moments, EMA, guide\); this machine has "
                                          r"16 GB; allowed: at most 780$"):
        validate(merge(BASE, merge(small, {"model": {"base_channels": 20000}})))
    assert validate(merge(BASE, merge(small, {"model": {"base_channels": 780}}))).model.base_channels == 780
    with pytest.raises(ParamsError, match=r"^params.yaml: model.base_channels = 800 needs about 17 GB for the "):
        validate(merge(BASE, merge(small, {"model": {"base_channels": 800}})))


def test_the_repositorys_values_fit_small_machines_with_room_to_spare(monkeypatch, machine):
    """The bounds catch absurd values only: params.yaml, the laptop profile and the tests' tiny config pass in a
    quarter of a 4 GB laptop, the gpu and paper profiles (on MNIST and CIFAR-10) in a quarter of a 16 GB GPU."""
    profiles = yaml.safe_load((ROOT / "profiles.yaml").read_text())
    monkeypatch.setattr(bounds, "ram", lambda: 10**9)
    for config in [BASE, merge(BASE, TINY), merge(BASE, profiles["laptop"])]:
        validate(config)
    fake_gpus(monkeypatch, 1, memory=4 * 10**9)
    for name, data in [(name, data) for name in ("gpu", "paper") for data in ("mnist", "cifar10")]:
        validate(merge(merge(BASE, profiles[name]), {"device": "cuda", "data": {"name": data}}))


def test_the_size_estimates_are_lower_bounds():
    """The activation estimates never exceed what the networks take (here a batch of 16, laptop profile)."""
    p = validate(merge(BASE, {"device": "cpu"}))
    net = UNet(p.model.unet(1, 28, None))
    x, t = torch.randn(16, 1, 28, 28), torch.zeros(16, dtype=torch.long)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda a: saved.append(a.numel() * a.element_size()) or a,
                                                  lambda a: a):
        net(x, t)
    fp32 = dataclasses.replace(p, train=dataclasses.replace(p.train, precision="fp32"))
    assert bounds.unet_bytes(fp32, True) * 16 < sum(
        saved)


SEED_CASES = [-1, MAX_SEED + 1, 2**64]


@pytest.mark.parametrize("seed", SEED_CASES)
def test_a_seed_beyond_64_bits_is_one_line(tmp_path, monkeypatch, capsys, seed):
    params = yaml.safe_load(yaml.safe_dump(BASE))
    params["seed"] = seed
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code, err = run_prepare(tmp_path, monkeypatch, capsys)
    assert code == 1 and err == [f"error: params.yaml: seed = {seed} is out of range; allowed: in "
                                 "[0, 9223372036854775807] (2**63 - 1, the largest signed 64-bit integer)"], err
    assert not (tmp_path / "data").exists()


def test_the_largest_seed_trains_and_samples():
    assert MAX_SEED == 2**63 - 1
    p = validate(merge(BASE, {"seed": MAX_SEED}))
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    config = dataclasses.replace(train_config(p, "uncond"), epochs=1, steps=None, batch_size=4, precision="fp32")
    net = UNet(TINY_MODEL)
    diffusion = Diffusion.from_config(dataclasses.replace(p.diffusion, timesteps=10))
    trainer = Trainer(net, diffusion, images, None, config, torch.device("cpu"), p.seed)
    trainer.fit()
    assert trainer.step == 2
    assert generate(net, diffusion, 2, (1, 28, 28), seed=p.seed, steps=2).shape == (2, 1, 28, 28)


def test_every_other_use_of_the_largest_seed_takes_it():
    seed_everything(MAX_SEED + 1)  # a training process of rank 1
    images, labels = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8), torch.arange(16) % 2
    assert len(floor_subset(images, labels, 4, MAX_SEED)[0]) == 4  # the reference stage's draw, with seed + 2
    fit_classifier((images, labels), (images, labels), 2, width=4, epochs=1, lr=1e-3, batch_size=8, seed=MAX_SEED)
    features = {"features": torch.randn(20, 4, dtype=torch.float64), "logits": torch.randn(20, 3)}
    metrics = metrics_from_features(features, features, metrics=("isc", "kid"), kid_subset_size=20, seed=MAX_SEED)
    assert set(metrics) == {"is_mean", "is_std", "kid_mean", "kid_std"}


@pytest.mark.parametrize("device,gpus,message", [
    ("cuda", 0, "device = 'cuda' is not a device of this machine (0 CUDA devices); allowed: one of auto, cpu"),
    ("cuda:0", 0, "device = 'cuda:0' is not a device of this machine (0 CUDA devices); allowed: one of auto, cpu"),
    ("mps", 0, "device = 'mps' is not a device of this machine (0 CUDA devices); allowed: one of auto, cpu"),
    ("cuda:7", 2, "device = 'cuda:7' is not a device of this machine (2 CUDA devices); allowed: one of auto, cpu, "
                  "cuda, cuda:0, cuda:1"),
    ("cuda:x", 2, "device = 'cuda:x' is not a device of this machine (2 CUDA devices); allowed: one of auto, cpu, "
                  "cuda, cuda:0, cuda:1"),
])
def test_a_device_this_machine_lacks_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, machine, device,
                                                                  gpus, message):
    fake_gpus(monkeypatch, gpus)
    params = yaml.safe_load(yaml.safe_dump(BASE))
    params["device"] = device
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code, err = run_prepare(tmp_path, monkeypatch, capsys)
    assert code == 1 and err == [f"error: params.yaml: {message}"], err
    assert not (tmp_path / "data").exists()


def test_every_training_process_needs_its_own_gpu(monkeypatch, machine):
    fake_gpus(monkeypatch, 2)
    assert validate(merge(BASE, {"device": "cuda:1"})).device == "cuda:1"
    assert validate(merge(BASE, {"device": "cuda", "train": {"nproc": 2}})).train.nproc == 2
    with pytest.raises(ParamsError, match=r"^params.yaml: train.nproc = 4 needs a GPU per process with device auto; "
                                          r"this machine has 2 CUDA devices; allowed: at most 2, or device cpu$"):
        validate(merge(BASE, {"train": {"nproc": 4}}))


def fake_gpus(monkeypatch, n: int, memory: int = 80 * 10**9) -> None:
    """CUDA with `n` devices of `memory` bytes (none: no CUDA)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=memory))


@pytest.fixture
def read_only(tmp_path):
    """Make folders read-only: by permissions, and for root (whom permissions do not stop) immutable."""
    made = []

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        made.append(folder)
        if writable(folder) and shutil.which("chattr"):
            subprocess.run(["chattr", "+i", folder], capture_output=True)
        if writable(folder):
            pytest.skip("cannot make a read-only folder here")
        return folder

    yield make
    for folder in made:
        if shutil.which("chattr"):
            subprocess.run(["chattr", "-i", folder], capture_output=True)
        folder.chmod(0o755)


def writable(folder: Path) -> bool:
    try:
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


def test_check_writable_names_the_folder_it_cannot_write(tmp_path, read_only):
    locked = read_only(tmp_path / "locked")
    check_writable(tmp_path / "out", tmp_path / "new/deeper/out", tmp_path / "out.json")  # parents made later
    for path in (locked / "out", locked / "new/deeper/out"):
        with pytest.raises(NotWritableError, match=rf"^cannot write {path}: {locked} is not writable \(.+\)$"):
            check_writable(tmp_path / "fine", path)
    with pytest.raises(NotWritableError, match=rf"^cannot write {locked}: {locked} is not writable"):
        check_writable(locked)  # an existing output folder is replaced, so it is written too
    (tmp_path / "file").write_text("")
    with pytest.raises(NotWritableError, match=rf"^cannot write {tmp_path}/file/out: {tmp_path}/file is not a "
                                               "folder$"):
        check_writable(tmp_path / "file/out")


def test_a_read_only_output_folder_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, read_only):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(BASE))
    read_only(tmp_path / "data")
    code, err = run_prepare(tmp_path, monkeypatch, capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: cannot write data/prepared: {tmp_path}/data is not writable ("), err[0]
    assert not (tmp_path / "mlflow.db").exists()  # stopped before its MLflow run, let alone loading the data


@pytest.mark.parametrize("first_run", [False, True], ids=["fresh", "after-a-run"])
def test_a_read_only_artifact_store_is_one_line_and_leaves_the_output_as_it_was(tmp_path, monkeypatch, capsys,
                                                                                read_only, first_run):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(merge(BASE, TINY)))
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "mlartifacts"
    if first_run:
        prepare.main(["data/prepared"])
        before = {p.name: p.read_bytes() for p in (tmp_path / "data/prepared").iterdir()}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(merge(BASE, merge(TINY, {"data": {"limit": 200}}))))
    for folder in [store, *(store.iterdir() if store.is_dir() else [])]:  # chmod -R a-w mlartifacts
        read_only(folder)
    code, err = run_prepare(tmp_path, monkeypatch, capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: MLflow cannot store this run's artifacts in {store}/"), err[0]
    assert " is not writable (" in err[0], err[0]
    if first_run:  # the earlier output stays whole; no new one, not even in part
        assert {p.name: p.read_bytes() for p in (tmp_path / "data/prepared").iterdir()} == before
        assert not list((tmp_path / "data").glob(".prepared.tmp*"))
    else:
        assert not (tmp_path / "data").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id], "tags.stage = 'prepare'",
                              order_by=["start_time DESC"])
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"][:1 + first_run]


def test_an_artifact_folder_that_refuses_a_file_is_one_line(tmp_path, monkeypatch, read_only):
    """The artifact store answers (its root was writable when the run opened) but one of the run's folders
    is not: one line naming the file, and the run ends FAILED."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grid.png").write_bytes(b"not read")
    with pytest.raises(TrackingError) as error, stage_run("sample-ddim", "cond") as tracker:
        uri = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(tracker.run_id).info.artifact_uri
        artifacts = Path(uri.removeprefix("file://"))
        read_only(artifacts / "plots")
        tracker.log_artifact(tmp_path / "grid.png", "plots")
    assert str(error.value).startswith(f"MLflow cannot store artifacts in {artifacts / 'plots'}: ")
    run_status = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(tracker.run_id).info.status
    assert run_status == "FAILED"


@pytest.mark.parametrize("call", ["log_artifact", "end"])
def test_a_tracking_store_that_stops_answering_at_the_end_leaves_no_output(tmp_path, monkeypatch, capsys, call):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(merge(BASE, TINY)))

    def stopped(self, *args):
        raise TrackingError("MLflow tracking store stopped answering")

    monkeypatch.setattr(Tracker, call, stopped)  # the stage's last artifact, or the end of its run
    code, err = run_prepare(tmp_path, monkeypatch, capsys)
    assert code == 1 and err == ["error: MLflow tracking store stopped answering"], err
    assert not (tmp_path / "data").exists()
