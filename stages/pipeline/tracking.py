"""MLflow tracking for the stages: one run per stage (or stage-variant), nested under one parent
run per pipeline state (a DVC experiment, or for a plain `dvc repro` a params + code state).

Where: MLFLOW_TRACKING_URI when set, else a SQLite store `mlflow.db` (artifacts in `mlartifacts/`)
at the repository root, resolved so that `dvc exp run --temp/--queue` copies under .dvc/tmp/exps/
log into the user's one store. Which experiment: MLFLOW_EXPERIMENT_NAME, else "ddpm", marked as one of
model training; `mlflow_ui_url` is the address of its runs table in the MLflow UI. The parent run starts
with the pipeline's first stage and ends with its last, FAILED while the last run of any stage failed. A stage
run whose process died without ending it (SIGKILL) ends KILLED when the next stage on that machine starts.
With MLflow's MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING on, each stage run gets system metrics too.
If the store cannot be reached (or is an empty, read-only or corrupt SQLite file) a stage stops at once
with one line, as it does when the store stops answering during the stage, unless DDPM_TRACKING=warn
(then it warns and runs untracked, and says what was not logged); DDPM_TRACKING=off disables tracking.
"""

import contextlib
import hashlib
import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image
from tqdm import tqdm

from ddpm.files import disk_full

from .io import why_unwritable
from .registry import describe_model_versions, log_pyfunc_model  # noqa: F401 -- evaluate's, from here

EXPERIMENT = "ddpm"
BATCH = 1000  # MLflow's limit of metrics per log_batch call
# Which view the MLflow UI opens an experiment in (runs table, or GenAI traces): the first MLflow 3 UIs read
# the experiment's kind tag; later ones (3.17) read only the UI's "GenAI / Model training" switch, from the
# page address (workflowType=) or else the choice last made in that browser, GenAI at first. So the
# experiment carries the tag, and the address that mlflow_ui_url gives carries the switch.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


class TrackingError(RuntimeError):
    """The tracking store cannot be reached, or its artifact store cannot be written."""


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


