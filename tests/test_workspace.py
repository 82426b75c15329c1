"""Two pipelines in one workspace: DVC lets go of its lock while a stage runs, and a second `dvc exp run`
used to write its -S values into params.yaml under the first (whose stages, and MLflow parent run, then
carried the second one's values). Now the second stops before it writes anything, naming the first."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import TINY, make_repo, run
from mlflow.tracking import MlflowClient

from stages.pipeline.workspace import HELD

pytestmark = pytest.mark.slow

# Run after the check stage: the first pipeline then waits (at most 5 minutes) for a file `go`, running for
# as long as the test needs.
WAIT_FOR_GO = """import os, time
deadline = time.time() + 300
while not os.path.exists("go") and time.time() < deadline:
    time.sleep(0.1)
"""


def until(condition, what: str, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def holders(repo: Path) -> list[dict] | None:
    """The entries for the workspace in DVC's experiments lock; None while the file is being written."""
    path = repo / ".dvc/tmp/exps/rwlock"
    try:
        lock = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return None
    return lock.get("read", {}).get("workspace", [])


def test_a_second_exp_run_while_a_pipeline_runs_is_refused_and_the_first_keeps_its_values(tmp_path):
    repo = make_repo(tmp_path / "repo", TINY)
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    dvc_yaml["stages"]["check"]["cmd"] += " && python wait_for_go.py"
    (repo / "wait_for_go.py").write_text(WAIT_FOR_GO)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "check waits"], repo)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    first = subprocess.Popen(["dvc", "exp", "run", "-n", "first", "-S", "data.limit=200", "prepare"], cwd=repo,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        until(lambda: (repo / "data/params-checked.txt").is_file() or first.poll() is not None,
              "the first pipeline to run its check stage")
        assert first.poll() is None, first.stdout.read()
        before = (repo / "params.yaml").read_text()
        second = run(["dvc", "exp", "run", "-n", "second", "-S", "data.limit=150", "prepare"], repo, check=False)
        out = second.stdout + second.stderr
        assert second.returncode != 0 and "'workspace' is busy" in out
        assert f"dvc exp run -n first -S data.limit=200 prepare {HELD}" in out
        assert (repo / "params.yaml").read_text() == before  # refused before it wrote anything
        (repo / "go").touch()
        out = first.communicate(timeout=300)[0]
    finally:
        first.kill()
    assert first.returncode == 0, out
    assert yaml.safe_load((repo / "params.yaml").read_text())["data"]["limit"] == 200
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddpm").experiment_id
    (parent,) = client.search_runs([experiment], "tags.role = 'pipeline'")
    assert parent.data.tags["DVC_EXP_NAME"] == "first" and parent.data.params["data.limit"] == "200"
    until(lambda: holders(repo) == [], "the hold to be released once the first command ended", 30)
