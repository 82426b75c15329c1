"""Helpers for end-to-end tests: a tiny copy of the project in a temporary git + DVC repo."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.project import copy_project, merge  # noqa: F401 (merge: for the tests)

ROOT = Path(__file__).resolve().parents[1]

ALL_STAGES = {"profile", "check", "prepare", "classifier", "reference", "init-from", "train@uncond", "train@cond",
              "sample-ddpm@uncond", "sample-ddim@uncond", "sample-dpmsolver@uncond", "sample-ddpm@cond",
              "sample-ddim@cond", "sample-dpmsolver@cond", "evaluate", "visualize"}

# Small enough that a full `dvc repro` takes a minute or two on 2 CPU cores; fp32 (bf16 is slow on some CPUs),
# and every sampler.
TINY = {
    "device": "cpu",
    "data": {"name": "glyphs", "limit": 300, "test_limit": 100},
    "diffusion": {"timesteps": 40},
    "model": {"base_channels": 8, "channel_mults": [1, 2, 2], "attention_resolutions": [7], "num_heads": 2},
    "classifier": {"epochs": 4, "batch_size": 32, "width": 8},
    "train": {"epochs": 2, "batch_size": 50, "warmup_steps": 2, "checkpoint_every": 4, "grid_size": 20,
              "grid_ddim_steps": 5, "precision": "fp32"},
    "train_uncond": {"steps": None, "guide_at": 0.5},  # train.epochs, not the laptop profile's steps
    "train_cond": {"steps": None},
    "visualize": {"per_class": 2, "num_images": 2, "frames": 4, "steps": 5, "compare_steps": [5, 10]},
    "sample": {"methods": ["ddpm", "ddim", "dpmsolver"], "num_samples": 40, "batch_size": 40, "ddpm_steps": [40],
               "ddim_steps": [5, 10],
               "dpmsolver_steps": [5], "spacing": "uniform", "clip_x0": False, "guidance": [1.0],
               "autoguidance": [0.0, 1.0], "guidance_interval": None, "grid_size": 20},
}


def run(cmd: list[str] | str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command with the test interpreter's bin/ first on PATH, capturing its output."""
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, shell=isinstance(cmd, str))
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def stages_run(output: str) -> set[str]:
    """The names of the stages `dvc repro` / `dvc exp run` actually ran."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def make_repo(path: Path, overrides: dict) -> Path:
    """A git + DVC repo at `path` holding the project with `overrides` merged into params.yaml."""
    return copy_project(path, overrides, {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                                                              f"{os.environ['PATH']}"})


def make_image_folder(root: Path, per_class: int = 12, classes=("circle", "square")) -> Path:
    """A folder of RGB PNGs of odd sizes, one subfolder per class (none if `classes` is empty):
    a bright red disc or a bright blue square on a dark, noisy background."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for k, name in enumerate(classes or ("",)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = int(rng.integers(30, 70)), int(rng.integers(30, 70))
            img = Image.fromarray(rng.integers(0, 60, (h, w, 3), dtype=np.uint8))
            box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
            draw = ImageDraw.Draw(img)
            (draw.ellipse if k == 0 else draw.rectangle)(box, fill=(230, 40, 40) if k == 0 else (40, 40, 230))
            img.save(folder / f"{name or 'img'}_{i:03d}.png")
    return root