def mlflow_ui_url(experiment_id: str) -> str:
    """The experiment's runs table in the MLflow UI that `mlflow_ui_command` opens, in its "Model training"
    view (a page reached without workflowType= opens in the view last chosen with the UI's switch)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING_VIEW}"


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
    """An open MLflow stage run; every method is a no-op when tracking is disabled.

    If the store stops answering during the stage, the stage stops with one line (TrackingError); under
    DDPM_TRACKING=warn it goes on untracked and, at its end, says what was not logged."""

    def __init__(self, client: MlflowClient | None, run_id: str | None, parent_id: str | None,
                 experiment_id: str | None = None):
        self.client, self.run_id, self.parent_id, self.experiment_id = client, run_id, parent_id, experiment_id
        self.lost: list[str] | None = None  # once the store stopped answering: what was not logged

    def call(self, what: str | list[str] | None, fn, *args, **kwargs):
        """fn(client, *args, **kwargs) (e.g. fn = MlflowClient.log_batch) while the store answers. A store
        that stopped answering stops the stage with one line, or under DDPM_TRACKING=warn warns once, and
        `what` (names, None for a read) joins what was not logged."""
        if self.client is None:
            if self.lost is not None and what:
                self.lost += [what] if isinstance(what, str) else what
            return None
        try:
            return fn(self.client, *args, **kwargs)
        except Exception as e:
            if full := disk_full(e):  # the store's disk: its SQLite file, or the file MLflow was writing
                raise OSError(full.errno, full.strerror, full.filename or _store_file()) from None
            if _answers(self.client):
                if isinstance(e, OSError) and e.filename:  # the artifact store's folders refused a file
                    raise TrackingError(f"MLflow cannot store artifacts in {Path(e.filename).parent}: "
                                        f"{e.strerror or e}; make it writable and rerun the stage") from None
                raise  # a bug, which keeps its traceback
            self.client = None
            msg = f"MLflow tracking store {tracking_uri()} stopped answering ({type(e).__name__})"
            if os.environ.get("DDPM_TRACKING", "on") != "warn":
                raise TrackingError(f"{msg}; rerun the stage when it is back (training resumes from its "
                                    "checkpoint), or set DDPM_TRACKING=warn to finish without it") from None
            tqdm.write(f"warning: {msg}: the rest of this stage is not logged", file=sys.stderr)  # below any bar
            self.lost = []
            return self.call(what, fn, *args, **kwargs)

    def log_params(self, params: dict) -> None:
        items = [Param(k, json.dumps(list(v)) if isinstance(v, tuple) else str(v)) for k, v in flatten(params).items()]
        for run in (self.run_id, self.parent_id):
            for i in range(0, len(items), 100):
                self.call("params", MlflowClient.log_batch, run, params=items[i:i + 100])

    def set_tags(self, tags: dict) -> None:
        self.call("tags", MlflowClient.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict, step: int = 0, parent: bool = False) -> None:
        """Log numbers (nested dicts are flattened); also on the parent run when `parent`."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in flatten(metrics).items() if isinstance(v, (int, float))]
        for run in (self.run_id, self.parent_id) if parent else (self.run_id,):
            for i in range(0, len(items), BATCH):
                batch = items[i:i + BATCH]
                self.call([m.key for m in batch], MlflowClient.log_batch, run, metrics=batch)

    def log_history(self, name: str, points: list[tuple[int, float]]) -> None:
        """Log (step, value) points of one metric in batches."""
        now = int(time.time() * 1000)
        items = [Metric(name, float(v), now, int(s)) for s, v in points]
        for i in range(0, len(items), BATCH):
            self.call(name, MlflowClient.log_batch, self.run_id, metrics=items[i:i + BATCH])

    def last_step(self, name: str) -> int:
        """The last step logged for metric `name` (0 if none)."""
        history = self.call(None, MlflowClient.get_metric_history, self.run_id, name) or []
        return max((m.step for m in history), default=0)

    def logged(self, name: str, step: int) -> bool:
        """Whether metric `name` has a point at `step` already (a resumed run logged it before it was killed)."""
        return self.client is not None and self.last_step(name) >= step

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        log = MlflowClient.log_artifacts if path.is_dir() else MlflowClient.log_artifact
        self.call(path.name, log, self.run_id, str(path), artifact_path)

    def log_image(self, path: str | Path, key: str, step: int) -> None:
        """A PNG as point `step` of image series `key`: the MLflow UI shows a step slider and compares the
        series across runs."""
        self.call(key, MlflowClient.log_image, self.run_id, Image.open(path), key=key, step=step)

    def log_table(self, rows: list[dict] | dict, artifact_file: str) -> None:
        """A table (rows of dicts, or a dict of columns) as one artifact (.json), not as metrics."""
        if rows:
            self.call(artifact_file, MlflowClient.log_table, self.run_id, pd.DataFrame(rows), artifact_file)

    def log_dict(self, d: dict, artifact_file: str) -> None:
        """A (nested) dict as one JSON or YAML artifact, not as metrics."""
        self.call(artifact_file, MlflowClient.log_dict, self.run_id, d, artifact_file)

    def register_model(self, folder: Path, name: str | None) -> None:
        """Log the model files in `folder` as a pyfunc model, registered as a new version of `name` (not if None)."""
        self.call(f"model {name or ''}".strip(), log_pyfunc_model, self.run_id, Path(folder), name)

    def end(self, status: str) -> None:
        """Terminate the run as `status` and settle the parent run; say what was not logged, if anything."""
        self.call(None, MlflowClient.set_terminated, self.run_id, status)
        self.call(None, _settle_parent, self.experiment_id, self.parent_id)
        if self.lost is not None:
            lost = list(dict.fromkeys(self.lost))
            lost = ", ".join(lost[:20]) + (f" and {len(lost) - 20} more" if len(lost) > 20 else "")
            run = f" (run {self.run_id} stays RUNNING there)" if self.run_id else ""
            print(f"warning: not logged to MLflow{run}: {lost or 'the run'}", file=sys.stderr)


