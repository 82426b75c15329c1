"""A copy of the project in a new git + DVC repository, for runs that must leave the working one alone:
the tests' tiny pipelines and the GPU check; and the project's toy size, TINY, that both run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("ddpm", "stages", "dvc.yaml", "params.yaml", "profiles.yaml", "data/profile.json", ".gitignore",
                 ".dvcignore")
# Where a stage would log and which experiment it would join: set in a user's shell, or by a test
# (mlflow.set_tracking_uri sets MLFLOW_TRACKING_URI), they would send the stages run in a copy to another
# store than the copy's own.
TRACKING_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DDPM_TRACKING", "DDPM_MODEL_NAME",
                      "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT")

# The project at toy size (params.yaml overrides): a full `dvc repro` takes a minute or two on 2 CPU cores;
# fp32 for training and sampling (bf16 is slow on some CPUs, and fp32 samples are the same on every CPU), the
# fixed-decay EMA's weights, and every sampler. The tests' pipelines run it, and the GPU check's --tiny
# runs the gpu profile at this size.
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
    "visualize": {"per_class": 2, "num_images": 2, "frames": 4, "steps": 5, "compare_steps": [5, 10],
                  "sigma_rel": None},
    "sample": {"methods": ["ddpm", "ddim", "dpmsolver"], "num_samples": 40, "batch_size": 40, "ddpm_steps": [40],
               "ddim_steps": [5, 10],
               "dpmsolver_steps": [5], "spacing": "uniform", "clip_x0": False, "guidance": [1.0],
               "autoguidance": [0.0, 1.0], "guidance_interval": None, "grid_size": 20, "precision": "fp32",
               "sigma_rel": [None]},
}


def merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` merged in, section by section."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merge(base.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def copy_project(path: Path, overrides: dict, env: dict | None = None) -> Path:
    """A git + DVC repo at `path` holding the project (and its plot templates), with `overrides` merged
    into params.yaml, committed."""
    path.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, path / name)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = env or {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], ["git", "config", "user.name", "ddpm"],
                ["git", "config", "user.email", "ddpm@localhost"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=path, check=True, capture_output=True, env=env)
    shutil.copytree(ROOT / ".dvc/plots", path / ".dvc/plots", dirs_exist_ok=True)
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "the project"]):
        subprocess.run(cmd, cwd=path, check=True, capture_output=True, env=env)
    return path
