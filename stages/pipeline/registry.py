"""The trained models in MLflow: each logged as a pyfunc model (`mlflow_model.DiffusionSampler`, with the
model files, the `ddpm` package and an input example beside it) and registered as a new version of
`<prefix>-<variant>`, tagged with the hashes of its model file and of the data it was trained on (the train
run logs that data as its input dataset). Evaluate describes the versions it scored
(`describe_model_versions`) and points the alias `champion` at the best of those scored comparably (`crown`),
which `mlflow.pyfunc.load_model("models:/ddpm-cond@champion")` loads.
"""

import contextlib
import json
import os
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput, LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema, TensorSpec

import ddpm

from . import mlflow_model
from .io import file_hash

MODEL_FILES = {"model": "model.pt", "guide": ddpm.guide_path("model.pt").name}
INPUT_EXAMPLE = pd.DataFrame({"num": [4], "seed": [0]})  # four images (a conditional model: classes 0..3)
CHAMPION = "champion"  # the alias of the best version: models:/ddpm-cond@champion
HEADLINE = "fid"  # the version tag that ranks versions, lower is better: the best sampler setting's FID
KEY_TAG = "comparability_key"  # versions compare only when this tag is equal (`comparability_key`)
# what the protocol records that does not change how the headline is scored: the sampler settings each model
# was scored at (a model's own choice), and the other extractors scored beside the headline's (and whether
# Inception-v3 could be had)
NOT_PROTOCOL = ("samplers", "extractors", "inception")


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
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.pyfunc.save_model(
            Path(tmp) / "model", python_model=mlflow_model.__file__, artifacts=artifacts,
            code_paths=[str(Path(ddpm.__file__).parent)], signature=signature(folder / "model.pt"),
            input_example=INPUT_EXAMPLE,
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                              "numpy", "pandas"],
            mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id, model_id=logged.model_id))
        client.log_model_artifacts(logged.model_id, str(Path(tmp) / "model"))
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    if name:
        with contextlib.suppress(MlflowException):  # it exists already
            client.create_registered_model(name)
        tags = {"model_hash": file_hash(folder / "model.pt"),
                "data_hash": client.get_run(run_id).data.tags.get("data_hash", "")}
        with global_tracking_uri(client.tracking_uri):  # MLflow's registry looks the model up in the global store
            client.create_model_version(name, f"models:/{logged.model_id}", run_id=run_id, model_id=logged.model_id,
                                        tags=tags)
    return logged.model_id


def log_dataset(client: MlflowClient, run_id: str, info: dict, folder: Path, context: str = "training") -> None:
    """Log the prepared data (`info`: its info.json; `folder`: where it lies) as an input dataset of run
    `run_id`, its digest the data's content hash: the MLflow UI shows it on the run, and so beside every model
    version that run registered."""
    profile = {k: info[k] for k in ("shape", "train_count", "test_count", "class_names") if k in info}
    dataset = Dataset(info["dataset"], info["content_hash"][:32], "local", json.dumps({"uri": str(folder)}),
                      profile=json.dumps(profile))
    client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])


def record_lineage(tracker, info: dict, data: Path, init) -> None:
    """What a train run (`tracker`) started from: the prepared data (`info`, in folder `data`) as its input
    dataset and, when it fine-tunes (`init`: a finetune.InitSource), tags naming the source and the source's
    logged model as an input model."""
    tracker.call("input dataset", log_dataset, tracker.run_id, info, data)
    tracker.set_tags(init.tags())
    if init.model_id:
        tracker.call("input model", MlflowClient.log_inputs, tracker.run_id, models=[LoggedModelInput(init.model_id)])


def comparability_key(protocol: dict) -> str:
    """A short hash of how evaluate scored (its results["protocol"]: the data's content hash, the extractor, the
    splits and sizes, the seed, ...): two versions' scores compare only when their keys are equal. Everything
    the protocol holds counts except NOT_PROTOCOL, so a setting added to it later splits the comparisons."""
    return ddpm.config_hash({k: v for k, v in protocol.items() if k not in NOT_PROTOCOL})