def _experiment_id(client: MlflowClient) -> str:
    """The experiment, marked as one of model training (KIND_TAG)."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if KIND_TAG not in exp.tags:  # made before this tag was set, or by hand
            client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
        return exp.experiment_id
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else (repo_root() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags={KIND_TAG: KIND})
    except MlflowException:  # created meanwhile by a parallel experiment
        return client.get_experiment_by_name(name).experiment_id


def _tag_equals(tag: str, value: str) -> str:
    """A filter string for tag = value. Filter strings cannot escape a quote, so a value holding one is
    matched with LIKE and `_` in its place: check the value of what it finds."""
    if "'" not in value:
        return f"tags.{tag} = '{value}'"
    return f"tags.{tag} LIKE '{value.replace(chr(39), '_').replace('%', '_')}'"


def _parent_run(client: MlflowClient, experiment_id: str, start_time: int) -> str:
    """The pipeline's parent run, RUNNING; a new one starts at `start_time`, as its first stage did."""
    key = _pipeline_key()
    found = [r for r in client.search_runs([experiment_id], _tag_equals("pipeline_key", key), max_results=100)
             if r.data.tags.get("pipeline_key") == key]
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    name = os.environ.get("DVC_EXP_NAME") or f"repro-{key[-8:]}"
    run = client.create_run(experiment_id, start_time, run_name=name, tags={"pipeline_key": key, "role": "pipeline",
                                                                   "git_commit": _git_commit(), **_dvc_tags()})
    return run.info.run_id


def _settle_parent(client: MlflowClient, experiment_id: str, parent: str) -> None:
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


def _process() -> dict:
    """The tags that say which process runs a stage run: the machine and the process id."""
    return {"host": socket.gethostname(), "pid": str(os.getpid())}


def _end_dead_runs(client: MlflowClient, experiment_id: str) -> None:
    """End KILLED the stage runs still RUNNING whose process on this machine is gone (killed by SIGKILL, or
    unable to end its run: a full disk under the store), and settle their pipeline runs."""
    host = _process()["host"]
    for r in client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and {_tag_equals('host', host)}"):
        pid = r.data.tags.get("pid", "")
        if r.data.tags.get("host") == host and pid.isdigit() and not _alive(int(pid)):
            client.set_terminated(r.info.run_id, "KILLED")
            if parent := r.data.tags.get("mlflow.parentRunId"):
                _settle_parent(client, experiment_id, parent)


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


def _exists(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def _dvc_tags() -> dict:
    return {k: os.environ[k] for k in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV") if os.environ.get(k)}


def _answers(client: MlflowClient) -> bool:
    try:
        client.search_experiments(max_results=1)
        return True
    except Exception:  # noqa: BLE001 -- whatever the failure, the store does not answer
        return False


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _store_file() -> str:
    """The store's SQLite file, else its address."""
    return str(_sqlite_path(tracking_uri()) or tracking_uri())


def _check_sqlite(path: Path) -> None:
    """Refuse a SQLite store file that would start empty or fail at the first write, with what to do."""
    if path.is_file() and path.stat().st_size == 0:
        raise TrackingError(f"MLflow store {path} is an empty file, not a store: its runs are gone; remove it to "
                            f"start a new store (rm {path}), or restore it from a backup")
    if path.is_file() and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
        raise TrackingError(f"MLflow store {path} is read-only (it and its folder must be writable): fix its "
                            "permissions, or set MLFLOW_TRACKING_URI to another store")


def _sqlite_damage(path: Path) -> str | None:
    """What SQLite finds wrong with the database file, or None."""
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            result = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as e:
        return str(e)
    return None if result == "ok" else result


def _connect() -> MlflowClient | None:
    """A client for the store, checked to answer; None when tracking is off or optional and down."""
    mode = os.environ.get("DDPM_TRACKING", "on")
    if mode == "off":
        return None
    for name in ("mlflow", "alembic"):  # keep table creation/migration chatter out of the stage's output
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # its thread's warnings: the store is down
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)  # the traceback of a failed query: the
    # error reaches the stage, which reports it (a full disk as one line)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the model files copied as it is logged
    uri, path = tracking_uri(), _sqlite_path(tracking_uri())
    try:
        if path:
            _check_sqlite(path)
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
        return client
    except TrackingError as e:
        msg = str(e)
    except Exception as e:  # noqa: BLE001 -- any failure to reach the store means the same to the user
        damage = _sqlite_damage(path) if path and path.is_file() else None
        msg = (f"MLflow store {path} is corrupt ({damage}); move it away to start a new store "
               f"(mv {path} {path}.corrupt)" if damage else
               f"MLflow tracking store {uri} is unreachable ({type(e).__name__}); start it, fix "
               "MLFLOW_TRACKING_URI, or set DDPM_TRACKING=warn to run without tracking")
    if mode == "warn":
        warnings.warn(msg, stacklevel=2)
        return None
    raise TrackingError(msg)


def _system_metrics(run_id: str, resume: bool):
    """MLflow's system-metrics monitor on the run (CPU, memory, disk, network, GPU when present) when
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is on, every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10)."""
    if not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get():
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=tracking_uri())
    monitor.start()
    return monitor


