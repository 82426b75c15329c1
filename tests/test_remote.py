"""Sharing results without retraining: dvc push to a remote, delete, dvc pull."""

import json
import shutil

import pytest
from helpers import run

pytestmark = pytest.mark.slow


def test_push_delete_pull_restores_outputs(tiny_repo, tmp_path):
    repo, _ = tiny_repo
    run(["dvc", "remote", "add", "--local", "-f", "-d", "shared", str(tmp_path / "remote")], repo)
    run(["dvc", "push"], repo)
    model = (repo / "models/cond/model.pt").read_bytes()
    for out in ("models", "samples", "data/prepared"):
        shutil.rmtree(repo / out)
    assert "deleted" in run(["dvc", "status"], repo).stdout
    run(["dvc", "pull"], repo)
    assert (repo / "models/cond/model.pt").read_bytes() == model
    assert (repo / "samples/uncond/ddim/index.json").is_file()
    status = json.loads(run(["dvc", "status", "--json"], repo).stdout)
    assert status == {"init-from": ["always changed"]}, status  # init-from always looks at its source
