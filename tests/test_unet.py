"""The noise-prediction UNet: shapes at odd sizes, attention, time and class conditioning."""

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from helpers import ROOT

from ddpm import NULL_LABEL, UNet, UNetConfig, make_unet
from ddpm.model_config import meta_network
from ddpm.unet import Attention


def perturbed(config: UNetConfig, seed: int = 0) -> UNet:
    """An eval-mode UNet (or MPUNet) with noise added to every weight, so the zero-initialised output layers
    and gains no longer hide how the output depends on x_t, t and y."""
    torch.manual_seed(seed)
    model = make_unet(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
            if name.endswith("gain"):  # MPUNet's learned gains, 0 at first
                p.add_(1.0)
    return model.eval()


@pytest.mark.parametrize("image_size, channels, mults, attn", [
    (28, 1, (1, 2, 2, 2), (7,)),    # 28 -> 14 -> 7 -> 4 and back
    (28, 3, (1, 2), (14,)),
    (32, 1, (1, 2, 2), (8,)),
    (32, 3, (1, 2, 2, 2), (4,)),
    (64, 3, (1, 2, 2, 2), (16,)),   # the size-following default at 64 px
    (15, 1, (1, 2, 2), (4,)),       # 15 -> 8 -> 4
])
def test_output_shape_equals_input_shape(image_size, channels, mults, attn):
    config = UNetConfig(in_channels=channels, image_size=image_size, base_channels=8, channel_mults=mults,
                        num_res_blocks=1, attention_resolutions=attn, num_heads=2, dropout=0.0)
    model = perturbed(config)
    # attention is placed at the requested resolution (besides the middle block): one per down and up block
    assert sum(isinstance(m, Attention) for m in model.modules()) == 1 + 1 + 2
    x = torch.randn(3, channels, image_size, image_size)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 5, 999]))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_fresh_model_predicts_zero_noise():
    """Zero-initialised output layer: an untrained model starts at eps = 0 (loss = 1)."""
    model = UNet(UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), attention_resolutions=(4,),
                            num_heads=2))
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([3, 7]))
    assert torch.equal(out, torch.zeros_like(out))


TINY = UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), num_heads=2, dropout=0.0)


BOTH = pytest.mark.parametrize("mp", [False, True], ids=["unet", "mpunet"])


@BOTH
@pytest.mark.parametrize("base_channels", [8, 16, 64])
def test_output_depends_on_input_and_timestep(base_channels, mp):
    model = perturbed(replace(TINY, base_channels=base_channels, magnitude_preserving=mp))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(x, torch.tensor([10, 10]))
        b = model(x, torch.tensor([500, 500]))
        c = model(x.flip(-1), torch.tensor([10, 10]))
    assert (a - b).abs().max() > 1e-2   # the time embedding reaches the output
    assert (a - c).abs().max() > 1e-2
    # each example is processed independently of the rest of the batch
    with torch.no_grad():
        single = model(x[:1], torch.tensor([10]))
    torch.testing.assert_close(single, a[:1], atol=1e-5, rtol=1e-5)


@BOTH
def test_conditional_model_labels(mp):
    model = perturbed(replace(TINY, num_classes=4, magnitude_preserving=mp))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.full((4,), 100)
    with torch.no_grad():
        none = model(x, t)
        null = model(x, t, torch.full((4,), NULL_LABEL))
        outs = [model(x, t, torch.full((4,), k)) for k in range(4)]
    assert torch.equal(none, null)
    for i in range(4):
        assert (outs[i] - null).abs().max() > 1e-2
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 1e-2
    # a mixed batch gives each example its own label's output
    with torch.no_grad():
        mixed = model(x, t, torch.tensor([2, NULL_LABEL, 0, 3]))
    expected = torch.stack([outs[2][0], null[1], outs[0][2], outs[3][3]])
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)


@BOTH
def test_labels_on_unconditional_model_raise(mp):
    model = make_unet(replace(TINY, magnitude_preserving=mp))
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))


@BOTH
def test_gradients_reach_every_parameter(mp):
    model = perturbed(replace(TINY, num_classes=2, magnitude_preserving=mp)).train()
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, NULL_LABEL]))
    out.pow(2).mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("channels", [1, 3])
def test_patch_size_folds_pixels_into_channels(channels):
    """patch_size 2: a 28 x 28 image runs as 14 x 14 patches of 4 pixels (times channels) and comes back."""
    config = UNetConfig(in_channels=channels, image_size=28, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                        attention_resolutions=(7,), num_heads=2, dropout=0.0, patch_size=2)
    model = perturbed(config)
    assert model.input_conv.in_channels == 4 * channels and model.out[-1].out_channels == 4 * channels
    sizes = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: sizes.append(out.shape[-1]))
    x = torch.randn(2, channels, 28, 28)
    with torch.no_grad():
        out = model(x, torch.tensor([3, 700]))
    assert out.shape == x.shape and max(sizes) == 14 and min(sizes) == 7
    # 14 -> 7: attention after the downsampling (one down, two up blocks) and in the middle
    assert sum(isinstance(m, Attention) for m in model.modules()) == 1 + 1 + 2


def test_patch_size_must_divide_the_image_size():
    with pytest.raises(ValueError, match="image_size 28 is not a multiple of patch_size 3"):
        UNet(replace(TINY, image_size=28, patch_size=3))


@pytest.mark.parametrize("mp", [False, True])
def test_the_meta_network_has_the_networks_shapes_and_draws_nothing(mp):
    """`meta_network`, which the loaders check a file's shapes against and params.yaml's bounds count parameters
    with: the network's names and shapes, no storage, and the random generator left as it was."""
    config = UNetConfig(image_size=28, base_channels=16, num_classes=10, magnitude_preserving=mp)
    shapes = {name: t.shape for name, t in make_unet(config).state_dict().items()}
    rng = torch.get_rng_state()
    meta = meta_network(config)
    assert torch.equal(torch.get_rng_state(), rng)
    assert {name: t.shape for name, t in meta.state_dict().items()} == shapes
    assert all(t.is_meta for t in meta.state_dict().values())


def test_counting_parameters_does_not_import_torch_dynamo():
    """normal_'s meta kernel imports torch._dynamo on first use, a second or two at every stage's start: building
    the meta network skips torch.nn.init, whose values a meta tensor has no room for anyway."""
    code = ("import sys; from ddpm import UNetConfig; from ddpm.model_config import parameter_count; "
            "print([parameter_count(UNetConfig(image_size=28, base_channels=16, num_classes=10, "
            "magnitude_preserving=mp)) > 0 for mp in (False, True)], 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[True,", "True]", "False"]
