"""Checkpoints and model files: written atomically, read with `torch.load(weights_only=True)`.

A training checkpoint is a dict of tensors and plain values (model and EMA weights, optimizer
state, step, RNG state, the model config and a hash of the training config). A model file is
what inference needs: the EMA weights, the UNet config and the diffusion config.

An export folder (`export_model`) holds the same for use outside the project: model.safetensors (the
weights), config.json (the configs, the class names, the guide model's), and model-guide.safetensors
when the model has a guide; `load_model` reads it with `safetensors.torch.load_file`, so no pickle at all.

A loaded file's configs are checked (`ddpm.model_config`) before they allocate anything: each field in range,
the network they describe holding exactly the file's weight shapes (an export's read from the safetensors
header, before the weights), and the weights finite.
"""

import contextlib
import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .diffusion import Diffusion, DiffusionConfig
from .files import atomic_write
from .model_config import check_finite, check_shapes, model_configs
from .networks import make_unet
from .posthoc_ema import reconstruct
from .unet import UNet, UNetConfig

MODEL_KEYS = ("format", "unet", "diffusion", "weights", "meta")
ARCHIVE_MAGIC = b"PK\x03\x04"  # the zip header that starts every file torch.save (so atomic_save) writes
EXPORT_FORMAT = "ddpm-export-v1"
EXPORT_WEIGHTS, EXPORT_CONFIG = "model.safetensors", "config.json"


class CheckpointError(ValueError):
    """A checkpoint or model file that is missing, corrupt, truncated or of the wrong kind."""


