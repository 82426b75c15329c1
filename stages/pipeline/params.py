"""params.yaml -> frozen dataclasses, validated in one place before any stage does work.

An unknown key (with a "did you mean" hint), a wrong type or an out-of-range value stops the
stage with one line naming the key and what is allowed.
"""

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from ddpm import DiffusionConfig, TrainConfig, UNetConfig
from ddpm.checkpoint import EXPORT_CONFIG
from ddpm.diffusion import PREDICTIONS
from ddpm.precision import PRECISIONS
from ddpm.request import RULES, valid
from ddpm.samplers import METHODS
from ddpm.sources import URI_FORMS, ModelSourceError, check_model_uri, is_model_uri
from ddpm.training import LR_SCHEDULES

from .bounds import device_checks, size_checks


class ParamsError(ValueError):
    """A params.yaml key that is unknown, of the wrong type or out of range."""


DATASETS = ("mnist", "fashion_mnist", "cifar10", "glyphs", "imagefolder")
SCHEDULES = ("linear", "cosine")
DEVICES = ("auto", "cpu", "cuda", "mps")
EXTRACTORS = ("classifier", "inception")  # ddpm.metrics.EXTRACTORS
PROTOCOLS = ("fast", "standard")  # stages/reference.py: what the samples are scored against


# No defaults here: params.yaml is the one place where the pipeline's values are set, and every key
# must be there (a missing key is an error like an unknown one).

@dataclass(frozen=True)
class DataParams:
    name: str
    root: str | None                     # a folder holding the dataset's files (else data/raw/<name>, Debian, download)
    classes: tuple[str | int, ...] | None  # keep these classes (names or indices), relabelled 0..K-1
    image_size: int | None               # resize (center square) to this; null: the dataset's own (imagefolder: 32)
    channels: int | None                 # 1 (grayscale) or 3 (RGB); null: the dataset's own (imagefolder: 3)
    limit: int | None                    # class-stratified subset of the train split
    test_limit: int | None               # class-stratified subset of the test split


@dataclass(frozen=True)
class ModelParams:
    """UNetConfig without the fields that follow from the data (channels, size, classes); channel_mults and
    attention_resolutions may be null: they then follow the image size (UNetConfig.for_images)."""
    base_channels: int
    channel_mults: tuple[int, ...] | None
    num_res_blocks: int
    attention_resolutions: tuple[int, ...] | None
    num_heads: int
    dropout: float
    patch_size: int
    magnitude_preserving: bool

    def unet(self, in_channels: int, image_size: int, num_classes: int | None) -> UNetConfig:
        """The full UNetConfig for data of this shape."""
        try:
            return UNetConfig.for_images(in_channels, image_size, num_classes, **dataclasses.asdict(self))
        except ValueError as e:
            raise ParamsError(f"params.yaml: model.{e}") from None


@dataclass(frozen=True)
class ClassifierParams:
    epochs: int
    lr: float
    batch_size: int
    width: int


@dataclass(frozen=True)
class TrainParams:
    """The training keys both models share: TrainConfig's (but each model's own, in train_uncond and
    train_cond) and the stage's own."""
    epochs: int
    batch_size: int                      # global batch, split across train.nproc processes
    micro_batches: int                   # backward passes per process and step (gradient accumulation)
    lr: float
    warmup_steps: int
    lr_schedule: str
    weight_decay: float
    grad_clip: float
    ema_decay: float
    posthoc_sigma_rels: tuple[float, ...]  # power-function EMA widths kept for post-hoc EMA (EDM2); (): none
    posthoc_snapshots: int               # snapshots of each, evenly spaced, saved as models/<variant>/model-posthoc.pt
    min_snr_gamma: float
    logsnr_normal: tuple[float, ...] | None
    precision: str                       # fp32 | tf32 | bf16 | fp16 | auto (ddpm.precision.resolve_precision)
    compile: bool                        # torch.compile the training step
    channels_last: bool                  # channels-last memory format (CUDA convolutions)
    checkpoint_every: int                # steps between resumable checkpoints (and at every epoch end)
    nproc: int                           # data-parallel processes on this machine (torchrun)
    nnodes: int                          # machines the pipeline's own torchrun spans (each runs nproc processes)
    rdzv_endpoint: str | None            # host:port where the nodes meet (torchrun's c10d rendezvous); nnodes > 1
    grids: int                           # sample grids over training, at evenly spread epoch ends and the last
    grid_size: int                       # images in the per-epoch sample grid
    grid_ddim_steps: int                 # DDIM steps for the per-epoch grid


@dataclass(frozen=True)
class UncondTrainParams:
    steps: int | None                    # optimizer steps to train; null: train.epochs
    guide_at: float                      # keep the EMA weights at this fraction of training as the guide; 0: none
    init_from: str | None                # fine-tune from this model (file, export folder, MLflow URI); null: scratch


@dataclass(frozen=True)
class CondTrainParams:
    steps: int | None                    # optimizer steps to train; null: train.epochs
    p_uncond: float                      # label drop rate, for classifier-free guidance
    init_from: str | None                # fine-tune from this model (file, export folder, MLflow URI); null: scratch


@dataclass(frozen=True)
class SampleParams:
    methods: tuple[str, ...]             # the samplers the pipeline runs; the others' stages write no samples
    num_samples: int
    batch_size: int | None               # images per sampling batch; null: sized for the device (stages/sample.py)
    ddpm_steps: tuple[int, ...]          # DDPM: diffusion.timesteps (all, Ho et al. 2020) or fewer (a strided chain)
    ddim_steps: tuple[int, ...]
    eta: tuple[float, ...]
    dpmsolver_steps: tuple[int, ...]     # DPM-Solver++(2M) steps (ddpm.dpm_solver_sample)
    spacing: str                         # DDIM and DPM-Solver timesteps: uniform | trailing | quadratic | logsnr
    guidance: tuple[float, ...]          # the conditional model's classifier-free guidance weights w
    autoguidance: tuple[float, ...]      # the unconditional model's weights w, guided by its guide model
    guidance_interval: tuple[float, ...] | None      # [low, high]: guidance only at sigma in (low, high]; null: all
    autoguidance_interval: tuple[float, ...] | None  # the same for autoguidance (ddpm.guidance_interval)
    clip_x0: bool                        # clip predicted x0 to [-1, 1] at every step
    grid_size: int
    precision: str                       # the network's precision while sampling (ddpm.Autocast); the state is fp32
    sigma_rel: tuple[float | None, ...]  # the weights: post-hoc EMA lengths (ddpm.posthoc_ema); null: the fixed EMA


@dataclass(frozen=True)
class EvaluateParams:
    protocol: str                        # fast | standard (PROTOCOLS; stages/reference.py)
    batch_size: int
    extractors: tuple[str, ...]          # feature extractors: classifier (always), inception
    inception_required: bool             # stop before any work when Inception-v3 cannot be had
    inception_weights: str | None        # Inception-v3 weights file (else torch-fidelity's cache, downloaded)


@dataclass(frozen=True)
class VisualizeParams:
    per_class: int                       # images per class in the conditional model's class grid
    num_images: int                      # rows of the reverse-process, interpolation and comparison pictures
    frames: int                          # columns of the reverse-process strip and of the interpolation
    steps: int                           # DDIM steps for the class grid, reverse strip, interpolation (at most T)
    guidance: float                      # classifier-free guidance weight w for the conditional model
    autoguidance: float                  # autoguidance weight w for the unconditional model
    compare_steps: tuple[int, ...]       # DDPM vs DDIM step counts (those above T are skipped)
    sigma_rel: float | None              # the weights: a post-hoc EMA length, or null (the fixed-decay EMA)


@dataclass(frozen=True)
class Params:
    profile: str                         # the profile whose values the profile stage wrote (profiles.yaml)
    seed: int
    device: str
    data: DataParams
    diffusion: DiffusionConfig
    model: ModelParams
    classifier: ClassifierParams
    train: TrainParams
    train_uncond: UncondTrainParams
    train_cond: CondTrainParams
    sample: SampleParams
    evaluate: EvaluateParams
    visualize: VisualizeParams


