"""Shared fixtures: the tiny project reproduced once per test session, and two experiments on it."""

from pathlib import Path

import pytest
from helpers import TINY, make_repo, run


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
    """Two experiments on the tiny project: a sample param in the workspace, and the quick profile's
    training and sampling changes (train.lr, v-prediction, Min-SNR weighting, cosine lr decay, DDIM
    spacing) in a temporary copy (`--temp`, which runs under .dvc/tmp/exps/). Returns each one's output."""
    repo, _ = tiny_repo
    out = {}
    quick = ["--temp", "-S", "train.lr=2e-3", "-S", "diffusion.prediction=v", "-S", "train.min_snr_gamma=5",
             "-S", "train.lr_schedule=cosine", "-S", "sample.spacing=quadratic"]
    for name, args in [("eta-half", ["-S", "sample.eta=[0.5]"]), ("quick", quick)]:
        proc = run(["dvc", "exp", "run", "-n", name, *args], repo)
        out[name] = proc.stdout + proc.stderr
    return out
