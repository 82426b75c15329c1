"""Shared fixtures: the tiny project reproduced once per test session, and two experiments on it."""

import os
from pathlib import Path

import pytest
from helpers import TINY, make_repo, run

from benchmarks.project import TRACKING_VARIABLES


@pytest.fixture(autouse=True)
def hermetic_environment():
    """Every test starts without the variables that point stages at another tracking store
    (TRACKING_VARIABLES), and what it changes in os.environ ends with it."""
    saved = dict(os.environ)
    for name in TRACKING_VARIABLES:
        os.environ.pop(name, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> tuple[Path, str]:
    """The tiny project after one `dvc repro` from scratch (with its output), committed."""
    repo = make_repo(tmp_path_factory.mktemp("pipeline") / "repo", TINY)
    proc = run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "reproduced"], repo)
    return repo, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def tiny_experiments(tiny_repo) -> dict[str, str]:
    """Two experiments on the tiny project: a sample param in the workspace, and a switch to the gpu profile
    with two values of one's own, one that no profile sets (cosine lr decay) and one that overrides the
    profile's (DDIM spacing), in a temporary copy (`--temp`, which runs under .dvc/tmp/exps/). Returns each
    one's output."""
    repo, _ = tiny_repo
    out = {}
    gpu = ["--temp", "-S", "profile=gpu", "-S", "train.lr_schedule=cosine", "-S", "sample.spacing=quadratic"]
    for name, args in [("eta-half", ["-S", "sample.eta=[0.5]"]), ("gpu", gpu)]:
        proc = run(["dvc", "exp", "run", "-n", name, *args], repo)
        out[name] = proc.stdout + proc.stderr
    return out
