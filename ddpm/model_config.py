"""A model's configs as a file gives them (a model file's dicts, an export's config.json), checked before anything
is allocated from them: every field of its type and in range (the schedule and one image's feature map within this
machine's memory), and the network they describe holding exactly the weights' names and shapes. That network is
built on PyTorch's meta device, which gives shapes without storage, so a config that asks for 40 GB of parameters
beside a file of 40 kB is refused, not allocated. The weights must be finite too: NaN weights sample black images.

Every check raises ValueError naming the field; the loaders (`ddpm.checkpoint`) add the file's name.
"""

import math
import os
import reprlib
import typing

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .diffusion import PREDICTIONS, SCHEDULE_BYTES, DiffusionConfig
from .networks import make_unet
from .schedules import SCHEDULES
from .unet import UNetConfig


def machine_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class _SkipInit(TorchFunctionMode):
    """Inside it torch.nn.init's functions leave their tensor as it is. A meta tensor has no values to draw, and
    normal_'s meta kernel would import torch._dynamo on first use: a second or two at every stage's start."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def meta_network(config: UNetConfig) -> nn.Module:
    """The network `config` describes, on the meta device: its parameters have shapes and no storage, so this
    allocates nothing whatever the config asks for (and draws nothing from the random generators)."""
    with torch.device("meta"), _SkipInit():
        return make_unet(config)


def parameter_count(config: UNetConfig) -> int:
    """The number of parameters of the network `config` describes, computed without allocating them."""
    return sum(p.numel() for p in meta_network(config).parameters())


def _short(value) -> str:
    return reprlib.repr(value)


def _field(value, kind, key: str):
    """`value` as a field of annotation `kind` (a list for a tuple; None where `kind` allows it)."""
    args = typing.get_args(kind)
    if type(None) in args:
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list of {item.__name__}, got {_short(value)}")
        return tuple(_field(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        what = "a finite number" if kind is float else kind.__name__
        raise ValueError(f"{key} must be {what}, got {_short(value)}")
    return float(value) if kind is float else value


def _typed(cls, raw, key: str) -> dict:
    """The fields of dataclass `cls` in `raw`, each of its type; a field `raw` lacks keeps its default (files
    written before the field existed)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{key} must be a mapping of {cls.__name__}'s fields, got {_short(raw)}")
    hints = typing.get_type_hints(cls)
    unknown = [k for k in raw if k not in hints]
    if unknown:
        raise ValueError(f"{key}.{unknown[0]} is not a field of {cls.__name__} (its fields: {', '.join(hints)})")
    return {k: _field(v, hints[k], f"{key}.{k}") for k, v in raw.items()}


def _in_range(key: str, config, checks: list) -> None:
    """Raise for the first (field, ok, allowed) of `checks` that is not ok."""
    for field, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{key}.{field} = {_short(getattr(config, field))} is out of range; allowed: {allowed}")


def unet_config(raw, key: str = "unet") -> UNetConfig:
    """`raw` (a dict read from a file) as a UNetConfig whose network can be built and run on one image here."""
    c = UNetConfig(**_typed(UNetConfig, raw, key))
    side = c.image_size // max(1, c.patch_size)
    most = math.isqrt(machine_memory() // (4 * max(1, c.base_channels)))  # one float32 feature map of one image
    _in_range(key, c, [
        ("in_channels", c.in_channels >= 1, ">= 1"),
        ("base_channels", c.base_channels >= 1, ">= 1"),
        ("channel_mults", len(c.channel_mults) >= 1 and min(c.channel_mults) >= 1,
         "a non-empty list of integers >= 1"),
        ("num_res_blocks", c.num_res_blocks >= 1, ">= 1"),
        ("attention_resolutions", all(r >= 1 for r in c.attention_resolutions), "a list of resolutions >= 1"),
        ("num_heads", c.num_heads >= 1 and all(c.base_channels * m % c.num_heads == 0 for m in c.channel_mults),
         "a divisor of every level's channel count"),
        ("dropout", 0 <= c.dropout < 1, "in [0, 1)"),
        ("num_classes", c.num_classes is None or c.num_classes >= 1, ">= 1 or null"),
        ("patch_size", c.patch_size >= 1 and c.image_size % c.patch_size == 0, "a divisor of image_size"),
        ("image_size", 1 <= side <= most, f"in [1, {most * c.patch_size}] (one image's first feature map, "
                                          "base_channels x image_size^2 floats, in this machine's memory)"),
    ])
    return c


def diffusion_config(raw, key: str = "diffusion") -> DiffusionConfig:
    """`raw` (a dict read from a file) as a DiffusionConfig whose schedule can be built here."""
    d = DiffusionConfig(**_typed(DiffusionConfig, raw, key))
    most = machine_memory() // SCHEDULE_BYTES
    _in_range(key, d, [
        ("schedule", d.schedule in SCHEDULES, "one of " + ", ".join(SCHEDULES)),
        ("timesteps", 1 <= d.timesteps <= most, f"in [1, {most}] (the schedule's {SCHEDULE_BYTES} bytes per "
                                                "timestep in this machine's memory)"),
        ("beta_start", d.beta_start is None or 0 < d.beta_start < 1, "in (0, 1) or null"),
        ("beta_end", d.beta_end is None or (d.beta_start or 0) <= d.beta_end < 1, "in [beta_start, 1) or null"),
        ("prediction", d.prediction in PREDICTIONS, "one of " + ", ".join(PREDICTIONS)),
    ])
    return d


def model_configs(obj: dict, class_names) -> tuple[UNetConfig, DiffusionConfig]:
    """The configs of a model file's or config.json's content `obj`, and its `class_names` checked against them:
    a list of names or indices, one per class of a conditional model, or None."""
    for name in ("unet", "diffusion"):
        if name not in obj:
            raise ValueError(f"no '{name}' field (the {'UNet' if name == 'unet' else 'diffusion'}'s config)")
    unet, diffusion = unet_config(obj["unet"]), diffusion_config(obj["diffusion"])
    if not isinstance(obj.get("meta", {}), dict):
        raise ValueError(f"meta must be a mapping, got {_short(obj['meta'])}")
    k = unet.num_classes
    if class_names is not None and (not isinstance(class_names, list) or (k and len(class_names) != k)
                                    or not all(isinstance(n, (str, int)) for n in class_names)):
        count = f"{k} " if k else ""
        raise ValueError(f"class_names must be a list of {count}names or null, got {_short(class_names)}")
    return unet, diffusion


def _dims(shape) -> str:
    return " x ".join(map(str, shape)) or "a scalar"


def check_shapes(config: UNetConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise unless `shapes` (weight name -> shape) are exactly the names and shapes of the network's weights."""
    expected = {name: tuple(t.shape) for name, t in meta_network(config).state_dict().items()}
    wrong = [k for k in expected if k in shapes and tuple(shapes[k]) != expected[k]]
    if wrong:
        k = wrong[0]
        raise ValueError(f"{k} is {_dims(expected[k])} in the config, {_dims(shapes[k])} in the weights")
    for names, where in (([k for k in expected if k not in shapes], "the weights lack"),
                         ([k for k in shapes if k not in expected], "the config's network has no")):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise ValueError(f"{where} {names[0]}{more}")


def check_finite(weights: dict[str, torch.Tensor]) -> None:
    """Raise if a weight holds NaN or an infinity: such a network samples NaN, which images show as black."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"weight {name} holds NaN or infinite values, so the model cannot sample (was it "
                             "saved from a training run that diverged?)")
