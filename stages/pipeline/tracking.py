"""MLflow tracking for the stages: one run per stage (or stage-variant), nested under one parent
run per pipeline state (a DVC experiment, or for a plain `dvc repro` a params + code state).

Where: MLFLOW_TRACKING_URI when set, else a SQLite store `mlflow.db` (artifacts in `mlartifacts/`)
at the repository root, resolved so that `dvc exp run --temp/--queue` copies under .dvc/tmp/exps/
log into the user's one store. Which experiment: MLFLOW_EXPERIMENT_NAME, else "ddpm".
If the store cannot be reached a stage stops at once, unless DDPM_TRACKING=warn (then it warns
and runs untracked); DDPM_TRACKING=off disables tracking.
"""

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import time
import warnings
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

EXPERIMENT = "ddpm"
BATCH = 1000  # MLflow's limit of metrics per log_batch call


class TrackingError(RuntimeError):
    """The tracking store cannot be reached."""


def repo_root() -> Path:
    """The user's repository, also from inside a DVC temporary experiment copy."""
    cwd = str(Path.cwd().resolve())
    marker = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"
    return Path(cwd[:cwd.index(marker)]) if marker in cwd else Path(cwd)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def mlflow_ui_command() -> str:
    """The command that opens the MLflow UI on the store the stages log to."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and uri.startswith("http"):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri or 'sqlite:///mlflow.db'}"


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, f"{key}.") if isinstance(v, dict) else {key: v})
    return out


def _git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else os.environ.get("DVC_EXP_BASELINE_REV", "unknown")


def _pipeline_key() -> str:
    """One parent run per DVC experiment; for a plain repro, per params.yaml + code state."""
    if os.environ.get("DVC_EXP_NAME"):
        return f"exp:{os.environ['DVC_EXP_NAME']}:{os.environ.get('DVC_EXP_BASELINE_REV', '')}"
    h = hashlib.sha256()
    for f in sorted([Path("params.yaml"), Path("dvc.yaml"), *Path("ddpm").glob("*.py"), *Path("stages").rglob("*.py")]):
        if f.is_file():
            h.update(f.read_bytes())
    return f"repro:{h.hexdigest()[:16]}"


class Tracker:
    """An open MLflow stage run; every method is a no-op when tracking is disabled."""

    def __init__(self, client: MlflowClient | None, run_id: str | None, parent_id: str | None):
        self.client, self.run_id, self.parent_id = client, run_id, parent_id

    def log_params(self, params: dict) -> None:
        if self.client:
            items = [Param(k, json.dumps(list(v)) if isinstance(v, tuple) else str(v))
                     for k, v in flatten(params).items()]
            for run in (self.run_id, self.parent_id):
                for i in range(0, len(items), 100):
                    self.client.log_batch(run, params=items[i:i + 100])

    def set_tags(self, tags: dict) -> None:
        if self.client:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict, step: int = 0, parent: bool = False) -> None:
        """Log numbers (nested dicts are flattened); also on the parent run when `parent`."""
        if self.client:
            now = int(time.time() * 1000)
            items = [Metric(k, float(v), now, step) for k, v in flatten(metrics).items()
                     if isinstance(v, (int, float))]
            for run in (self.run_id, self.parent_id) if parent else (self.run_id,):
                for i in range(0, len(items), BATCH):
                    self.client.log_batch(run, metrics=items[i:i + BATCH])

    def log_history(self, name: str, points: list[tuple[int, float]]) -> None:
        """Log (step, value) points of one metric in batches."""
        if self.client:
            now = int(time.time() * 1000)
            items = [Metric(name, float(v), now, int(s)) for s, v in points]
            for i in range(0, len(items), BATCH):
                self.client.log_batch(self.run_id, metrics=items[i:i + BATCH])

    def last_step(self, name: str) -> int:
        """The last step logged for metric `name` (0 if none)."""
        if not self.client:
            return 0
        history = self.client.get_metric_history(self.run_id, name)
        return max((m.step for m in history), default=0)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.client:
            path = Path(path)
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def register_model(self, artifact_path: str, name: str) -> None:
        """Add the artifacts at `artifact_path` as a new version of registered model `name`."""
        if self.client:
            with contextlib.suppress(MlflowException):
                self.client.create_registered_model(name)
            source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
            self.client.create_model_version(name, source, run_id=self.run_id)


def _experiment_id(client: MlflowClient) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else (repo_root() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by a parallel experiment
        return client.get_experiment_by_name(name).experiment_id


def _parent_run(client: MlflowClient, experiment_id: str) -> str:
    key = _pipeline_key()
    found = client.search_runs([experiment_id], f"tags.pipeline_key = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    name = os.environ.get("DVC_EXP_NAME") or f"repro-{key[-8:]}"
    run = client.create_run(experiment_id, run_name=name, tags={"pipeline_key": key, "role": "pipeline",
                                                                   "git_commit": _git_commit(), **_dvc_tags()})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _exists(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def _dvc_tags() -> dict:
    return {k: os.environ[k] for k in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV") if os.environ.get(k)}


def _connect() -> MlflowClient | None:
    """A client for the store, checked to answer; None when tracking is off or optional and down."""
    mode = os.environ.get("DDPM_TRACKING", "on")
    if mode == "off":
        return None
    for name in ("mlflow", "alembic"):  # keep table creation/migration chatter out of the stage's output
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uri = tracking_uri()
    try:
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
        return client
    except Exception as e:  # noqa: BLE001 -- any failure to reach the store means the same to the user
        msg = f"MLflow tracking store {uri} is unreachable ({type(e).__name__}); start it, fix " \
              "MLFLOW_TRACKING_URI, or set DDPM_TRACKING=warn to run without tracking"
        if mode == "warn":
            warnings.warn(msg, stacklevel=2)
            return None
        raise TrackingError(msg) from None


@contextlib.contextmanager
def stage_run(stage: str, variant: str | None = None, params: dict | None = None,
              data_hash: str | None = None, run_id: str | None = None):
    """Open (or, given `run_id`, reopen) the MLflow run of one stage; yields a Tracker.

    The run ends FINISHED, or FAILED if the stage raises."""
    client = _connect()
    if client is None:
        yield Tracker(None, None, None)
        return
    experiment_id = _experiment_id(client)
    parent = _parent_run(client, experiment_id)
    tags = {"stage": stage, "variant": variant or "", "git_commit": _git_commit(), **_dvc_tags(),
            "params_hash": hashlib.sha256(repr(sorted(flatten(params or {}).items())).encode()).hexdigest()[:16],
            "data_hash": data_hash or "", "mlflow.parentRunId": parent}
    if run_id is not None and not _exists(client, run_id):  # e.g. mlflow.db was removed; checkpoints kept
        print(f"MLflow run {run_id} is not in {tracking_uri()}: logging to a new run")
        run_id = None
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=f"{stage}-{variant}" if variant else stage).info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
    tracker = Tracker(client, run_id, parent)
    tracker.set_tags(tags)  # a resumed stage takes this invocation's: it joins the pipeline run resuming it
    tracker.log_params(params or {})
    try:
        yield tracker
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
