"""Model files and training checkpoints: round-trips, exact resume, refusal of corrupt or unsafe files."""

import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from ddpm import (
    CheckpointError,
    Diffusion,
    DiffusionConfig,
    TrainConfig,
    Trainer,
    UNet,
    UNetConfig,
    atomic_save,
    checkpoint,
    config_hash,
    guide_path,
    load_model,
    safe_load,
    save_model,
)

UNET = UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), num_heads=2, dropout=0.1, num_classes=3)
DIFFUSION = DiffusionConfig(schedule="cosine", timesteps=50)


def perturbed_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(UNET)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_same_tensors(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_model_file_round_trip(tmp_path):
    model = perturbed_unet()
    path = tmp_path / "model.pt"
    save_model(path, model, UNET, DIFFUSION, meta={"step": 7})
    loaded, diffusion, meta = load_model(path)
    assert loaded.config == UNET and meta == {"step": 7}
    assert not loaded.training
    assert_same_tensors(model.state_dict(), loaded.state_dict())
    assert torch.equal(diffusion.alpha_bar, Diffusion(DIFFUSION.betas()).alpha_bar)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 20, 49]), torch.tensor([0, 2, -1])
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, y), loaded(x, t, y))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind


def make_trainer(model_seed: int) -> Trainer:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 3, (12,), generator=gen)
    torch.manual_seed(model_seed)
    config = TrainConfig(epochs=2, batch_size=4, lr=1e-3, warmup_steps=3, ema_decay=0.9, p_uncond=0.3)
    return Trainer(UNet(UNET), Diffusion(DIFFUSION.betas()), images, labels, config, torch.device("cpu"), seed=5)


class Stop(Exception):
    pass


def test_resume_continues_exactly(tmp_path):
    # one uninterrupted run of 6 steps (2 epochs of 3)
    full = make_trainer(model_seed=0)
    full_losses = []
    full.fit(on_step=lambda tr, loss, s: full_losses.append(loss), progress=False)
    assert full.step == 6

    # the same run stopped after 4 steps, mid-epoch, and saved
    first = make_trainer(model_seed=0)
    losses = []

    def stop_at_4(tr, loss, seconds):
        losses.append(loss)
        if tr.step == 4:
            raise Stop
    with pytest.raises(Stop):
        first.fit(on_step=stop_at_4, progress=False)
    assert losses == full_losses[:4]
    path = tmp_path / "ckpt.pt"
    atomic_save(first.state_dict(), path)

    # a fresh process: other weights, other RNG state; then restore
    torch.manual_seed(999)
    torch.randn(1000)
    resumed = make_trainer(model_seed=1)
    assert not torch.equal(resumed.model.input_conv.weight, first.model.input_conv.weight)
    resumed.load_state_dict(safe_load(path, required=("model", "ema", "optimizer", "step")))
    assert resumed.step == 4
    assert_same_tensors(resumed.model.state_dict(), first.model.state_dict())
    assert_same_tensors(resumed.ema.module.state_dict(), first.ema.module.state_dict())
    assert resumed.ema.updates == first.ema.updates == 4
    assert_same_tensors(resumed.optimizer.state_dict(), first.optimizer.state_dict())

    resumed.fit(on_step=lambda tr, loss, s: losses.append(loss), progress=False)
    assert losses == full_losses
    assert_same_tensors(resumed.model.state_dict(), full.model.state_dict())
    assert_same_tensors(resumed.ema.module.state_dict(), full.ema.module.state_dict())


