"""The trained models in MLflow: each logged as a pyfunc model (`mlflow_model.DiffusionSampler`, with the
model files and the `ddpm` package beside it) and registered as a new version of `<prefix>-<variant>`,
which `mlflow.pyfunc.load_model("models:/ddpm-cond/latest")` loads; evaluate describes those versions
(`describe_model_versions`).
"""

import contextlib
import os
import tempfile
import warnings
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema, TensorSpec

import ddpm

from . import mlflow_model

MODEL_FILES = {"model": "model.pt", "guide": ddpm.guide_path("model.pt").name}


def registered_name(variant: str) -> str | None:
    """The registered model that `variant`'s trained versions go to: `<prefix>-<variant>`, the prefix
    DDPM_MODEL_NAME (unset: "ddpm"); None when DDPM_MODEL_NAME is set empty (then nothing is registered)."""
    prefix = os.environ.get("DDPM_MODEL_NAME", "ddpm")
    return f"{prefix}-{variant}" if prefix else None


@contextlib.contextmanager
def global_tracking_uri(uri: str):
    """MLflow's global tracking URI set to `uri` (it defaults to the working directory's store, which a
    `dvc exp run --temp` copy does not share), restored afterwards."""
    from mlflow.tracking._tracking_service import utils

    saved_env, saved = os.environ.get("MLFLOW_TRACKING_URI"), utils._tracking_uri
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = saved
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def signature(model_file: Path) -> ModelSignature:
    """Input: the columns of `DiffusionSampler` (only `num` required); output: uint8 (N, C, H, W) images."""
    config = ddpm.load_model(model_file)[0].config
    inputs = Schema([ColSpec(t, name, required=name == "num") for name, t in mlflow_model.COLUMNS.items()])
    shape = (-1, *config.sample_shape)
    return ModelSignature(inputs, Schema([TensorSpec(np.dtype(np.uint8), shape)]))


def log_pyfunc_model(client: MlflowClient, run_id: str, folder: Path, name: str | None) -> str:
    """Log the model files in `folder` (model.pt, and model-guide.pt if there) as a pyfunc model of run
    `run_id`, and register it as a new version of `name` unless None; returns the logged model's id."""
    artifacts = {key: str(folder / f) for key, f in MODEL_FILES.items() if (folder / f).is_file()}
    experiment_id = client.get_run(run_id).info.experiment_id
    # not named "model", the run's folder of model files, which MLflow would list with the logged model's
    logged = client.create_logged_model(experiment_id, name="sampler", source_run_id=run_id, model_type="ddpm")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*input example was not provided")  # the signature says it all
        mlflow.pyfunc.save_model(
            Path(tmp) / "model", python_model=mlflow_model.__file__, artifacts=artifacts,
            code_paths=[str(Path(ddpm.__file__).parent)], signature=signature(folder / "model.pt"),
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                              "numpy", "pandas"],
            mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id, model_id=logged.model_id))
        client.log_model_artifacts(logged.model_id, str(Path(tmp) / "model"))
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    if name:
        with contextlib.suppress(MlflowException):  # it exists already
            client.create_registered_model(name)
        with global_tracking_uri(client.tracking_uri):  # MLflow's registry looks the model up in the global store
            client.create_model_version(name, f"models:/{logged.model_id}", run_id=run_id, model_id=logged.model_id)
    return logged.model_id


def evaluated_version(client: MlflowClient, name: str, parent_id: str | None):
    """The newest version of registered model `name` trained under pipeline run `parent_id`, else the newest
    version (the pipeline reused a model trained earlier); None when there is none."""
    with contextlib.suppress(MlflowException):  # no such registered model
        versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
        for v in reversed(versions):
            if v.run_id and client.get_run(v.run_id).data.tags.get("mlflow.parentRunId") == parent_id:
                return v
        return versions[-1] if versions else None
    return None


def describe_model_versions(tracker, headlines: dict[str, dict]) -> None:
    """Tag and describe, for each variant evaluated by this pipeline run (`tracker`: the evaluate stage's
    Tracker), its registered model version: e.g. headlines = {"cond": {"fid": 3.1, "fid_over_floor": 1.4,
    "sampler": "ddim50_eta0_w0.5"}} sets tags fid, fid_over_floor, sampler and pipeline_run, and a description
    that lists them. The version is `evaluated_version`'s (the newest trained under this pipeline run, else the
    newest). Nothing without tracking, a registered model prefix (DDPM_MODEL_NAME) or such a version."""
    names = {variant: registered_name(variant) for variant in headlines}
    if tracker.client is None or None in names.values():
        return
    pipeline = tracker.call(None, MlflowClient.get_run, tracker.parent_id)
    pipeline = pipeline.info.run_name if pipeline else tracker.parent_id
    for variant, headline in headlines.items():
        name = names[variant]
        version = tracker.call(None, evaluated_version, name, tracker.parent_id)
        if version is None:
            continue
        for k, v in {**headline, "pipeline_run": pipeline}.items():
            tracker.call(f"model {name}", MlflowClient.set_model_version_tag, name, version.version, k, v)
        text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in headline.items())
        tracker.call(f"model {name}", MlflowClient.update_model_version, name, version.version,
                     f"Evaluated in pipeline run {pipeline}: {text}.")