def config_hash(config: dict) -> str:
    """A short, stable hash of a JSON-serialisable config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_save(obj: dict, path: str | Path) -> None:
    """torch.save through `atomic_write` (a full disk is one OSError naming `path`)."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def safe_load(path: str | Path, required: tuple[str, ...] = (), map_location="cpu", mmap: bool = False) -> dict:
    """Load a dict saved by `atomic_save`, refusing pickled code and naming the file on any failure; `mmap`:
    its tensors are memory-mapped, read from disk only where they are used."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many kinds: UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f"{path}: {_why_unloadable(path, e)}") from None
    missing = [k for k in required if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise CheckpointError(f"{path}: not the kind of file expected here (missing {', '.join(missing)})")
    return obj


def _why_unloadable(path: Path, error: Exception) -> str:
    """Why torch.load(weights_only=True) failed on `path`, in words that do not depend on the torch version."""
    try:  # a torch.save archive: its pickle's globals, read by disassembly without unpickling anything
        refused = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a bare pickle or a damaged archive: the global torch's refusal names, if any
        refused = re.findall(r"GLOBAL (\S+)", str(error))
        refused = [name if "." in name else f"builtins.{name}" for name in refused]  # torch drops "builtins."
    if refused:
        return (f"refused: it holds Python objects other than tensors ({', '.join(sorted(set(refused)))}), "
                "which could run code when loaded; only plain tensor files are loaded")
    with open(path, "rb") as f:
        head = f.read(len(ARCHIVE_MAGIC))
    if not head:
        why = "it is empty"
    elif head != ARCHIVE_MAGIC:
        why = "it is not a PyTorch file"
    else:
        why = "it is truncated or corrupt"
    return f"not a checkpoint written by this project ({why})"


def save_model(path: str | Path, model: torch.nn.Module, unet: UNetConfig, diffusion: DiffusionConfig,
               meta: dict | None = None) -> None:
    """Write an inference model file (give it the EMA module's weights)."""
    atomic_save({"format": "ddpm-model-v1", "unet": asdict(unet), "diffusion": asdict(diffusion),
                 "weights": model.state_dict(), "meta": meta or {}}, path)


def guide_path(model_file: str | Path) -> Path:
    """Where the guide model of a model file lives (the early EMA weights that autoguidance guides it by):
    <name>-guide.pt beside <name>.pt, so models/uncond/model-guide.pt beside models/uncond/model.pt; in an
    export folder, model-guide.safetensors."""
    model_file = Path(model_file)
    if model_file.is_dir():
        model_file = model_file / EXPORT_WEIGHTS
    return model_file.with_name(f"{model_file.stem}-guide{model_file.suffix or '.pt'}")


def load_model(path: str | Path, device: torch.device | str = "cpu",
               sigma_rel: float | None = None) -> tuple[UNet, Diffusion, dict]:
    """Read a model file written by `save_model`, or an export folder (or one of its .safetensors files)
    written by `export_model`: (model in eval mode, diffusion, meta). `sigma_rel`: instead of the file's
    weights, the post-hoc EMA of that relative length, reconstructed from the snapshots in <name>-posthoc.pt
    beside the model file (`posthoc_weights`); meta["sigma_rel"] says so."""
    if Path(path).is_dir() or Path(path).suffix == ".safetensors":
        if sigma_rel is not None:
            raise CheckpointError(f"{path}: an export holds one set of weights; post-hoc EMA (sigma_rel) needs a "
                                  f"model file with its {posthoc_path(Path(path)).name}")
        return load_exported(Path(path) / EXPORT_WEIGHTS if Path(path).is_dir() else Path(path), device)
    obj = safe_load(path, MODEL_KEYS)
    if obj["format"] != "ddpm-model-v1":
        raise CheckpointError(f"{path}: unknown model format {obj['format']!r}")
    unet, diffusion = _checked(path, model_configs, obj, obj["meta"].get("class_names")
                               if isinstance(obj["meta"], dict) else None)
    weights = obj["weights"]
    if not isinstance(weights, dict) or not all(isinstance(w, torch.Tensor) for w in weights.values()):
        raise CheckpointError(f"{path}: its weights are not a mapping of names to tensors")
    _check_shapes(path, unet, {k: tuple(w.shape) for k, w in weights.items()})
    meta = obj["meta"]
    if sigma_rel is not None:
        weights, meta = posthoc_weights(path, sigma_rel), {**meta, "sigma_rel": sigma_rel}
        _check_shapes(posthoc_path(path), unet, {k: tuple(w.shape) for k, w in weights.items()}, Path(path).name)
    model = _build(path, unet, weights)
    return model.to(device).eval(), Diffusion.from_config(diffusion).to(device), meta


def posthoc_path(model_file: str | Path) -> Path:
    """Where the post-hoc EMA snapshots of a model file live ({"snapshots": records of
    `ddpm.posthoc_ema.PowerEMA.snapshot`, "meta"}): <name>-posthoc.pt beside <name>.pt, as `guide_path`."""
    model_file = Path(model_file)
    return model_file.with_name(f"{model_file.stem}-posthoc{model_file.suffix or '.pt'}")


def posthoc_weights(model_file: str | Path, sigma_rel: float) -> dict[str, torch.Tensor]:
    """The weights of the post-hoc EMA of relative length `sigma_rel` (Karras et al. 2024), reconstructed from
    the snapshots beside `model_file` (`posthoc_path`) (`ddpm.posthoc_ema.reconstruct`, at the last snapshot's step)."""
    path = posthoc_path(model_file)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; post-hoc EMA needs the snapshots that training keeps when "
                              "asked to (TrainConfig.posthoc_sigma_rels and posthoc_snapshots)")
    snapshots = safe_load(path, ("snapshots",), mmap=True)["snapshots"]
    try:
        return reconstruct(snapshots, sigma_rel)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot reconstruct the post-hoc EMA of sigma_rel {sigma_rel} ({e})") from None


def _checked(path: Path, check, *args):
    """check(*args), its ValueError as a CheckpointError naming `path`."""
    try:
        return check(*args)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _check_shapes(path: Path, unet: UNetConfig, shapes: dict, config: str = "") -> None:
    """The weights' `shapes` are those of the network `unet` describes: then building it allocates no more than
    the file holds. `config`: the file the config comes from, when not `path` itself."""
    try:
        check_shapes(unet, shapes)
    except ValueError as e:
        raise CheckpointError(f"{path}: does not match its config ({config + ': ' if config else ''}{e})") from None


def _build(path: Path, unet: UNetConfig, weights: dict) -> UNet:
    """The network of config `unet` (checked against the weights' shapes) holding `weights`, which must be finite."""
    _checked(path, check_finite, weights)
    model = make_unet(unet)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not match its config ({str(e).splitlines()[0]})") from None
    return model


