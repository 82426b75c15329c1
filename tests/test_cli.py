"""The `ddpm` command line on tiny trained models: each command once as a fresh process, as a user
runs it, and the rest through `ddpm.cli.main` in this process (a fresh process costs a torch import)."""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import (
    Autoguided,
    ClassifierFree,
    Diffusion,
    DiffusionConfig,
    TrainConfig,
    Trainer,
    UNet,
    UNetConfig,
    atomic_save,
    generate,
    guidance_interval,
    guide_path,
    load_model,
    posthoc_path,
    save_model,
)
from ddpm.cli import main
from ddpm.data import make_glyphs

T = 20
CLASS_NAMES = ["zero", "one", "two"]
PAD = 2  # torchvision make_grid padding


def build_models(folder: Path) -> dict[str, Path]:
    """A tiny unconditional and a tiny 3-class conditional model file, each after a few training steps, with
    <variant>-posthoc.pt beside each (post-hoc EMA snapshots of two widths at every step) and uncond-guide.pt,
    the unconditional model's guide for autoguidance (its EMA weights halfway)."""
    data = make_glyphs(100, 3, seed=0)
    keep = data.train_labels < len(CLASS_NAMES)
    images, labels = data.train_images[keep], data.train_labels[keep]
    paths = {}
    for variant, k in (("uncond", None), ("cond", len(CLASS_NAMES))):
        torch.manual_seed(0)
        unet = UNetConfig(base_channels=8, channel_mults=(1, 2), attention_resolutions=(), num_heads=2,
                          num_classes=k)
        dcfg = DiffusionConfig(timesteps=T)
        config = TrainConfig(epochs=1, batch_size=10, warmup_steps=1, ema_decay=0.5, guide_at=0.0 if k else 0.5,
                             posthoc_sigma_rels=(0.05, 0.1), posthoc_snapshots=3)
        trainer = Trainer(UNet(unet), Diffusion(dcfg.betas()), images, labels if k else None, config,
                          torch.device("cpu"))
        trainer.fit(progress=False)
        assert trainer.step >= 3
        paths[variant] = folder / f"{variant}.pt"
        meta = {"variant": variant, "class_names": CLASS_NAMES}
        save_model(paths[variant], trainer.ema.module, unet, dcfg, meta)
        atomic_save({"snapshots": trainer.snapshots, "meta": meta}, posthoc_path(paths[variant]))
        if trainer.guide is not None:
            save_model(guide_path(paths[variant]), trainer.guide, unet, dcfg, meta)
    return paths


_MODELS: dict[str, Path] = {}


def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """The models of `build_models`, built once per test session (the visualize tests use them too)."""
    if not _MODELS:
        _MODELS.update(build_models(tmp_path_factory.mktemp("models")))
    return _MODELS


@pytest.fixture
def models(tmp_path_factory, tmp_path, monkeypatch) -> dict[str, Path]:
    monkeypatch.chdir(tmp_path)  # in-process runs of `main` write where a subprocess would
    return tiny_models(tmp_path_factory)