def _stop(monitor) -> None:
    """Stop the monitor and log what it sampled since its last point, so a short stage gets one too."""
    monitor.finish()
    if metrics := monitor.aggregate_metrics():
        monitor.publish_metrics(metrics)
        monitor.mlflow_logger.flush()


@contextlib.contextmanager
def stage_run(stage: str, variant: str | None = None, params: dict | None = None,
              data_hash: str | None = None, run_id: str | None = None):
    """Open (or, given `run_id`, reopen) the MLflow run of one stage; yields a Tracker.

    The run ends FINISHED, or FAILED if the stage raises; the pipeline's parent run ends with it."""
    client = _connect()
    if client is None:
        yield Tracker(None, None, None)
        return
    tracker = Tracker(client, None, None)
    resume = tracker.call("the stage run", _open, tracker, stage, variant, run_id)
    tags = {"stage": stage, "variant": variant or "", "git_commit": _git_commit(), **_dvc_tags(),
            "params_hash": hashlib.sha256(repr(sorted(flatten(params or {}).items())).encode()).hexdigest()[:16],
            "data_hash": data_hash or "", "mlflow.parentRunId": tracker.parent_id, **_process()}
    tracker.set_tags(tags)  # a resumed stage takes this invocation's: it joins the pipeline run resuming it
    tracker.log_params(params or {})
    monitor = _system_metrics(tracker.run_id, resume) if tracker.client else None
    try:
        _check_artifact_store(tracker)  # before any work, which would be lost at the first artifact
        yield tracker
    except BaseException:
        with contextlib.suppress(Exception):  # the stage's own error is the one to report
            if monitor and tracker.client:
                _stop(monitor)
            tracker.end("FAILED")
        raise
    if monitor and tracker.client:
        _stop(monitor)
    tracker.end("FINISHED")


def _check_artifact_store(tracker: Tracker) -> None:
    """Before any work, that the stage's MLflow run can store its artifacts where they go on this machine (the
    store's mlartifacts/ by default): else the stage would fail at its first artifact, after its work."""
    uri = tracker.call(None, lambda client: client.get_run(tracker.run_id).info.artifact_uri)
    if uri is None or urlparse(uri).scheme not in ("", "file"):  # none, or kept by a tracking server
        return
    folder = Path(url2pathname(urlparse(uri).path))
    if why := why_unwritable(folder):
        raise TrackingError(f"MLflow cannot store this run's artifacts in {folder}: {why}; fix its permissions, "
                            "or set MLFLOW_TRACKING_URI to another store")


def _open(client: MlflowClient, tracker: Tracker, stage: str, variant: str | None, run_id: str | None) -> bool:
    """Find or start the parent run and start (or reopen) the stage's run in `tracker`; whether it reopened."""
    tracker.experiment_id = _experiment_id(client)
    _end_dead_runs(client, tracker.experiment_id)
    if run_id is not None and not _exists(client, run_id):  # e.g. mlflow.db was removed; checkpoints kept
        print(f"MLflow run {run_id} is not in {tracking_uri()}: logging to a new run")
        run_id = None
    if run_id is None:
        run = client.create_run(tracker.experiment_id, run_name=f"{stage}-{variant}" if variant else stage)
        tracker.run_id, start = run.info.run_id, run.info.start_time
    else:
        client.update_run(run_id, status="RUNNING")
        tracker.run_id, start = run_id, int(time.time() * 1000)
    tracker.parent_id = _parent_run(client, tracker.experiment_id, start)
    return run_id is not None