def export_model(model_file: str | Path, folder: str | Path) -> dict:
    """Write model file `model_file` (`save_model`) as an export folder: folder/model.safetensors (its
    weights), folder/model-guide.safetensors (its guide model's, if it has one: `guide_path`) and
    folder/config.json (UNet and diffusion configs, class names, meta, guide); returns that config."""
    obj, folder = safe_load(model_file, MODEL_KEYS), Path(folder)
    meta = dict(obj["meta"])
    config = {"format": EXPORT_FORMAT, "unet": obj["unet"], "diffusion": obj["diffusion"],
              "class_names": meta.pop("class_names", None),
              "meta": meta, "guide": None}
    weights = {EXPORT_WEIGHTS: obj["weights"]}
    if guide_path(model_file).is_file():
        guide = safe_load(guide_path(model_file), MODEL_KEYS)
        if (guide["unet"], guide["diffusion"]) != (obj["unet"], obj["diffusion"]):
            raise CheckpointError(f"{guide_path(model_file)}: its config is not that of {model_file}")
        config["guide"] = {"weights": guide_path(folder / EXPORT_WEIGHTS).name, "steps": guide["meta"].get("steps")}
        weights[config["guide"]["weights"]] = guide["weights"]
    folder.mkdir(parents=True, exist_ok=True)
    for name, state in weights.items():
        with atomic_write(folder / name) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"format": EXPORT_FORMAT})
    with atomic_write(folder / EXPORT_CONFIG) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return config


def load_exported(weights_file: str | Path, device: torch.device | str = "cpu") -> tuple[UNet, Diffusion, dict]:
    """Read model.safetensors (or model-guide.safetensors) of an export folder with the folder's config.json:
    (model in eval mode, diffusion, meta with class_names, and for the guide its own steps)."""
    weights_file = Path(weights_file)
    config_file = weights_file.with_name(EXPORT_CONFIG)
    for path in (weights_file, config_file):
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
    try:
        config = json.loads(config_file.read_text())
    except ValueError:
        config = None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{config_file}: not the config.json of a folder written by `ddpm export`")
    unet, diffusion = _checked(config_file, model_configs, config, config.get("class_names"))
    guide = _checked(config_file, _guide_entry, config.get("guide"))
    with _safetensors(weights_file):
        with safe_open(weights_file, "pt") as f:  # the header only: names and shapes, no tensor read
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    _check_shapes(weights_file, unet, shapes, config_file.name)
    with _safetensors(weights_file):
        weights = load_file(weights_file)
    model = _build(weights_file, unet, weights)
    meta = {**config.get("meta", {}), "class_names": config.get("class_names")}
    if guide and weights_file.name == guide["weights"]:
        meta["steps"] = guide["steps"]
    return model.to(device).eval(), Diffusion.from_config(diffusion).to(device), meta


@contextlib.contextmanager
def _safetensors(path: Path):
    """Any error reading safetensors file `path` as a CheckpointError naming it."""
    try:
        yield
    except Exception as e:  # safetensors raises its own error type, and OSError
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a safetensors file of tensors, or truncated ({why})") from None


def _guide_entry(guide) -> dict | None:
    """config.json's `guide`: null, or the guide model's weights file and the step it was kept at."""
    if guide is not None and not (isinstance(guide, dict) and isinstance(guide.get("weights"), str)
                                  and (guide.get("steps") is None or type(guide["steps"]) is int)):
        raise ValueError("guide must be null or a mapping of 'weights' (a file name) and 'steps' (an integer or "
                         f"null), got {guide!r:.80}")
    return guide


def load_guide(model_file: str | Path, device: torch.device | str = "cpu") -> UNet:
    """The guide model kept beside `model_file` (`guide_path`), for autoguidance, in eval mode."""
    path = guide_path(model_file)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; autoguidance needs the guide model that training keeps "
                              "when asked to (Trainer's guide_at > 0)")
    return load_model(path, device)[0]


def save_classifier(path: str | Path, model: torch.nn.Module) -> None:
    """Write a domain classifier as {"config": asdict(model.config), "weights": state_dict}, atomically."""
    atomic_save({"config": asdict(model.config), "weights": model.state_dict()}, path)


def load_classifier(path: str | Path, device: torch.device | str = "cpu"):
    """Read a domain classifier saved as {"config": asdict(ClassifierConfig), "weights": state_dict}."""
    from .classifier import Classifier, ClassifierConfig

    obj = safe_load(path, ("config", "weights"))
    try:
        model = Classifier(ClassifierConfig(**obj["config"]))
        model.load_state_dict(obj["weights"])
    except (TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: classifier file does not match its config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()