def ddpm(*args, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m ddpm ARGS` in a fresh process, of this checkout's ddpm (not whichever one is installed)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "ddpm", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=env)


def ok(*args, cwd: Path) -> subprocess.CompletedProcess:
    proc = ddpm(*args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def in_process(*args) -> None:
    """The same command through `main` in this process (cheaper than a fresh one: no torch import)."""
    assert main([str(a) for a in args]) == 0


def grid_size(n: int, nrow: int, side: int = 28) -> tuple[int, int]:
    """(width, height) of torchvision's make_grid of n > 1 side x side images, nrow to a row, padding 2."""
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    return cols * (side + PAD) + PAD, rows * (side + PAD) + PAD


def tile(png: Path, row: int, col: int, side: int = 28) -> np.ndarray:
    """One image of a grid PNG: (side, side) uint8."""
    array = np.asarray(Image.open(png))
    top, left = PAD + row * (side + PAD), PAD + col * (side + PAD)
    return array[top:top + side, left:left + side]


# name: (args without --model/--seed/--out, model, expected (width, height))
COMMANDS = {
    "sample": (["sample", "--num", "5", "--steps", "3"], "uncond", grid_size(5, 3)),
    "sample-cond": (["sample", "--num", "4", "--steps", "3", "--guidance", "1"], "cond", grid_size(6, 2)),
    "reverse": (["reverse", "--num", "2", "--frames", "4", "--steps", "5"], "cond", grid_size(2 * 2 * 4, 4)),
    "interpolate": (["interpolate", "--num", "2", "--frames", "5", "--steps", "3"], "uncond", grid_size(10, 5)),
    "compare": (["compare", "--num", "2", "--steps", "2", "4"], "uncond", grid_size(2 * 4, 4)),
}


@pytest.mark.parametrize("name", COMMANDS)
def test_command_writes_a_grid_reproducible_by_seed(models, tmp_path, name):
    args, variant, size = COMMANDS[name]
    args = [*args, "--model", models[variant], "--device", "cpu"]
    ok(*args, "--seed", 0, "--out", "a/b/first.png", cwd=tmp_path)  # creates a/b
    in_process(*args, "--seed", 0, "--out", "a/b/again.png")
    in_process(*args, "--seed", 1, "--out", "a/b/other.png")
    first, again, other = ((tmp_path / "a/b" / f"{n}.png").read_bytes() for n in ("first", "again", "other"))
    assert Image.open(tmp_path / "a/b/first.png").size == size
    assert first == again, "the same seed gave a different picture"
    assert first != other, "a different seed gave the same picture"
    assert sorted(p.name for p in (tmp_path / "a/b").iterdir()) == ["again.png", "first.png", "other.png"]


def test_sample_array_matches_the_grid_and_any_batching(models, tmp_path):
    common = ["sample", "--model", models["uncond"], "--num", "5", "--steps", "3", "--device", "cpu"]
    in_process(*common, "--out", "s.png", "--save-array", "arrays/s.npz")
    in_process(*common, "--batch-size", "2", "--out", "s2.png", "--save-array", "s2.npz")
    data = np.load(tmp_path / "arrays/s.npz")
    assert data["images"].shape == (5, 1, 28, 28) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [-1] * 5
    assert data["images"].std() > 0
    np.testing.assert_array_equal(tile(tmp_path / "s.png", 1, 1), data["images"][4, 0])  # 3 to a row
    np.testing.assert_array_equal(np.load(tmp_path / "s2.npz")["images"], data["images"])


def test_sample_autoguidance_is_that_of_generate_with_the_guide_beside_the_model(models, tmp_path):
    common = ["sample", "--model", models["uncond"], "--num", "3", "--steps", "4", "--device", "cpu"]
    in_process(*common, "--autoguidance", "2", "--labels", "--out", "a.png", "--save-array", "a.npz")
    model, diffusion, _ = load_model(models["uncond"])
    guide = load_model(guide_path(models["uncond"]))[0]
    expected = generate(Autoguided(model, guide, 2.0), diffusion, 3, (1, 28, 28), seed=0, steps=4)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["images"], expected.numpy())
    assert not torch.equal(expected, generate(model, diffusion, 3, (1, 28, 28), seed=0, steps=4))


def test_sample_guidance_is_that_of_generate_with_the_classifier_free_guided_model(models, tmp_path):
    in_process("sample", "--model", models["cond"], "--num", "3", "--class", "1", "--steps", "4", "--guidance", "3",
               "--device", "cpu", "--out", "g.png", "--save-array", "g.npz")
    model, diffusion, _ = load_model(models["cond"])
    labels = torch.ones(3, dtype=torch.long)
    expected = generate(ClassifierFree(model, 3.0), diffusion, 3, (1, 28, 28), seed=0, steps=4, labels=labels)
    np.testing.assert_array_equal(np.load(tmp_path / "g.npz")["images"], expected.numpy())
    assert not torch.equal(expected, generate(model, diffusion, 3, (1, 28, 28), seed=0, steps=4, labels=labels))
    in_process("sample", "--model", models["cond"], "--num", "3", "--class", "1", "--steps", "4", "--guidance", "3",
               "--guidance-interval", "0.5", "3", "--device", "cpu", "--out", "i.png", "--save-array", "i.npz")
    limited = generate(ClassifierFree(model, 3.0, guidance_interval(diffusion, 0.5, 3.0)), diffusion, 3, (1, 28, 28),
                       seed=0, steps=4, labels=labels)
    np.testing.assert_array_equal(np.load(tmp_path / "i.npz")["images"], limited.numpy())
    assert not torch.equal(limited, expected)


def test_sample_spacing_and_clipping_are_those_of_generate(models, tmp_path):
    common = ["sample", "--model", models["uncond"], "--num", "3", "--steps", "4", "--device", "cpu"]
    in_process(*common, "--spacing", "trailing", "--clip-x0", "--out", "t.png", "--save-array", "t.npz")
    in_process(*common, "--out", "u.png", "--save-array", "u.npz")
    model, diffusion, _ = load_model(models["uncond"])
    expected = generate(model, diffusion, 3, (1, 28, 28), seed=0, steps=4, spacing="trailing", clip_x0=True)
    trailing = np.load(tmp_path / "t.npz")["images"]
    np.testing.assert_array_equal(trailing, expected.numpy())
    assert not np.array_equal(trailing, np.load(tmp_path / "u.npz")["images"])


def test_sample_method_dpmsolver_is_that_of_generate(models, tmp_path):
    in_process("sample", "--model", models["uncond"], "--num", "3", "--steps", "4", "--method", "dpmsolver",
               "--spacing", "trailing", "--device", "cpu", "--out", "d.png", "--save-array", "d.npz")
    model, diffusion, _ = load_model(models["uncond"])
    expected = generate(model, diffusion, 3, (1, 28, 28), seed=0, method="dpmsolver", steps=4, spacing="trailing")
    np.testing.assert_array_equal(np.load(tmp_path / "d.npz")["images"], expected.numpy())


def test_conditional_sample_has_one_row_per_class_and_takes_class_names(models, tmp_path):
    common = ["sample", "--model", models["cond"], "--steps", "3", "--device", "cpu"]
    in_process(*common, "--num", "4", "--out", "all.png", "--save-array", "all.npz")
    assert np.load(tmp_path / "all.npz")["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    in_process(*common, "--num", "3", "--class", "two", "--out", "name.png", "--save-array", "name.npz")
    in_process(*common, "--num", "3", "--class", "2", "--out", "index.png")
    assert np.load(tmp_path / "name.npz")["labels"].tolist() == [2, 2, 2]
    assert Image.open(tmp_path / "name.png").size == grid_size(3, 2)
    assert (tmp_path / "name.png").read_bytes() == (tmp_path / "index.png").read_bytes()


def test_compare_columns_are_the_samplers_of_sample(models, tmp_path):
    """Column "DDIM 4" of compare is `sample --steps 4`; column "DDPM 20" is `sample --method ddpm`."""
    common = ["--model", models["uncond"], "--num", "2", "--seed", "3", "--device", "cpu"]
    in_process("compare", *common, "--steps", "4", str(T), "--out", "c.png")
    in_process("sample", *common, "--steps", "4", "--out", "ddim.png", "--save-array", "ddim.npz")
    in_process("sample", *common, "--method", "ddpm", "--out", "ddpm.png", "--save-array", "ddpm.npz")
    ddim, full = np.load(tmp_path / "ddim.npz")["images"], np.load(tmp_path / "ddpm.npz")["images"]
    for i in range(2):  # columns: DDPM 4, DDPM 20, DDIM 4, DDIM 20
        np.testing.assert_array_equal(tile(tmp_path / "c.png", i, 1), full[i, 0])
        np.testing.assert_array_equal(tile(tmp_path / "c.png", i, 2), ddim[i, 0])
    assert not np.array_equal(ddim, full)


def test_labels_write_a_figure_around_the_grid(models, tmp_path):
    in_process("compare", "--model", models["cond"], "--num", "2", "--steps", "2", "--labels", "--device", "cpu",
               "--out", "c.png")
    width, height = Image.open(tmp_path / "c.png").size
    raw_width, raw_height = grid_size(2 * 2, 2)
    assert width > raw_width and height > raw_height  # room for the labels


def test_schedule_command_plots_three_panels(tmp_path):
    ok("schedule", "--timesteps", "50", "--out", "plots/schedule.png", cwd=tmp_path)
    image = np.asarray(Image.open(tmp_path / "plots/schedule.png").convert("L"))
    assert image.shape[1] > 2 * image.shape[0] and image.std() > 10  # side by side, not blank


def test_schedule_timesteps_beyond_this_machine_are_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["schedule", "--timesteps", str(10**10), "--out", "plots/schedule.png"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: argument --timesteps: 10000000000 needs about 3000 GB to plot"), err
    assert "use at most" in err
    assert not (tmp_path / "plots").exists()


def test_console_script_is_installed(tmp_path):
    script = Path(sys.executable).parent / "ddpm"
    proc = subprocess.run([script, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("sample", "reverse", "interpolate", "compare"))


# name: (args, the words the error line must contain); "{uncond}", "{cond}", "{text}" are model paths
BAD = {
    "missing model": (["sample", "--model", "missing.pt"], ["missing.pt", "no such file"]),
    "text file as model": (["sample", "--model", "{text}"], ["notes.txt", "not a checkpoint written by this project"]),
    "class out of range": (["sample", "--model", "{cond}", "--class", "5"], ["--class 5", "[0, 2]", "zero"]),
    "class on uncond": (["reverse", "--model", "{uncond}", "--class", "1"], ["--class", "unconditional"]),
    "guidance on uncond": (["sample", "--model", "{uncond}", "--guidance", "1"], ["--guidance", "unconditional"]),
    "autoguidance on cond": (["sample", "--model", "{cond}", "--autoguidance", "1"],
                             ["--autoguidance", "class-conditional", "--guidance"]),
    "autoguidance without a guide": (["sample", "--model", "{lone}", "--autoguidance", "1"],
                                     ["--autoguidance", "lone/model-guide.pt", "train_uncond.guide_at > 0"]),
    "steps 0": (["sample", "--model", "{uncond}", "--steps", "0"], ["--steps", ">= 1"]),
    "steps above T": (["sample", "--model", "{uncond}", "--steps", "21"], ["--steps 21", "T = 20"]),
    "compare steps above T": (["compare", "--model", "{uncond}", "--steps", "5", "50"], ["--steps 50", "T = 20"]),
    "negative guidance": (["sample", "--model", "{cond}", "--guidance", "-1"], ["--guidance", ">= 0"]),
    "negative eta": (["sample", "--model", "{uncond}", "--eta", "-0.5"], ["--eta", ">= 0"]),
    "eta with ddpm": (["sample", "--model", "{uncond}", "--method", "ddpm", "--eta", "1"], ["--eta", "ddim"]),
    "eta with dpmsolver": (["sample", "--model", "{uncond}", "--method", "dpmsolver", "--eta", "1"],
                           ["--eta", "ddim"]),
    "num 0": (["interpolate", "--model", "{uncond}", "--num", "0"], ["--num 0", "[1, "]),
    "out not png": (["sample", "--model", "{uncond}", "--out", "x.jpg"], ["--out", ".png"]),
    "unknown spacing": (["sample", "--model", "{uncond}", "--spacing", "cubic"], ["--spacing", "'cubic'"]),
    "interval upside down": (["sample", "--model", "{cond}", "--guidance", "1", "--guidance-interval", "3", "1"],
                             ["--guidance-interval 3 1", "0 <= low < high"]),
    "negative interval": (["sample", "--model", "{cond}", "--guidance", "1", "--guidance-interval", "-1", "1"],
                          ["--guidance-interval -1 1", "0 <= low < high"]),
    # every entry point as strict as params.yaml (ddpm.request): finite weights, eta and interval, bounded --num
    "infinite guidance": (["sample", "--model", "{cond}", "--guidance", "inf"], ["--guidance inf", "finite"]),
    "infinite eta": (["sample", "--model", "{uncond}", "--eta", "inf"], ["--eta inf", "finite"]),
    "infinite autoguidance": (["sample", "--model", "{uncond}", "--autoguidance", "inf"],
                              ["--autoguidance inf", "finite"]),
    "infinite guidance in a picture": (["reverse", "--model", "{cond}", "--guidance", "inf"], ["--guidance inf"]),
    "infinite interval": (["sample", "--model", "{cond}", "--guidance", "1", "--guidance-interval", "0", "inf"],
                          ["--guidance-interval 0 inf", "finite"]),
    "negative class": (["sample", "--model", "{cond}", "--class", "-1"], ["--class -1", "[0, 2]", "zero"]),
    "num beyond the bound": (["sample", "--model", "{uncond}", "--num", "1000000000"],
                             ["--num 1000000000", "10,000"]),
    "num beyond the bound in a picture": (["compare", "--model", "{cond}", "--num", "1000000000"], ["--num"]),
    "interpolation beyond the bound": (["interpolate", "--model", "{uncond}", "--num", "100", "--frames", "1000"],
                                       ["--frames 1000", "10000"]),
    "seed beyond 64 bits": (["sample", "--model", "{uncond}", "--seed", str(2**64)], ["--seed", "2**63 - 1"]),
}


def bad_args(case: str, models: dict[str, Path], folder: Path) -> tuple[list[str], list[str]]:
    args, words = BAD[case]
    (folder / "notes.txt").write_text("not a model\n")
    (folder / "lone").mkdir(exist_ok=True)  # an unconditional model with no model-guide.pt beside it
    shutil.copy(models["uncond"], folder / "lone/model.pt")
    args = [a.format(text=folder / "notes.txt", lone=folder / "lone/model.pt", **models) for a in args]
    return args + ([] if "--out" in args else ["--out", "out/picture.png"]) + ["--device", "cpu"], words


@pytest.mark.parametrize("case", BAD)
def test_bad_argument_is_one_error_line_before_any_work(models, tmp_path, capsys, case):
    args, words = bad_args(case, models, tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "out").exists(), "wrote an output despite the error"


@pytest.mark.parametrize("case", ["text file as model", "steps 0", "steps above T", "infinite guidance",
                                  "num beyond the bound"])
def test_bad_argument_in_a_real_process(models, tmp_path, case):
    """The process itself: exit status 2, the one line on stderr, no traceback."""
    args, words = bad_args(case, models, tmp_path)
    proc = ddpm(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(w in lines[0] for w in words), proc.stderr
    assert proc.stdout == "" and not (tmp_path / "out").exists()
