"""The magnitude-preserving UNet (EDM2's layers): unit magnitudes in and out of each layer, forced weight
normalisation, and the UNet interface (odd sizes, model files). The behaviour both networks share (time and
class conditioning, gradients) is tested in test_unet.py for both."""

import math
import sys
from dataclasses import replace

import pytest
import torch
from helpers import TINY, make_repo, merge, run
from mlflow.tracking import MlflowClient
from test_training import CPU, shapes

from ddpm import Diffusion, DiffusionConfig, TrainConfig, Trainer, UNetConfig, load_model, make_unet, save_model
from ddpm.unet import Downsample
from ddpm.unet_mp import MPConv, MPUNet, mp_cat, mp_silu, mp_sum, normalize

MP = UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                num_heads=2, dropout=0.0, magnitude_preserving=True)


def rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_layer_functions_keep_unit_magnitude():
    a, b = unit(64, 32, 8, 8), unit(64, 16, 8, 8, seed=1)
    assert rms(mp_silu(a)) == pytest.approx(1.0, abs=0.02)
    assert rms(mp_sum(a, unit(64, 32, 8, 8, seed=2), 0.3)) == pytest.approx(1.0, abs=0.02)
    # the scale assumes independent inputs: the same input twice comes out larger
    assert rms(mp_sum(a, a, 0.3)) == pytest.approx(rms(a) / math.sqrt(0.7 ** 2 + 0.3 ** 2), rel=1e-3)
    cat = mp_cat(a, b, 0.5)
    assert cat.shape == (64, 48, 8, 8) and rms(cat) == pytest.approx(1.0, abs=0.02)
    # t sets the second input's share of the total energy, whatever the channel counts: (t / (1 - t))^2
    energy = lambda x: x.pow(2).sum().item()  # noqa: E731
    assert energy(cat[:, 32:]) / energy(cat[:, :32]) == pytest.approx(1.0, rel=0.05)
    skewed = mp_cat(a, b, 0.2)
    assert energy(skewed[:, 32:]) / energy(skewed[:, :32]) == pytest.approx(1 / 16, rel=0.05)
    norm = normalize(3 * a, dim=1)
    torch.testing.assert_close(norm.pow(2).mean(dim=1), torch.ones(64, 8, 8), atol=1e-3, rtol=0)


def test_mpconv_forces_unit_weights_in_training_only():
    conv = MPConv(16, 8, 3)
    with torch.no_grad():
        conv.weight.mul_(5.0)
    x = unit(32, 16, 10, 10)
    before = conv.weight.detach().clone()
    out_eval = conv.eval()(x)
    assert torch.equal(conv.weight, before)           # inference never writes the weights
    out_train = conv.train()(x)
    per_channel = conv.weight.detach().pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(per_channel, torch.ones(8), atol=1e-3, rtol=0)
    # the output does not depend on the weights' scale, and unit inputs give unit outputs
    torch.testing.assert_close(out_train, out_eval, atol=1e-4, rtol=1e-4)
    assert rms(out_train[:, :, 1:-1, 1:-1]) == pytest.approx(1.0, abs=0.15)
    linear = MPConv(64, 32, 0)
    assert rms(linear(unit(256, 64))) == pytest.approx(1.0, abs=0.1)


def test_fresh_model_predicts_zero_and_keeps_unit_activations():
    model = make_unet(replace(MP, num_classes=3))
    assert isinstance(model, MPUNet)
    x, t, y = unit(16, 1, 8, 8), torch.arange(16) * 60, torch.arange(16) % 3
    with torch.no_grad():
        assert torch.equal(model(x, t, y), torch.zeros_like(x))   # the output gain starts at 0
        for name, p in model.named_parameters():
            if name.endswith("gain"):
                p.fill_(1.0)
        sizes = []
        for block in [*model.down, *model.middle, *model.up]:
            block.register_forward_hook(lambda mod, inp, out: sizes.append(rms(out)))
        out = model(x, t, y)
    assert len(sizes) == len(model.down) + len(model.middle) + len(model.up)
    assert all(0.3 < s < 3 for s in sizes), sizes
    assert 0.3 < rms(out) < 3


