"""ddpm.pictures and the visualize stage: picture layouts on tiny models, and the stage run as DVC runs it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, merge
from PIL import Image
from test_cli import tiny_models
from test_sampling import tiny_unet

from ddpm import (
    ClassifierFree,
    Diffusion,
    ImageGenerator,
    UNet,
    UNetConfig,
    generate,
    guide_path,
    make_betas,
    to_uint8,
)
from ddpm.pictures import interpolation, make_grid, reverse_strip, sampler_comparison, schedule_figure, slerp

PICTURES = ["cond_classes.png", "schedule.png"] + [f"{v}_{kind}.png" for v in ("uncond", "cond")
                                                    for kind in ("reverse", "interpolation", "compare")]
TINY_PARAMS = {
    "seed": 0, "device": "cpu", "diffusion": {"timesteps": 20},
    "train": {"grid_ddim_steps": 5}, "sample": {"ddpm_steps": [20], "ddim_steps": [5]},
    "visualize": {"per_class": 2, "num_images": 2, "frames": 4, "steps": 5, "guidance": 1.0,
                  "compare_steps": [2, 5, 50]},
}


def test_slerp_keeps_endpoints_and_norm():
    a, b = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert path.shape == (5, 1, 28, 28)
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
    norms = path.flatten(1).norm(dim=1)
    assert (norms - a.norm()).abs().max() < 0.1 * a.norm()  # on the sphere, unlike the straight line:
    assert ((a + b) / 2).norm() < 0.8 * a.norm()


def test_make_grid_has_torchvision_layout():
    from torchvision.utils import make_grid as torchvision_grid

    images = torch.randint(0, 256, (7, 1, 28, 28), dtype=torch.uint8)
    expected = torchvision_grid(images, nrow=3, padding=2, pad_value=255)[:1]
    assert torch.equal(make_grid(images, 3), expected)


def test_reverse_strip_layout():
    diffusion = Diffusion(make_betas("linear", 20))
    model = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), attention_resolutions=(), num_heads=2)).eval()
    gen = ImageGenerator(0, range(2))
    x_T = gen.randn((2, 1, 28, 28))
    strip = reverse_strip(model, diffusion, x_T, num_frames=4, steps=5, generator=gen)
    assert strip.images.shape == (2 * 2 * 4, 1, 28, 28) and strip.nrow == 4
    assert strip.col_labels == ["t=16", "t=8", "t=4", "sample"]  # of x_T, x_t after steps 1..5
    rows = strip.images.reshape(2, 2, 4, 1, 28, 28)  # (image, x_t / predicted x0, frame, ...)
    assert torch.equal(rows[:, 0, 0], to_uint8(x_T))
    assert torch.equal(rows[:, 0, -1], rows[:, 1, -1])  # the last column is the sample in both rows
    assert not torch.equal(rows[:, 0, 1], rows[:, 1, 1])


def test_pictures_of_a_classifier_free_guided_model():
    """A guided picture is the picture of the guided model: each column of the comparison is `generate` of it."""
    diffusion, net = Diffusion(make_betas("linear", 20, beta_end=0.3)), tiny_unet(num_classes=3)
    y, guided = torch.tensor([0, 2]), ClassifierFree(net, 2.0)
    pic = sampler_comparison(guided, diffusion, 2, (1, 8, 8), seed=3, steps=(3,), y=y)
    ddim = generate(guided, diffusion, 2, (1, 8, 8), seed=3, steps=3, labels=y)
    assert torch.equal(pic.images.reshape(2, 2, 1, 8, 8)[:, 1], ddim)
    assert not torch.equal(ddim, generate(net, diffusion, 2, (1, 8, 8), seed=3, steps=3, labels=y))
    noise = ImageGenerator(4, range(2)).randn((2, 1, 8, 8))
    plain = interpolation(net, diffusion, noise[:1], noise[1:], 3, y=y[:1], steps=3).images
    assert torch.equal(interpolation(ClassifierFree(net, 0.0), diffusion, noise[:1], noise[1:], 3, y=y[:1],
                                     steps=3).images, plain)


def test_schedule_figure_shows_both_schedules():
    fig = schedule_figure(100)
    assert len(fig.axes) == 3 and all(len(ax.lines) == 2 for ax in fig.axes)
    for line in fig.axes[2].lines:  # log-SNR falls with t
        snr = torch.as_tensor(line.get_ydata())
        assert (snr[1:] < snr[:-1]).all()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A folder with a tiny params.yaml and the two tiny models (and the unconditional one's guide model)."""
    return make_project(tmp_path_factory.mktemp("project"), TINY_PARAMS, tiny_models(tmp_path_factory))


