"""Where a model comes from: a model file (.pt), an export folder, or a model that MLflow holds, named by a
URI: `models:/NAME@ALIAS`, `models:/NAME/VERSION` (a registered version), `models:/MODEL_ID` (a logged model)
or `runs:/RUN_ID/PATH` (a run's artifacts, e.g. `runs:/<id>/model`).

`local_model(source)` gives the path that `load_model` reads: a file or folder as it is, a URI's artifacts
downloaded into a temporary folder (removed afterwards) and the model file found in them. MLflow is imported
only to resolve a URI, so the library works without it.
"""

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import EXPORT_CONFIG, CheckpointError

URI_FORMS = "models:/NAME@ALIAS, models:/NAME/VERSION, models:/MODEL_ID or runs:/RUN_ID/PATH"
_URI = re.compile(r"models:/[^/@\s]+(@[\w.-]+|/\d+)|models:/m-[0-9a-f]+|runs:/\w+/\S+")


class ModelSourceError(CheckpointError):
    """A model URI that is malformed or does not resolve to a model of this project."""


def is_model_uri(source: str | Path) -> bool:
    """Whether `source` names a model that MLflow holds (rather than a path)."""
    return isinstance(source, str) and source.startswith(("models:/", "runs:/"))


def check_model_uri(uri: str) -> None:
    """Raise ModelSourceError unless `uri` has one of the forms of URI_FORMS."""
    if not _URI.fullmatch(uri):
        raise ModelSourceError(f"{uri} is not a model URI of the forms {URI_FORMS}")


@dataclass(frozen=True)
class Resolved:
    """What a model URI names in an MLflow store now."""
    uri: str                # a URI that names that model for good (an alias's version: models:/NAME/3)
    location: str           # where its artifacts are, for mlflow.artifacts.download_artifacts
    run_id: str | None      # the run that logged it
    model_id: str | None    # its logged model, where it is one


@contextlib.contextmanager
def local_model(source: str | Path, tracking_uri: str | None = None) -> Iterator[Path]:
    """The path of model `source` on this machine, for `load_model`: a path as it is; a URI's artifacts
    downloaded from MLflow's store at `tracking_uri` (default: MLflow's own, i.e. MLFLOW_TRACKING_URI) into a
    temporary folder that lives as long as the block, and in it the model file (`find_model`). A guide model
    logged beside the model file is found beside it (`guide_path`)."""
    if not is_model_uri(source):
        yield Path(source)
        return
    with tempfile.TemporaryDirectory(prefix="ddpm-model-") as tmp:
        yield find_model(download(source, Path(tmp), tracking_uri), source)


def find_model(path: Path, source: str) -> Path:
    """In what `source` downloaded to `path`, what `load_model` reads: a file itself; in a folder, model.pt (a
    run's model/ artifacts), artifacts/model.pt (the pyfunc model the pipeline registers) or an export."""
    if path.is_file():
        return path
    for candidate in (path / "model.pt", path / "artifacts" / "model.pt"):
        if candidate.is_file():
            return candidate
    if (path / EXPORT_CONFIG).is_file():
        return path
    raise ModelSourceError(f"{source} holds no model of this project (no model.pt, nor a `ddpm export` folder)")


def resolve(uri: str, tracking_uri: str | None = None) -> Resolved:
    """What `uri` names in the store at `tracking_uri` (default: MLflow's own) now; one line naming the URI if
    it names nothing there. The registry is MLFLOW_REGISTRY_URI's, else the same store."""
    import mlflow
    from mlflow.exceptions import MlflowException

    check_model_uri(uri)
    tracking_uri = require_store(uri, tracking_uri or mlflow.get_tracking_uri())
    client = mlflow.MlflowClient(tracking_uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri)
    registered = re.fullmatch(r"models:/([^/@]+)(?:@(.+)|/(\d+))", uri)
    with _quiet_mlflow(), _one_line(uri, tracking_uri, MlflowException):
        if registered:
            name, alias, number = registered.groups()
            v = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
            logged = v.model_id or (v.source.removeprefix("models:/") if v.source.startswith("models:/m-") else None)
            return Resolved(f"models:/{name}/{v.version}", client.get_model_version_download_uri(name, v.version),
                            v.run_id, logged)
        if uri.startswith("runs:/"):  # downloaded as it is: a runs:/ URI resolves in the store given
            return Resolved(uri, uri, client.get_run(uri.split("/")[1]).info.run_id, None)
        model = client.get_logged_model(uri.removeprefix("models:/"))
        return Resolved(uri, model.artifact_location, model.source_run_id, model.model_id)


def download(uri: str, folder: Path, tracking_uri: str | None = None) -> Path:
    """The artifacts that `uri` names, downloaded into `folder`; one line naming the URI if it does not resolve."""
    import mlflow
    from mlflow.exceptions import MlflowException

    resolved = resolve(uri, tracking_uri)
    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    with _quiet_mlflow(), _one_line(uri, tracking_uri, MlflowException):
        return Path(mlflow.artifacts.download_artifacts(resolved.location, dst_path=str(folder),
                                                        tracking_uri=tracking_uri))


def require_store(uri: str, tracking_uri: str) -> str:
    """`tracking_uri`, unless it is a SQLite store file that is not there (MLflow would create an empty one):
    then one line naming `uri`."""
    store = Path(tracking_uri.removeprefix("sqlite:///")) if tracking_uri.startswith("sqlite:///") else None
    if store is not None and not store.is_file():
        raise ModelSourceError(f"{uri}: there is no MLflow store {store}; set MLFLOW_TRACKING_URI to the one "
                               "that holds the model")
    return tracking_uri


@contextlib.contextmanager
def _one_line(uri: str, tracking_uri: str, errors):
    """MLflow's `errors` inside the block as one line naming `uri` (ModelSourceError)."""
    try:
        yield
    except errors as e:
        why = (str(e.message).strip().splitlines() or [type(e).__name__])[0]
        raise ModelSourceError(f"{uri} does not resolve in MLflow store {tracking_uri}: {why}") from None


@contextlib.contextmanager
def _quiet_mlflow():
    """No download progress bars or store-migration chatter on the command line while a URI resolves."""
    saved = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.level, logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if saved is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved
