"""Where the stages' MLflow store is, whether it answers, and how a user opens it.

Where: MLFLOW_TRACKING_URI when set, else a SQLite store `mlflow.db` (artifacts in `mlartifacts/`) at the
repository root, resolved so that `dvc exp run --temp/--queue` copies under .dvc/tmp/exps/ log into the
user's one store. Which experiment: MLFLOW_EXPERIMENT_NAME, else "ddpm", marked as one of model training;
`mlflow_ui_url` is the address of its runs table in the MLflow UI. A store that cannot be reached (or is an
empty, read-only or corrupt SQLite file) is one line naming it and what to do, unless DDPM_TRACKING=warn
(then a warning, and no tracking); DDPM_TRACKING=off disables tracking.
"""

import contextlib
import logging
import os
import sqlite3
import warnings
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .io import why_unwritable

EXPERIMENT = "ddpm"
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


def experiment_id(client: MlflowClient, name: str | None = None) -> str:
    """The experiment `name` (None: $MLFLOW_EXPERIMENT_NAME, else EXPERIMENT), made if need be, marked as one of
    model training (KIND_TAG)."""
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
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


def answers(client: MlflowClient) -> bool:
    """Whether the store answers a query now."""
    try:
        client.search_experiments(max_results=1)
        return True
    except Exception:  # noqa: BLE001 -- whatever the failure, the store does not answer
        return False


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def store_file() -> str:
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


def connect() -> MlflowClient | None:
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


def check_artifact_folder(uri: str | None) -> None:
    """Before any work, that a run whose artifacts go to `uri` can store them on this machine (the store's
    mlartifacts/ by default): else the stage would fail at its first artifact, after its work."""
    if uri is None or urlparse(uri).scheme not in ("", "file"):  # none, or kept by a tracking server
        return
    folder = Path(url2pathname(urlparse(uri).path))
    if why := why_unwritable(folder):
        raise TrackingError(f"MLflow cannot store this run's artifacts in {folder}: {why}; fix its permissions, "
                            "or set MLFLOW_TRACKING_URI to another store")