def crown(client: MlflowClient, name: str, key: str) -> str | None:
    """Point alias `champion` of registered model `name` at the version with the best (lowest) HEADLINE among
    those scored under comparability key `key`, and never at one worse than the current champion of that key
    (a tie keeps it). A champion scored under another key (other data or another protocol) has no comparable
    score, so the alias follows the protocol of the latest evaluation. Returns what it did, in a line."""
    scored = [v for v in client.search_model_versions(f"name = '{name}'")
              if v.tags.get(KEY_TAG) == key and _score(v) is not None]
    if not scored:
        return None
    best = min(scored, key=lambda v: (_score(v), int(v.version)))
    current = None
    with contextlib.suppress(MlflowException):  # no champion yet (search results do not carry aliases)
        current = next((v for v in scored if v.version == client.get_model_version_by_alias(name, CHAMPION).version),
                       None)
    if current is not None and _score(current) <= _score(best):
        return f"{name}@{CHAMPION} stays version {current.version} ({HEADLINE} {_score(current):.4g})"
    client.set_registered_model_alias(name, CHAMPION, best.version)
    return f"{name}@{CHAMPION} is now version {best.version} ({HEADLINE} {_score(best):.4g})"


def _score(version) -> float | None:
    with contextlib.suppress(KeyError, ValueError):
        return float(version.tags[HEADLINE])
    return None


def evaluated_version(client: MlflowClient, name: str, parent_id: str | None, model_hash: str | None = None):
    """The version of registered model `name` whose model file has hash `model_hash` (the newest such); without
    a hash, the newest version trained under pipeline run `parent_id`, else the newest version (the pipeline
    reused a model trained earlier). None when there is none."""
    with contextlib.suppress(MlflowException):  # no such registered model
        versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
        if model_hash is not None:
            return next((v for v in reversed(versions) if v.tags.get("model_hash") == model_hash), None)
        for v in reversed(versions):
            if v.run_id and client.get_run(v.run_id).data.tags.get("mlflow.parentRunId") == parent_id:
                return v
        return versions[-1] if versions else None
    return None


def describe_model_versions(tracker, headlines: dict[str, dict], protocol: dict | None = None,
                            model_hashes: dict[str, str | None] | None = None) -> None:
    """Tag and describe, for each variant evaluated by this pipeline run (`tracker`: the evaluate stage's
    Tracker), its registered model version: e.g. headlines = {"cond": {"fid": 3.1, "fid_over_floor": 1.4,
    "sampler": "ddim50_eta0_w0.5"}} sets tags fid, fid_over_floor, sampler and pipeline_run, and a description
    that lists them; given the evaluation's `protocol`, also its comparability key, and moves the alias
    champion (`crown`). The version is `evaluated_version`'s: the one whose model file the samples were drawn
    from (`model_hashes[variant]`), else the newest trained under this pipeline run, else the newest. Nothing
    without tracking, a registered model prefix (DDPM_MODEL_NAME) or such a version."""
    names = {variant: registered_name(variant) for variant in headlines}
    if tracker.client is None or None in names.values():
        return
    pipeline = tracker.call(None, MlflowClient.get_run, tracker.parent_id)
    pipeline = pipeline.info.run_name if pipeline else tracker.parent_id
    for variant, headline in headlines.items():
        name = names[variant]
        version = tracker.call(None, evaluated_version, name, tracker.parent_id, (model_hashes or {}).get(variant))
        if version is None:
            continue
        key = {KEY_TAG: comparability_key(protocol)} if protocol is not None else {}
        for k, v in {**headline, "pipeline_run": pipeline, **key}.items():
            tracker.call(f"model {name}", MlflowClient.set_model_version_tag, name, version.version, k, v)
        text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in headline.items())
        tracker.call(f"model {name}", MlflowClient.update_model_version, name, version.version,
                     f"Evaluated in pipeline run {pipeline}: {text}.")
        if key and (line := tracker.call(f"alias {name}@{CHAMPION}", crown, name, key[KEY_TAG])):
            print(line)
