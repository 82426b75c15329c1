"""The pipeline's parent run: one MLflow run per pipeline state (a DVC experiment, or for a plain
`dvc repro` a params + code state) that nests its stages' runs. It starts with the pipeline's first stage
and ends with its last, FAILED while the last run of any stage failed."""

import hashlib
import os
import socket
import subprocess
from pathlib import Path

from mlflow.tracking import MlflowClient


def git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else os.environ.get("DVC_EXP_BASELINE_REV", "unknown")


def dvc_tags() -> dict:
    """The DVC experiment that runs this stage, if any, as run tags."""
    return {k: os.environ[k] for k in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV") if os.environ.get(k)}


def _pipeline_key() -> str:
    """One parent run per DVC experiment; for a plain repro, per params.yaml + code state."""
    if os.environ.get("DVC_EXP_NAME"):
        return f"exp:{os.environ['DVC_EXP_NAME']}:{os.environ.get('DVC_EXP_BASELINE_REV', '')}"
    h = hashlib.sha256()
    for f in sorted([Path("params.yaml"), Path("dvc.yaml"), *Path("ddpm").glob("*.py"), *Path("stages").rglob("*.py")]):
        if f.is_file():
            h.update(f.read_bytes())
    return f"repro:{h.hexdigest()[:16]}"


def _tag_equals(tag: str, value: str) -> str:
    """A filter string for tag = value. Filter strings cannot escape a quote, so a value holding one is
    matched with LIKE and `_` in its place: check the value of what it finds."""
    if "'" not in value:
        return f"tags.{tag} = '{value}'"
    return f"tags.{tag} LIKE '{value.replace(chr(39), '_').replace('%', '_')}'"


def parent_run(client: MlflowClient, experiment_id: str, start_time: int) -> str:
    """The pipeline's parent run, RUNNING; a new one starts at `start_time`, as its first stage did."""
    key = _pipeline_key()
    found = [r for r in client.search_runs([experiment_id], _tag_equals("pipeline_key", key), max_results=100)
             if r.data.tags.get("pipeline_key") == key]
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    name = os.environ.get("DVC_EXP_NAME") or f"repro-{key[-8:]}"
    run = client.create_run(experiment_id, start_time, run_name=name, tags={"pipeline_key": key, "role": "pipeline",
                                                                   "git_commit": git_commit(), **dvc_tags()})
    return run.info.run_id


def settle_parent(client: MlflowClient, experiment_id: str, parent: str) -> None:
    """The parent run spans its stages: RUNNING while one runs; else it ends when its last stage ended,
    FAILED if the last run of any stage failed."""
    latest = {}  # stage run name -> its newest run
    for r in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'",
                                order_by=["attributes.start_time ASC"]):
        latest[r.info.run_name] = r
    statuses = {r.info.status for r in latest.values()}
    if "RUNNING" in statuses:
        return
    end = max((r.info.end_time or 0 for r in latest.values()), default=None) or None
    client.set_terminated(parent, "FAILED" if statuses - {"FINISHED"} else "FINISHED", end_time=end)


def process_tags() -> dict:
    """The tags that say which process runs a stage run: the machine and the process id."""
    return {"host": socket.gethostname(), "pid": str(os.getpid())}


def end_dead_runs(client: MlflowClient, experiment_id: str) -> None:
    """End KILLED the stage runs still RUNNING whose process on this machine is gone (killed by SIGKILL, or
    unable to end its run: a full disk under the store), and settle their pipeline runs."""
    host = process_tags()["host"]
    for r in client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and {_tag_equals('host', host)}"):
        pid = r.data.tags.get("pid", "")
        if r.data.tags.get("host") == host and pid.isdigit() and not _alive(int(pid)):
            client.set_terminated(r.info.run_id, "KILLED")
            if parent := r.data.tags.get("mlflow.parentRunId"):
                settle_parent(client, experiment_id, parent)


def _alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill would end it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