VARIANTS = ("uncond", "cond")
RENAMED = {"train.bf16": "train.precision: fp32 | tf32 | bf16 | fp16 | auto (bf16: true is precision: bf16)",
           "train.guide_at": "train_uncond.guide_at", "train.p_uncond": "train_cond.p_uncond",
           "train.init_from": "train_uncond.init_from and train_cond.init_from (each model starts from its own)"}


def train_config(p: Params, variant: str) -> TrainConfig:
    """The library's TrainConfig for one model: the shared train keys and the model's own section; the
    other model's own key off (the unconditional model drops no labels, the conditional one keeps no guide)."""
    shared = {f.name: getattr(p.train, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(p.train, f.name)}
    own = {"uncond": {"steps": p.train_uncond.steps, "guide_at": p.train_uncond.guide_at, "p_uncond": 0.0},
           "cond": {"steps": p.train_cond.steps, "p_uncond": p.train_cond.p_uncond, "guide_at": 0.0}}[variant]
    return TrainConfig(**shared, **own)


def _coerce(value, kind, key: str):
    """Check `value` against the annotation `kind`; lists become tuples, a scalar a 1-tuple."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):  # the first alternative that fits
            try:
                return _coerce(value, arg, key)
            except ParamsError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        names = " or ".join(getattr(a, "__name__", str(a)) for a in args if a is not type(None))
        raise ParamsError(f"params.yaml: {key} must be {names}, got {value!r}")
    if origin is tuple:
        items = value if isinstance(value, list) else [value]
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items))
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ParamsError(f"params.yaml: {key} must be a mapping of keys, got {value!r}")
        return parse(kind, value, key)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else isinstance(value, kind))
    if not ok:
        raise ParamsError(f"params.yaml: {key} must be {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ParamsError(f"params.yaml: {key} must be a finite number, got {value!r}")
    return float(value) if kind is float else value


def parse(cls, values: dict, prefix: str = ""):
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in (values or {}).items():
        full = f"{prefix}.{key}" if prefix else key
        if full in RENAMED:
            raise ParamsError(f"params.yaml: {full} is now {RENAMED[full]}")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ParamsError(f"params.yaml: unknown key '{full}'{hint}; valid keys: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    missing = [name for name in names if name not in kwargs]
    if missing:
        where = f"{prefix}." if prefix else ""
        raise ParamsError(f"params.yaml: missing key '{where}{missing[0]}' (every key must be set; see the "
                          "repository's params.yaml)")
    return cls(**kwargs)


def _checks(p: Params):
    """(key, ok, what is allowed[, what is wrong]) for every range and choice constraint, in order; those that
    depend on this machine (its devices and memory, stages/pipeline/bounds.py) come last."""
    s, t, v, T = p.sample, p.train, p.visualize, p.diffusion.timesteps
    guide_at = p.train_uncond.guide_at
    b0, b1 = p.diffusion.beta_start, p.diffusion.beta_end
    mults = p.model.channel_mults
    profiles = list(yaml.safe_load(Path("profiles.yaml").read_text())) if Path("profiles.yaml").is_file() else []
    yield from [
        ("profile", not profiles or p.profile in profiles, "one of " + ", ".join(profiles)),
        ("seed", valid("seed", p.seed), RULES["seed"][1]),
        ("device", p.device in DEVICES or p.device.startswith("cuda:"), "one of " + ", ".join(DEVICES)),
        ("data.name", p.data.name in DATASETS, "one of " + ", ".join(DATASETS)),
        ("data.root", p.data.name != "imagefolder" or p.data.root is not None,
         "a folder of images (required when data.name is imagefolder)"),
        ("data.classes", p.data.classes is None or (len(p.data.classes) >= 1 and len(set(p.data.classes)) == len(
            p.data.classes)), "a non-empty list of distinct class names or indices, or null"),
        ("data.image_size", p.data.image_size is None or 8 <= p.data.image_size <= 256, "in [8, 256] or null"),
        ("data.channels", p.data.channels in (None, 1, 3), "1, 3 or null"),
        ("data.limit", p.data.limit is None or p.data.limit >= 1, ">= 1 or null"),
        ("data.test_limit", p.data.test_limit is None or p.data.test_limit >= 1, ">= 1 or null"),
        ("diffusion.schedule", p.diffusion.schedule in SCHEDULES, "one of " + ", ".join(SCHEDULES)),
        ("diffusion.timesteps", T >= 1, ">= 1"),
        ("diffusion.prediction", p.diffusion.prediction in PREDICTIONS, "one of " + ", ".join(PREDICTIONS)),
        ("diffusion.beta_start", b0 is None or 0 < b0 < 1, "in (0, 1) or null"),
        ("diffusion.beta_end", b1 is None or (b0 or 0) <= b1 < 1, "in [beta_start, 1) or null"),
        ("model.base_channels", p.model.base_channels >= 1, ">= 1"),
        ("model.channel_mults", mults is None or (len(mults) >= 1 and min(mults) >= 1),
         "a non-empty list of integers >= 1, or null"),
        ("model.num_res_blocks", p.model.num_res_blocks >= 1, ">= 1"),
        ("model.num_heads", p.model.num_heads >= 1 and all(
            p.model.base_channels * m % p.model.num_heads == 0 for m in mults or (1, 2)),
         "a divisor of every level's channel count"),
        ("model.dropout", 0 <= p.model.dropout < 1, "in [0, 1)"),
        ("model.patch_size", p.model.patch_size >= 1, ">= 1"),
        ("classifier.epochs", p.classifier.epochs >= 1, ">= 1"),
        ("classifier.lr", p.classifier.lr > 0, "> 0"),
        ("classifier.batch_size", p.classifier.batch_size >= 1, ">= 1"),
        ("train.epochs", t.epochs >= 1, ">= 1"),
        *((f"train_{model}.steps", steps is None or steps >= 1, ">= 1, or null (train.epochs)")
          for model, steps in (("uncond", p.train_uncond.steps), ("cond", p.train_cond.steps))),
        ("train.batch_size", t.batch_size >= 1, ">= 1"),
        ("train.micro_batches", t.micro_batches >= 1 and t.batch_size % (t.nproc * t.nnodes * t.micro_batches) == 0,
         ">= 1, with train.nproc x train.nnodes x train.micro_batches a divisor of train.batch_size"),
        ("train.lr", t.lr > 0, "> 0"),
        ("train.warmup_steps", t.warmup_steps >= 0, ">= 0"),
        ("train.lr_schedule", t.lr_schedule in LR_SCHEDULES, "one of " + ", ".join(LR_SCHEDULES)),
        ("train.precision", t.precision in PRECISIONS, "one of " + ", ".join(PRECISIONS)),
        ("train.weight_decay", t.weight_decay >= 0, ">= 0"),
        ("train.grad_clip", t.grad_clip >= 0, ">= 0 (0 disables clipping)"),
        ("train.ema_decay", 0 <= t.ema_decay < 1, "in [0, 1)"),
        ("train.posthoc_sigma_rels", all(0 < w < 12 ** -0.5 for w in t.posthoc_sigma_rels),
         "widths in (0, 0.2887), e.g. [0.05, 0.10], or [] (none)"),
        ("train.posthoc_snapshots", t.posthoc_snapshots >= (1 if t.posthoc_sigma_rels else 0),
         ">= 1 when train.posthoc_sigma_rels lists widths, else >= 0"),
        ("train_cond.p_uncond", 0 <= p.train_cond.p_uncond <= 1, "in [0, 1]"),
        ("train.min_snr_gamma", t.min_snr_gamma >= 0, ">= 0 (0: the plain loss)"),
        ("train.logsnr_normal", t.logsnr_normal is None or (len(t.logsnr_normal) == 2 and t.logsnr_normal[1] > 0),
         "[mean, std] with std > 0, or null (uniform timesteps)"),
        ("train_uncond.guide_at", 0 <= guide_at < 1, "in [0, 1) (0: no guide model)"),
        *((f"train_{model}.init_from", *_init_from_check(source))
          for model, source in (("uncond", p.train_uncond.init_from), ("cond", p.train_cond.init_from))),
        ("train.checkpoint_every", t.checkpoint_every >= 1, ">= 1"),
        ("train.nproc", t.nproc >= 1 and t.batch_size % t.nproc == 0, ">= 1 and a divisor of train.batch_size"),
        ("train.nnodes", t.nnodes >= 1 and t.batch_size % (t.nproc * t.nnodes) == 0,
         ">= 1, with train.nproc x train.nnodes a divisor of train.batch_size"),
        ("train.rdzv_endpoint", t.nnodes == 1 or _endpoint(t.rdzv_endpoint),
         "host:port, which train.nnodes > 1 needs (where the nodes meet)"),
        ("train.nproc", t.nproc == 1 or not p.device.startswith("cuda:"),
         f"1 when device is {p.device} (one GPU); with device cuda or auto the processes use cuda:0 to cuda:<nproc-1>"),
        ("train.grids", t.grids >= 1, ">= 1"),
        ("train.grid_size", t.grid_size >= 1, ">= 1"),
        ("train.grid_ddim_steps", 1 <= t.grid_ddim_steps <= T, f"in [1, diffusion.timesteps = {T}]"),
        ("sample.methods", len(s.methods) >= 1 and set(s.methods) <= set(METHODS)
         and len(set(s.methods)) == len(s.methods), "a non-empty list of distinct names from " + ", ".join(METHODS)),
        ("sample.num_samples", s.num_samples >= 1, ">= 1"),
        ("sample.batch_size", s.batch_size is None or s.batch_size >= 1, ">= 1, or null (sized for the device)"),
        ("sample.ddpm_steps", len(s.ddpm_steps) >= 1 and all(1 <= k <= T for k in s.ddpm_steps),
         f"a list of steps in [1, diffusion.timesteps = {T}]"),
        ("sample.ddim_steps", len(s.ddim_steps) >= 1 and all(1 <= k <= T for k in s.ddim_steps),
         f"a list of steps in [1, diffusion.timesteps = {T}]"),
        *((f"sample.{key}", len(values) >= 1 and all(valid(field, v) for v in values),
           "a non-empty list, each " + RULES[field][1])
          for key, field, values in (("eta", "eta", s.eta), ("guidance", "cfg", s.guidance),
                                     ("autoguidance", "autoguidance", s.autoguidance))),
        ("sample.dpmsolver_steps", len(s.dpmsolver_steps) >= 1 and all(1 <= k <= T for k in s.dpmsolver_steps),
         f"a list of steps in [1, diffusion.timesteps = {T}]"),
        ("sample.spacing", valid("spacing", s.spacing), RULES["spacing"][1]),
        ("sample.autoguidance", guide_at > 0 or set(s.autoguidance) == {0},
         "[0] while train_uncond.guide_at is 0 (the unconditional model has no guide model to be guided by)"),
        *((f"sample.{key}", valid("interval", interval), RULES["interval"][1] + ", or null (guided at every step)")
          for key, interval in (("guidance_interval", s.guidance_interval),
                                ("autoguidance_interval", s.autoguidance_interval))),
        ("sample.grid_size", s.grid_size >= 1, ">= 1"),
        ("sample.precision", s.precision in PRECISIONS, "one of " + ", ".join(PRECISIONS)),
        ("sample.sigma_rel", len(s.sigma_rel) >= 1 and len(set(s.sigma_rel)) == len(s.sigma_rel)
         and all(valid("sigma_rel", w) for w in s.sigma_rel), "a non-empty list of distinct values, each "
         + RULES["sigma_rel"][1]),
        *((key, bool(t.posthoc_sigma_rels) or all(w is None for w in widths),
           "null while train.posthoc_sigma_rels is [] (training keeps no post-hoc EMA snapshots to reconstruct from)")
          for key, widths in (("sample.sigma_rel", s.sigma_rel), ("visualize.sigma_rel", (v.sigma_rel,)))),
        ("evaluate.protocol", p.evaluate.protocol in PROTOCOLS, "one of " + ", ".join(PROTOCOLS)),
        ("evaluate.batch_size", p.evaluate.batch_size >= 1, ">= 1"),
        ("evaluate.extractors", "classifier" in p.evaluate.extractors and set(p.evaluate.extractors) <= set(EXTRACTORS)
         and len(set(p.evaluate.extractors)) == len(p.evaluate.extractors),
         "a list of distinct names from " + ", ".join(EXTRACTORS) + ", classifier included"),
        ("evaluate.inception_required", not p.evaluate.inception_required or "inception" in p.evaluate.extractors,
         "false while evaluate.extractors leaves out inception"),
        ("visualize.per_class", v.per_class >= 1, ">= 1"),
        ("visualize.num_images", v.num_images >= 1, ">= 1"),
        ("visualize.frames", v.frames >= 2, ">= 2"),
        ("visualize.steps", v.steps >= 1, ">= 1 (capped at diffusion.timesteps)"),
        ("visualize.guidance", valid("cfg", v.guidance), RULES["cfg"][1]),
        ("visualize.autoguidance", valid("autoguidance", v.autoguidance), RULES["autoguidance"][1]),
        ("visualize.autoguidance", guide_at > 0 or v.autoguidance == 0,
         "0 while train_uncond.guide_at is 0 (the unconditional model has no guide model to be guided by)"),
        ("visualize.compare_steps", len(v.compare_steps) >= 1 and min(v.compare_steps) >= 1,
         "a non-empty list of steps >= 1 (those above diffusion.timesteps are skipped)"),
        ("visualize.sigma_rel", valid("sigma_rel", v.sigma_rel), RULES["sigma_rel"][1]),
    ]
    yield from device_checks(p)  # only once the values above are in range, which these rely on
    yield from size_checks(p)


def _endpoint(value: str | None) -> bool:
    host, _, port = (value or "").rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _init_from_check(source: str | None) -> tuple[bool, str, str]:
    """(ok, what is allowed, what is wrong) for a train_<variant>.init_from: null, a model file or export folder
    that exists, or a model URI of a valid form (whether it resolves, the init-from stage finds out)."""
    allowed = f"null, a model file (.pt), a `ddpm export` folder, or an MLflow model URI ({URI_FORMS})"
    if source is None:
        return True, allowed, ""
    if is_model_uri(source):
        try:
            check_model_uri(source)
        except ModelSourceError:
            return False, allowed, "is not a model URI of those forms"
        return True, allowed, ""
    path = Path(source)
    if not path.exists():
        return False, allowed, "is not there (no such file or folder)"
    if path.is_dir() and not (path / EXPORT_CONFIG).is_file():
        return False, allowed, f"is a folder without {EXPORT_CONFIG}, not a `ddpm export` folder"
    return True, allowed, ""


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raises ParamsError with one line naming the offending key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such file (run stages from the repository root)") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return validate(raw if isinstance(raw, dict) else {})


def validate(raw: dict) -> Params:
    """params.yaml's content as Params; raises ParamsError with one line naming the offending key."""
    params = parse(Params, raw)
    for key, ok, allowed, *problem in _checks(params):
        if not ok:
            value = dataclasses.asdict(params)
            for part in key.split("."):
                value = value[part]
            raise ParamsError(f"params.yaml: {key} = {value!r} {problem[0] if problem else 'is out of range'}; "
                              f"allowed: {allowed}")
    return params


def sections(p: Params, *names: str) -> dict:
    """The named params as plain values, for logging, and the profile: sections("seed", "train") ->
    {"profile": "laptop", "seed": 0, "train": {...}}."""
    out = {"profile": p.profile}  # every run says which profile its values came from
    for name in names:
        head, _, rest = name.partition(".")
        value = getattr(p, head)
        value = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        if rest:
            out.setdefault(head, {})[rest] = value[rest]
        else:
            out[head] = value
    return out
