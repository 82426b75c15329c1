"""Fine-tuning: a model that starts from another model's weights (train_<variant>.init_from) instead of from
scratch. The init-from stage copies that model into an init folder (`fetch`): model.pt, or an export's
model.safetensors and config.json, beside source.json, which says where it came from; with init_from null
the folder holds only source.json. The train stage reads the folder (`InitSource.read`), so DVC reruns
training exactly when the model it starts from changed, and a teammate reproduces it from the DVC cache
without the MLflow store that a registry URI names.
"""

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ddpm import CheckpointError, UNetConfig, load_model
from ddpm.checkpoint import EXPORT_CONFIG, EXPORT_WEIGHTS
from ddpm.sources import is_model_uri, local_model, resolve

from .io import file_hash, write_json
from .params import ParamsError

SOURCE = "source.json"


@dataclass(frozen=True)
class InitSource:
    """Where a fine-tuned model starts: init_from as params.yaml gives it and what it resolved to."""
    init_from: str | None = None  # None: from scratch
    resolved: str | None = None   # a registry alias's version (models:/ddpm-cond/3), else init_from
    run_id: str | None = None     # the MLflow run that trained the source, where known
    model_id: str | None = None   # the source's MLflow logged model, where known
    model_hash: str | None = None  # the hash of the source's weights file
    path: Path | None = None      # the copied model, for load_model

    @classmethod
    def of(cls, folder: Path | None, init_from: str | None, key: str) -> "InitSource":
        """Where a model starts: the init folder the init-from stage wrote for it (None: not given, so from
        scratch, unless `init_from`, the value of param `key`, says otherwise)."""
        if folder is not None:
            return cls.read(folder)
        if init_from is not None:
            raise ParamsError(f"params.yaml: {key} = {init_from!r} needs the init folder that the init-from stage "
                              "writes: train through `dvc repro`")
        return cls()

    @classmethod
    def read(cls, folder: Path) -> "InitSource":
        """The init folder that the init-from stage wrote."""
        folder = Path(folder)
        source = json.loads((folder / SOURCE).read_text())
        path = folder / "model.pt" if (folder / "model.pt").is_file() else folder
        return cls(**source, path=path if source["init_from"] else None)

    def tags(self) -> dict:
        """The MLflow tags that say where a run started (none for a run from scratch)."""
        fields = {"init_from": self.init_from, "init_from_resolved": self.resolved, "init_from_run": self.run_id,
                  "init_from_model_hash": self.model_hash}
        return {k: v for k, v in fields.items() if v is not None} if self.init_from else {}

    def weights(self, unet: UNetConfig, key: str) -> dict[str, torch.Tensor] | None:
        """The source's weights for a network of config `unet` (None: from scratch); a source of another
        architecture is one line naming param `key` and every config field that differs."""
        if self.init_from is None:
            return None
        model = load_model(self.path)[0]
        theirs, ours = asdict(model.config), asdict(unet)
        differ = [f"{k} {theirs.get(k)!r} (here {v!r})" for k, v in ours.items() if theirs.get(k) != v]
        if differ:
            raise ParamsError(f"params.yaml: {key} = {self.init_from!r} is a model of another architecture than "
                              f"the one params.yaml and the data give: {', '.join(differ)}")
        return model.state_dict()


def fetch(init_from: str | None, folder: Path, key: str, trained: Path, tracking_uri: str | None = None) -> dict:
    """Copy the model that `init_from` (the value of param `key`) names into `folder` and write source.json; a
    source inside `trained` (the models this pipeline trains) is refused: training would restart from its own
    output at every run. Returns source.json's content."""
    if init_from is None:
        source = {"init_from": None}
    elif is_model_uri(init_from):
        resolved = resolve(init_from, tracking_uri)
        source = {"init_from": init_from, "resolved": resolved.uri, "run_id": resolved.run_id,
                  "model_id": resolved.model_id}
        with local_model(resolved.uri, tracking_uri) as path:  # that version, even if the alias moves meanwhile
            source["model_hash"] = copy_model(path, folder, f"{key} = {init_from!r}")
    else:
        if Path(init_from).resolve().is_relative_to(Path(trained).resolve()):
            raise ParamsError(f"params.yaml: {key} = {init_from!r} is a model this pipeline trains, so training "
                              "would start over from its own output at every run; copy it out of "
                              f"{trained}/ first, or name its registered version (models:/NAME/VERSION)")
        source = {"init_from": init_from, "resolved": init_from,
                  "model_hash": copy_model(Path(init_from), folder, f"{key} = {init_from!r}")}
    write_json(folder / SOURCE, source)
    return source


def copy_model(path: Path, folder: Path, what: str) -> str:
    """Copy the model at `path` (a model file, an export folder or one of its .safetensors files) into `folder`,
    checked to load (else one line naming `what`: the param and its value); returns its weights file's hash."""
    if path.is_dir() or path.suffix == ".safetensors":
        weights = path / EXPORT_WEIGHTS if path.is_dir() else path
        files = {weights: folder / EXPORT_WEIGHTS, weights.with_name(EXPORT_CONFIG): folder / EXPORT_CONFIG}
    else:
        files = {path: folder / "model.pt"}
    try:
        for src, dst in files.items():
            if not src.is_file():
                raise CheckpointError(f"{src}: no such file")
            shutil.copyfile(src, dst)
        load_model(folder / "model.pt" if folder / "model.pt" in files.values() else folder)
    except CheckpointError as e:  # its message starts with the copy's path: name the param instead
        raise ParamsError(f"params.yaml: {what} is not a model of this project: {str(e).split(': ', 1)[-1]}") from None
    return file_hash(next(iter(files.values())))