def make_project(folder: Path, params: dict, models: dict[str, Path]) -> Path:
    defaults = yaml.safe_load((ROOT / "params.yaml").read_text())
    (folder / "params.yaml").write_text(yaml.safe_dump(merge(defaults, params)))
    (folder / "models").mkdir()
    for variant, path in models.items():
        (folder / "models" / f"{variant}.pt").symlink_to(path)
    (folder / "models/uncond-guide.pt").symlink_to(guide_path(models["uncond"]))
    return folder


def visualize(folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "stages.visualize", "--uncond", "models/uncond.pt",
                           "--cond", "models/cond.pt", "--out", "plots/pictures"],
                          cwd=folder, env=env, capture_output=True, text=True)


def test_stage_writes_every_picture(project):
    proc = visualize(project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = project / "plots/pictures"
    assert sorted(p.name for p in out.iterdir()) == sorted(PICTURES)
    assert sorted(p.name for p in out.parent.iterdir()) == ["pictures"], "temporary folder left behind"
    for name in PICTURES:
        image = Image.open(out / name)
        assert image.format == "PNG" and min(image.size) > 100, name


def test_autoguidance_guides_every_unconditional_picture_and_no_conditional_one(project, tmp_path_factory):
    if not (project / "plots/pictures").is_dir():
        assert visualize(project).returncode == 0
    params = {**TINY_PARAMS, "train_uncond": {"guide_at": 0.5},
              "visualize": {**TINY_PARAMS["visualize"], "autoguidance": 2.0}}
    guided = make_project(tmp_path_factory.mktemp("guided"), params, tiny_models(tmp_path_factory))
    proc = visualize(guided)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in PICTURES:
        same = (guided / "plots/pictures" / name).read_bytes() == (project / "plots/pictures" / name).read_bytes()
        assert same == (not name.startswith("uncond_")), name


def test_the_guidance_interval_reaches_the_conditional_pictures_only(project, tmp_path_factory):
    if not (project / "plots/pictures").is_dir():
        assert visualize(project).returncode == 0
    params = {**TINY_PARAMS, "sample": {**TINY_PARAMS["sample"], "guidance_interval": [0.5, 3.0]}}
    limited = make_project(tmp_path_factory.mktemp("interval"), params, tiny_models(tmp_path_factory))
    proc = visualize(limited)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("cond_classes.png", "cond_reverse.png", "uncond_reverse.png", "uncond_interpolation.png"):
        same = (limited / "plots/pictures" / name).read_bytes() == (project / "plots/pictures" / name).read_bytes()
        assert same == name.startswith("uncond_"), name


def test_stage_rejects_a_bad_visualize_param(project, tmp_path, monkeypatch):
    from stages.pipeline.params import ParamsError
    from stages.visualize import main

    defaults = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(merge(defaults, {**TINY_PARAMS, "visualize": {"frames": 1}})))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match=r"^params.yaml: visualize.frames = 1 is out of range; allowed: >= 2$"):
        main(["--uncond", str(project / "models/uncond.pt"), "--cond", str(project / "models/cond.pt"),
              "--out", "plots/pictures"])
    assert not (tmp_path / "plots").exists()