def test_corrupt_files_raise_checkpoint_error_naming_the_path(tmp_path):
    good = tmp_path / "good.pt"
    save_model(good, perturbed_unet(), UNET, DIFFUSION)
    data = good.read_bytes()
    cases = {  # name: (content, why the message gives)
        "truncated.pt": (data[: len(data) // 2], "it is truncated or corrupt"),
        "random.pt": (torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                    generator=torch.Generator().manual_seed(0)).numpy().tobytes(),
                      "it is not a PyTorch file"),
        "notes.txt": (b"a text file, not a model\n", "it is not a PyTorch file"),
        "empty.pt": (b"", "it is empty"),
    }
    for name, (content, why) in cases.items():
        (tmp_path / name).write_bytes(content)
        for load in (safe_load, load_model):
            with pytest.raises(CheckpointError) as error:
                load(tmp_path / name)
            # plain words naming the file, not torch's advice about its weights_only default
            assert str(error.value) == f"{tmp_path / name}: not a checkpoint written by this project ({why})"
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")


class Custom:
    def __init__(self):
        self.value = 3


class Payload:
    """Unpickling this calls open(path, "w"): proof that the unpickler ran arbitrary code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


class Evaluate:
    """Unpickling this evaluates Python source that creates `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return eval, (f"open({self.path!r}, 'w')",)


class Shell:
    """Unpickling this runs a shell command that creates `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch '{self.path}'",)


def refusal(path, names: str) -> str:
    return (f"{path}: refused: it holds Python objects other than tensors ({names}), which could run code when "
            "loaded; only plain tensor files are loaded")


def test_pickled_objects_are_refused_by_name_and_never_executed(tmp_path):
    custom = tmp_path / "custom.pt"
    torch.save({"weights": Custom()}, custom)
    with pytest.raises(CheckpointError, match=re.escape(refusal(custom, f"{Custom.__module__}.Custom"))):
        safe_load(custom)

    marker = tmp_path / "pwned"
    cases = [  # file, writer, the global it names
        ("payload.pt", lambda p: torch.save({"weights": Payload(marker)}, p), f"{open.__module__}.open"),
        ("payload.pkl", lambda p: p.write_bytes(pickle.dumps(Payload(marker), protocol=2)), f"{open.__module__}.open"),
        ("eval.pt", lambda p: torch.save([Evaluate(marker)], p), "builtins.eval"),
        ("eval.pkl", lambda p: p.write_bytes(pickle.dumps(Evaluate(marker), protocol=2)), "builtins.eval"),
        ("shell.pt", lambda p: torch.save({"weights": Shell(marker)}, p), f"{os.system.__module__}.system"),
        ("shell.pkl", lambda p: p.write_bytes(pickle.dumps(Shell(marker), protocol=2)), f"{os.name}.system"),
    ]
    for name, write, names in cases:
        write(tmp_path / name)
        for load in (safe_load, load_model):
            with pytest.raises(CheckpointError) as error:
                load(tmp_path / name)
            assert str(error.value) == refusal(tmp_path / name, names)
        assert not marker.exists()
    # the payloads are live: an unsafe load would have run them
    for name in ("payload.pt", "eval.pt", "shell.pt"):
        torch.load(tmp_path / name, weights_only=False)
        assert marker.exists()
        marker.unlink()


def test_wrong_contents_raise_checkpoint_error(tmp_path):
    path = tmp_path / "other.pt"
    atomic_save({"weights": {}}, path)
    with pytest.raises(CheckpointError, match="missing"):
        load_model(path)
    save_model(path, perturbed_unet(), UNET, DIFFUSION)
    obj = torch.load(path, weights_only=True)
    obj["unet"]["base_channels"] = 16  # the weights no longer fit the config
    atomic_save(obj, path)
    with pytest.raises(CheckpointError, match="other.pt"):
        load_model(path)
    obj["format"] = "something-else"
    atomic_save(obj, path)
    with pytest.raises(CheckpointError, match="format"):
        load_model(path)


BAD_MODEL_FILES = {  # name: (a change to the model file's dict, its error line after the file's name)
    "base 3000 over base-8 weights": (lambda o: o["unet"].update(base_channels=3000),
                                      "does not match its config (time_embed.0.weight is 12000 x 3000 in the config, "
                                      "32 x 8 in the weights)"),
    "a weight missing": (lambda o: o["weights"].pop("out.2.bias"),
                         "does not match its config (the weights lack out.2.bias)"),
    "timesteps 10^10": (lambda o: o["diffusion"].update(timesteps=10**10),
                        "diffusion.timesteps = 10000000000 is out of range; allowed: in [1, "),
    "unet a list": (lambda o: o.update(unet=[1, 2]), "unet must be a mapping of UNetConfig's fields, got [1, 2]"),
    "heads a float": (lambda o: o["unet"].update(num_heads=2.0), "unet.num_heads must be int, got 2.0"),
    "weights a list": (lambda o: o.update(weights=[torch.zeros(1)]),
                       "its weights are not a mapping of names to tensors"),
    "NaN weights": (lambda o: o["weights"]["input_conv.weight"].fill_(float("nan")),
                    "weight input_conv.weight holds NaN or infinite values, so the model cannot sample"),
}


@pytest.mark.parametrize("case", BAD_MODEL_FILES)
def test_a_model_files_config_is_checked_before_any_network_is_built(tmp_path, monkeypatch, case):
    """Its fields typed and in range, the network they describe matched against the weights' shapes, and the
    weights finite: one line naming the file, and nothing allocated from a config that does not fit."""
    path = tmp_path / "model.pt"
    save_model(path, perturbed_unet(), UNET, DIFFUSION)
    obj = torch.load(path, weights_only=True)
    change, message = BAD_MODEL_FILES[case]
    change(obj)
    atomic_save(obj, path)

    def no_network(config):
        raise AssertionError(f"a network was built from a bad model file: {config}")
    monkeypatch.setattr(checkpoint, "make_unet", no_network)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert str(error.value).startswith(f"{path}: {message}"), error.value


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    state = safe_load(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_config_hash_is_stable_and_sensitive():
    a = {"lr": 2e-4, "model": {"base_channels": 64, "channel_mults": [1, 2, 2]}}
    b = {"model": {"channel_mults": [1, 2, 2], "base_channels": 64}, "lr": 2e-4}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({**a, "lr": 1e-4})


@pytest.mark.parametrize("model_file, guide_file", [("models/uncond/model.pt", "models/uncond/model-guide.pt"),
                                                    ("cache/quick.pt", "cache/quick-guide.pt")])
def test_a_guide_model_lives_beside_its_model_as_name_guide(model_file, guide_file):
    assert guide_path(model_file) == guide_path(Path(model_file)) == Path(guide_file)
