"""A copy of the project in a new git + DVC repository, for runs that must leave the working one alone:
the tests' tiny pipelines and the GPU check."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("ddpm", "stages", "dvc.yaml", "params.yaml", "profiles.yaml", "data/profile.json", ".gitignore",
                 ".dvcignore")


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
