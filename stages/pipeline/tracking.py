"""MLflow tracking for the stages: one run per stage (or stage-variant), nested under the pipeline's parent
run (parent_run.py), in the store that store.py finds and checks. A Tracker is the open run; if the store
stops answering during the stage, the stage stops at once with one line, unless DDPM_TRACKING=warn (then
it warns and runs untracked, and says what was not logged). With MLflow's MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
on, each stage run gets system metrics too (system_metrics.py).
"""

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image
from tqdm import tqdm

from ddpm.files import disk_full

from .keys import flatten
from .parent_run import dvc_tags, end_dead_runs, git_commit, parent_run, process_tags, settle_parent
from .registry import log_pyfunc_model
from .store import TrackingError, answers, check_artifact_folder, connect, experiment_id, store_file, tracking_uri
from .system_metrics import start_monitor, stop_monitor

BATCH = 1000  # MLflow's limit of metrics per log_batch call


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
                raise OSError(full.errno, full.strerror, full.filename or store_file()) from None
            if answers(self.client):
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

    def log_params(self, params: dict, reopened: bool = False) -> None:
        """Log `params` on the stage's run and the parent run. A reopened run keeps the values it was started
        with (MLflow never changes a param): one that differs now, such as a resumed training's train.nproc or
        train.micro_batches (which do not make it another run), is set as the tag `resumed_with.<key>`."""
        values = {k: json.dumps(list(v)) if isinstance(v, tuple) else str(v) for k, v in flatten(params).items()}
        for run in (self.run_id, self.parent_id):
            logged = self.call(None, lambda client, r=run: client.get_run(r).data.params) if reopened and (
                run == self.run_id) else None
            changed = {k: v for k, v in values.items() if k in (logged or {}) and logged[k] != v}
            if changed:
                self.set_tags({f"resumed_with.{k}": v for k, v in changed.items()})
            items = [Param(k, v) for k, v in values.items() if k not in changed]
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
        self.call(None, settle_parent, self.experiment_id, self.parent_id)
        if self.lost is not None:
            lost = list(dict.fromkeys(self.lost))
            lost = ", ".join(lost[:20]) + (f" and {len(lost) - 20} more" if len(lost) > 20 else "")
            run = f" (run {self.run_id} stays RUNNING there)" if self.run_id else ""
            print(f"warning: not logged to MLflow{run}: {lost or 'the run'}", file=sys.stderr)


@contextlib.contextmanager
def stage_run(stage: str, variant: str | None = None, params: dict | None = None,
              data_hash: str | None = None, run_id: str | None = None):
    """Open (or, given `run_id`, reopen) the MLflow run of one stage; yields a Tracker.

    The run ends FINISHED, or FAILED if the stage raises; the pipeline's parent run ends with it."""
    client = connect()
    if client is None:
        yield Tracker(None, None, None)
        return
    tracker = Tracker(client, None, None)
    resume = tracker.call("the stage run", _open, tracker, stage, variant, run_id)
    tags = {"stage": stage, "variant": variant or "", "git_commit": git_commit(), **dvc_tags(),
            "params_hash": hashlib.sha256(repr(sorted(flatten(params or {}).items())).encode()).hexdigest()[:16],
            "data_hash": data_hash or "", "mlflow.parentRunId": tracker.parent_id, **process_tags()}
    tracker.set_tags(tags)  # a resumed stage takes this invocation's: it joins the pipeline run resuming it
    tracker.log_params(params or {}, reopened=resume)
    monitor = start_monitor(tracker.run_id, resume) if tracker.client else None
    try:
        uri = tracker.call(None, lambda client: client.get_run(tracker.run_id).info.artifact_uri)
        check_artifact_folder(uri)  # before any work, which would be lost at the first artifact
        yield tracker
    except BaseException:
        with contextlib.suppress(Exception):  # the stage's own error is the one to report
            if monitor and tracker.client:
                stop_monitor(monitor)
            tracker.end("FAILED")
        raise
    if monitor and tracker.client:
        stop_monitor(monitor)
    tracker.end("FINISHED")


def _open(client: MlflowClient, tracker: Tracker, stage: str, variant: str | None, run_id: str | None) -> bool:
    """Find or start the parent run and start (or reopen) the stage's run in `tracker`; whether it reopened."""
    tracker.experiment_id = experiment_id(client)
    end_dead_runs(client, tracker.experiment_id)
    if run_id is not None and not _exists(client, run_id):  # e.g. mlflow.db was removed; checkpoints kept
        print(f"MLflow run {run_id} is not in {tracking_uri()}: logging to a new run")
        run_id = None
    if run_id is None:
        run = client.create_run(tracker.experiment_id, run_name=f"{stage}-{variant}" if variant else stage)
        tracker.run_id, start = run.info.run_id, run.info.start_time
    else:
        client.update_run(run_id, status="RUNNING")
        tracker.run_id, start = run_id, int(time.time() * 1000)
    tracker.parent_id = parent_run(client, tracker.experiment_id, start)
    return run_id is not None


def _exists(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False