@pytest.mark.parametrize("image_size, mults, attn", [(28, (1, 2, 2, 2), (7,)), (15, (1, 2, 2), (4,)),
                                                    (32, (1, 2, 2), (8,))])
def test_odd_sizes_round_trip(image_size, mults, attn):
    """28 -> 14 -> 7 -> 4 and back: average pooling at an odd edge, nearest upsampling to the skip's size."""
    model = make_unet(replace(MP, image_size=image_size, channel_mults=mults, attention_resolutions=attn)).eval()
    x = unit(2, 1, image_size, image_size)
    with torch.no_grad():
        model.out.gain.fill_(1.0)
        out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert sum(m.attn is not None for m in model.modules() if hasattr(m, "attn")) == 1 + 1 + 2
    # an edge window of the pooling averages only the pixels it covers: a constant stays constant
    pooled = Downsample(2, learned=False)(torch.full((1, 2, 7, 7), 3.0))
    assert pooled.shape == (1, 2, 4, 4) and torch.equal(pooled, torch.full_like(pooled, 3.0))


def test_model_file_round_trip(tmp_path):
    config = replace(MP, num_classes=2)
    torch.manual_seed(0)
    model = make_unet(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_model(tmp_path / "m.pt", model, config, DiffusionConfig(timesteps=50))
    loaded, _, _ = load_model(tmp_path / "m.pt")
    assert isinstance(loaded, MPUNet)
    x, t, y = unit(3, 1, 8, 8), torch.tensor([1, 20, 49]), torch.tensor([0, 1, 0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), atol=0, rtol=0)


def mp_trainer(images, labels, **config) -> Trainer:
    torch.manual_seed(0)
    net = make_unet(replace(MP, image_size=12, base_channels=16, attention_resolutions=(6,), num_classes=2))
    return Trainer(net, Diffusion(DiffusionConfig(timesteps=100).betas()), images, labels,
                   TrainConfig(batch_size=16, lr=2e-2, warmup_steps=20, ema_decay=0.99, **config), CPU, seed=0)


def test_mpunet_learns_and_keeps_its_weights_normalised():
    images, labels = shapes()
    trainer = mp_trainer(images, labels, epochs=30)
    losses = []
    trainer.fit(on_step=lambda tr, loss, s: losses.append(loss), progress=False)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert first > 0.5 and last < 0.6 * first and last < 0.4, (first, last)
    convs = [m for m in trainer.net.modules() if isinstance(m, MPConv)]
    for conv in convs:  # forced weight normalisation: each step starts from unit RMS per output channel, so
        # the weights stay within one Adam step (<= lr per weight) of it, however long the training
        rms_out = conv.weight.detach().flatten(1).pow(2).mean(dim=1).sqrt()
        torch.testing.assert_close(rms_out, torch.ones_like(rms_out), atol=0.02, rtol=0)


def test_mpunet_training_resumes_exactly():
    """Forced weight normalisation writes the weights inside the forward: a resumed run still matches."""
    images, labels = shapes(32)
    straight = mp_trainer(images, labels, epochs=2)
    straight.fit(progress=False)
    first = mp_trainer(images, labels, epochs=2)
    first.fit(progress=False, max_steps=2)
    resumed = mp_trainer(images, labels, epochs=2)
    resumed.load_state_dict(first.state_dict())
    resumed.fit(progress=False)
    for (name, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_the_train_stage_trains_the_network_params_yaml_names(tmp_path):
    """model.magnitude_preserving: true in params.yaml: the stage trains an MPUNet, its model file loads as one
    and MLflow records the key."""
    repo = make_repo(tmp_path / "repo", merge(TINY, {"model": {"magnitude_preserving": True}, "train": {"epochs": 1}}))
    run([sys.executable, "-m", "stages.prepare", "data/prepared"], repo)
    run([sys.executable, "-m", "stages.train", "cond", "--data", "data/prepared", "--checkpoints", "ck",
         "--out", "model", "--metrics", "metrics.json", "--plot", "loss.csv"], repo)
    model, _, _ = load_model(repo / "model/model.pt")
    assert isinstance(model, MPUNet) and model.config.num_classes
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    (train_run,) = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id], "tags.stage = 'train'")
    assert train_run.data.params["model.magnitude_preserving"] == "True"
