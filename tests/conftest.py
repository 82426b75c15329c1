"""Shared fixtures: the tiny project reproduced once per test session."""

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
