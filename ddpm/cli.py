"""The `ddpm` command: sample a trained model file and draw pictures of it.

    ddpm sample      --model models/cond/model.pt --guidance 2 --out samples.png   # one row per class
    ddpm reverse     --model models/uncond/model.pt --num 4 --frames 10 --out reverse.png
    ddpm interpolate --model models/uncond/model.pt --frames 8 --out interpolation.png
    ddpm compare     --model models/uncond/model.pt --steps 5 10 20 50 --out compare.png
    ddpm schedule    --timesteps 1000 --out schedule.png
    ddpm export      --model models/cond/model.pt --out exported/cond --params params.yaml --metrics metrics/eval.json

--model takes a model file written by the train stage, a folder written by `ddpm export` (safetensors
weights: loading one runs no pickle), or a model that MLflow holds: models:/ddpm-cond@champion,
models:/ddpm-cond/3 or runs:/<run id>/model, looked up in MLFLOW_TRACKING_URI's store (default: mlflow.db
here); each samples alike.

Image i's starting noise depends only on (--seed, i), so the same seed on the same device writes the
same picture. A picture is the raw image grid (white 2-pixel padding, torchvision's make_grid layout)
or, with --labels, a figure with row and column labels. Every argument is checked before any sampling starts; a problem
is one line `error: ...` on stderr and exit status 2; a full disk while writing is one line and exit status 1.
"""

import argparse
import contextlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import pictures
from .checkpoint import CheckpointError, guide_path, load_model
from .diffusion import NULL_LABEL, Diffusion
from .export import ExportError, check_folder, read_inputs, write_export
from .files import FULL, atomic_write
from .model_config import machine_memory
from .noise import ImageGenerator
from .precision import PRECISIONS, Autocast, resolve_device
from .request import MAX_IMAGES, RequestError, check, check_request, max_images
from .samplers import DEFAULT_STEPS, METHODS, SPACINGS, NonFiniteImages, default_steps, generate
from .settings import SamplerSetting
from .sources import ModelSourceError, check_model_uri, is_model_uri, local_model

DEFAULT_COMPARE_STEPS = (5, 10, 20, 50)
# Memory per timestep that `ddpm schedule` takes (the schedules' float64 curves and the plot's copies of them:
# 340 to 420 bytes measured), a lower bound
SCHEDULE_PLOT_BYTES = 300
# the flag of each field a sampler request checks (ddpm.request)
FLAGS = {"method": "--method", "steps": "--steps", "eta": "--eta", "spacing": "--spacing", "cfg": "--guidance",
         "autoguidance": "--autoguidance", "interval": "--guidance-interval", "seed": "--seed", "num": "--num",
         "class": "--class"}


class UsageError(Exception):
    """A bad argument or input file, reported in one line before any sampling."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def at_least(lo, kind=int):
    """An argparse type: a number of `kind` that is >= lo (None: any; a sampler request's values are checked
    by ddpm.request, in `load`)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if lo is not None and not value >= lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}")
        return value
    return parse


def plotted_timesteps(text: str) -> int:
    """An argparse type: a T >= 1 whose schedule plot fits in this machine's memory."""
    value, memory = at_least(1)(text), machine_memory()
    if value * SCHEDULE_PLOT_BYTES > memory:
        raise argparse.ArgumentTypeError(f"{text} needs about {value * SCHEDULE_PLOT_BYTES / 1e9:.0f} GB to plot "
                                         f"({SCHEDULE_PLOT_BYTES} bytes per timestep) and this machine has "
                                         f"{memory / 1e9:.0f} GB; use at most {memory // SCHEDULE_PLOT_BYTES}")
    return value


def file_with_suffix(suffix: str):
    def check(text: str) -> Path:
        if Path(text).suffix.lower() != suffix:
            raise argparse.ArgumentTypeError(f"must be a {suffix} file, got {text!r}")
        return Path(text)
    return check


def model_source(text: str) -> str | Path:
    """An argparse type: a model URI (kept as text, checked for its form) or a path."""
    if not is_model_uri(text):
        return Path(text)
    try:
        check_model_uri(text)
    except ModelSourceError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> Parser:
    ap = Parser(prog="ddpm", description="Sample a trained DDPM model file and draw pictures of it.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, out: str, num: int | None = None, num_help: str = "") -> Parser:
        p = sub.add_parser(name, help=help, description=help)
        if out:
            p.add_argument("--out", type=file_with_suffix(".png"), default=Path(out), help=f"PNG to write ({out})")
        if num is None:
            return p
        p.add_argument("--model", type=model_source, required=True,
                       help="a model file written by the train stage, a folder written by `ddpm export`, or "
                       "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH (MLflow)")
        p.add_argument("--num", type=at_least(None), default=num, help=f"{num_help} ({num}; at most {MAX_IMAGES:,})")
        p.add_argument("--class", dest="klass", metavar="K", help="class index or name (conditional models); "
                       "without it a conditional model cycles through its classes")
        p.add_argument("--guidance", type=at_least(None, float), metavar="W",
                       help="classifier-free guidance weight w >= 0 (conditional models; default 0)")
        p.add_argument("--seed", type=at_least(None), default=0, help="image i's noise depends only on (seed, i)")
        p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
        p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="the network's precision (fp32; auto: bf16 where the CPU or GPU runs it natively, fp16 on "
                       "older GPUs, else fp32); the sampler's state stays fp32")
        p.add_argument("--labels", action="store_true", help="write a figure with row and column labels")
        return p

    def sampler(p: Parser, steps_help: str, methods=("ddpm", "ddim"),
                method_help="ddim (eta 0 unless --eta) or ddpm (ancestral, eta 1)") -> None:
        p.add_argument("--method", choices=methods, default="ddim", help=method_help)
        p.add_argument("--steps", type=at_least(1), help=steps_help)

    p = command("sample", "Sample a grid of images.", "samples.png", num=100, num_help="images; a conditional "
                "model without --class draws ceil(num / classes) per class, one row per class")
    sampler(p, f"sampling steps in [1, T] (DDIM, DPM-Solver: {DEFAULT_STEPS}; DDPM: T, fewer skips steps)",
            METHODS, "ddim (eta 0 unless --eta), ddpm (ancestral, eta 1) or dpmsolver (DPM-Solver++(2M), "
            "deterministic)")
    p.add_argument("--eta", type=at_least(None, float), help="DDIM stochasticity eta >= 0 (default 0)")
    p.add_argument("--spacing", choices=SPACINGS, default="uniform", help="DDIM and DPM-Solver timesteps (uniform)")
    p.add_argument("--clip-x0", action="store_true", help="clip the predicted x0 to [-1, 1] at every step")
    p.add_argument("--autoguidance", type=at_least(None, float), metavar="W",
                   help="autoguidance weight w >= 0 (unconditional models; guided by <name>-guide.pt beside --model, "
                   "which train_uncond.guide_at keeps)")
    p.add_argument("--guidance-interval", type=at_least(None, float), nargs=2, metavar=("LOW", "HIGH"),
                   help="guide only at noise levels sigma in (LOW, HIGH] (Kynkäänniemi et al. 2024; default: "
                   "every step)")
    p.add_argument("--batch-size", type=at_least(1), default=250, help="images per batch (250)")
    p.add_argument("--save-array", type=file_with_suffix(".npz"), metavar="FILE.npz",
                   help="also save images uint8 (N, C, H, W) and labels (N,) (-1: unconditional)")
    p.set_defaults(run=cmd_sample)

    p = command("reverse", "The reverse process: x_t and the predicted x0 at evenly spaced steps.",
                "reverse.png", num=4, num_help="images, two rows each")
    sampler(p, f"sampling steps in [1, T] (DDIM: {DEFAULT_STEPS}; DDPM: T)")
    p.add_argument("--frames", type=at_least(2), default=10, help="columns per image (10)")
    p.set_defaults(run=cmd_reverse)

    p = command("interpolate", "Decode spherical interpolations between two noises with DDIM (eta 0); "
                "row r goes from image 2r's noise to image 2r+1's.", "interpolation.png", num=4, num_help="rows")
    p.add_argument("--frames", type=at_least(2), default=8, help="images per row (8)")
    p.add_argument("--steps", type=at_least(1), help=f"DDIM steps in [1, T] ({DEFAULT_STEPS})")
    p.set_defaults(run=cmd_interpolate)

    p = command("compare", "The same noise decoded by DDPM (eta 1) and DDIM (eta 0) at several step counts.",
                "compare.png", num=4, num_help="images, one row each")
    p.add_argument("--steps", type=at_least(1), nargs="+",
                   help=f"step counts in [1, T] ({' '.join(map(str, DEFAULT_COMPARE_STEPS))}, those <= T)")
    p.set_defaults(run=cmd_compare)

    p = command("schedule", "Plot beta_t, alpha_bar_t and log-SNR of the linear and cosine schedules.",
                "schedule.png")
    p.add_argument("--timesteps", type=plotted_timesteps, default=1000, help="T (1000)")
    p.set_defaults(run=cmd_schedule)

    p = command("export", "Write a model file as a folder to share: model.safetensors, model-guide.safetensors "
                "(if it has a guide), config.json, a model card README.md and samples.png.", "", num=100,
                num_help="images in samples.png; a conditional model draws ceil(num / classes) per class")
    p.add_argument("--out", type=Path, required=True, help="the folder to write (new, or an earlier export)")
    p.add_argument("--steps", type=at_least(1), help=f"DDIM steps of samples.png ({DEFAULT_STEPS}, at most T)")
    p.add_argument("--params", type=Path, help="the pipeline's params.yaml, for the card's training section")
    p.add_argument("--metrics", type=Path, help="the evaluate stage's metrics/eval.json, for the card's FID table")
    p.add_argument("--license", default="unknown", help="the card's license, a Hugging Face Hub id such as mit or "
                   "apache-2.0 (unknown)")
    p.set_defaults(run=cmd_export)
    return ap


@dataclass
class Loaded:
    """A model file and the request the arguments make of it, checked before any sampling."""
    model: nn.Module
    diffusion: Diffusion
    class_names: list[str] | None   # None for an unconditional model
    klass: int | None               # the --class index
    setting: SamplerSetting         # --method, --steps (the first), --eta, --spacing, the guidance and its interval
    guide: nn.Module | None = None  # the model's guide model, loaded under --autoguidance
    meta: dict = field(default_factory=dict)  # the model file's meta (variant, steps, ...)
    precision: str = "fp32"         # --precision

    @property
    def guided(self) -> nn.Module:
        """The model at --precision under its classifier-free guidance or autoguidance, as the pictures sample it."""
        guide = None if self.guide is None else Autocast(self.guide, self.precision)
        return self.setting.model(Autocast(self.model, self.precision), guide, self.diffusion)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.model.config.sample_shape

    def labels(self, n: int) -> torch.Tensor | None:
        """(n,) labels: --class, or the classes in turn; None for an unconditional model."""
        if self.class_names is None:
            return None
        return torch.full((n,), self.klass) if self.klass is not None else torch.arange(n) % len(self.class_names)

    def row_names(self, labels: torch.Tensor | None) -> list[str] | None:
        return None if labels is None else [self.class_names[i] for i in labels.tolist()]

    def describe(self, sampler: str) -> str:
        """A picture's title: `sampler`, then the guidance."""
        return ", ".join(filter(None, [sampler, self.setting.guidance_label]))


def pick_device(name: str) -> torch.device:
    try:
        device = resolve_device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    backend = {"cuda": torch.cuda.is_available,
               "mps": lambda: getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()}
    if device.type in backend and not backend[device.type]():
        raise UsageError(f"--device {name}: {device.type} is not available here; use --device cpu")
    return device


def load(args) -> Loaded:
    """Load --model and check the request against it (ddpm.request: the sampler setting, --num, --class, --steps,
    --seed), so that a bad value is one line naming its flag before any sampling."""
    device = pick_device(args.device)
    model, diffusion, meta = load_model(args.model_path, device)
    k, T = model.config.num_classes, diffusion.timesteps
    if k is None and (args.klass is not None or args.guidance is not None):
        flag = "--class" if args.klass is not None else "--guidance"
        raise UsageError(f"{flag} needs a class-conditional model, but {args.model} is unconditional")
    names = [str(n) for n in meta.get("class_names") or range(k)] if k else None
    guide = None
    if getattr(args, "autoguidance", None) is not None:
        if k is not None:
            raise UsageError(f"--autoguidance needs an unconditional model, but {args.model} is class-conditional "
                             "(use --guidance)")
        guide_file = guide_path(args.model_path)
        if not guide_file.is_file():
            where = guide_file if args.model_path == args.model else f"{guide_file.name} beside {args.model}'s model"
            raise UsageError(f"--autoguidance needs the guide model {where}; train with train_uncond.guide_at > 0")
        guide = load_model(guide_file, device)[0]
    klass = class_index(args.klass, names)
    try:
        check("seed", args.seed)
        settings = request_settings(args, k is not None, T)
        for setting in settings:
            check_request(setting, args.num, model.config.sample_shape, T, k, klass, guide is not None)
    except RequestError as e:
        names_too = f" or a name ({', '.join(names)})" if e.field == "class" else ""
        raise UsageError(e.named(FLAGS[e.field], flag=True) + names_too) from None
    if args.command == "interpolate" and args.num * args.frames > max_images(model.config.sample_shape):
        raise UsageError(f"--frames {args.frames}: {args.num} rows of {args.frames} images are more than a request "
                         f"makes (at most {max_images(model.config.sample_shape)} images)")
    return Loaded(model, diffusion, names, klass, settings[0], guide, meta, getattr(args, "precision", "fp32"))


def class_index(text: str | None, names: list[str] | None) -> int | None:
    """--class as an index: a class name, or an integer (which `check_request` checks)."""
    if text is None or names is None:
        return None
    if text in names:
        return names.index(text)
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--class {text} is not a class name: use one of {', '.join(names)} or an index") from None


def request_settings(args, conditional: bool, T: int) -> list[SamplerSetting]:
    """The sampler settings the arguments ask for, one per --steps value (compare takes several): --method, whose
    steps are 50 (at most T) unless told, DDPM's all T (fewer: DDIM with eta = 1 on a strided chain, Song et al.
    2020 eq. 16); --eta for DDIM only (0 unless told); --spacing; the guidance and its interval."""
    method, eta = getattr(args, "method", "ddim"), getattr(args, "eta", None)
    if method != "ddim" and eta is not None:
        raise UsageError(f"--eta is for --method ddim; {method} takes no eta")
    steps = args.steps if isinstance(args.steps, list) else [args.steps] if args.steps else [default_steps(method, T)]
    interval = getattr(args, "guidance_interval", None)
    return [SamplerSetting(method, s, 1.0 if method == "ddpm" else 0.0 if eta is None else eta,
                           getattr(args, "spacing", "uniform"), cfg=(args.guidance or 0.0) if conditional else None,
                           autoguidance=getattr(args, "autoguidance", None) or 0.0,
                           interval=tuple(interval) if interval else None) for s in steps]


def prepare_output(path: Path | None) -> None:
    """Create the output's folder now, so that a bad path fails before any sampling."""
    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the folder of {path}: {e.strerror}") from None


def write_output(path: Path, write) -> None:
    """write(tmp) to the temporary of `atomic_write`, which puts it in place as `path`; say so."""
    with atomic_write(path) as tmp:
        write(tmp)
    print(f"wrote {path}")


def write_picture(args, picture: pictures.Picture) -> None:
    """The raw grid, or with --labels the figure with its labels and title."""
    if args.labels:
        fig = picture.figure()
        write_output(args.out, lambda tmp: fig.savefig(tmp, dpi=100))
        return
    image = pictures.grid_image(picture.images, picture.nrow)
    write_output(args.out, lambda tmp: image.save(tmp))


def cmd_sample(args, m: Loaded) -> None:
    picture, labels = sample_picture(args, m)
    write_picture(args, picture)
    if args.save_array:
        y = labels if labels is not None else torch.full((len(picture.images),), NULL_LABEL)
        write_output(args.save_array, lambda tmp: np.savez(tmp, images=picture.images.numpy(), labels=y.numpy()))


def sample_picture(args, m: Loaded) -> tuple[pictures.Picture, torch.Tensor | None]:
    """The grid of `ddpm sample` (one row per class for a conditional model without --class), and its labels."""
    setting = m.setting
    if m.class_names is not None and m.klass is None:  # one row per class
        per_class = math.ceil(args.num / len(m.class_names))
        labels, nrow = torch.arange(len(m.class_names)).repeat_interleave(per_class), per_class
    else:
        labels, nrow = m.labels(args.num), math.ceil(math.sqrt(args.num))
    num = len(labels) if labels is not None else args.num
    images = generate(m.guided, m.diffusion, num, m.shape, seed=args.seed, method=setting.method, steps=setting.steps,
                      eta=setting.eta, labels=labels, batch_size=args.batch_size, clip_x0=args.clip_x0,
                      spacing=setting.spacing, progress=True)
    spaced = setting.steps < m.diffusion.timesteps or setting.method != "ddpm"
    title = m.describe(setting.sampler_label() + (f", {setting.spacing} spacing" if spaced else ""))
    rows = m.row_names(None if labels is None else labels[::nrow])
    return pictures.Picture(images, nrow, title, rows), labels


def cmd_reverse(args, m: Loaded) -> None:
    steps = m.setting.steps
    gen = ImageGenerator(args.seed, range(args.num), m.diffusion.betas.device)
    x_T, y = gen.randn((args.num, *m.shape)), m.labels(args.num)
    picture = pictures.reverse_strip(m.guided, m.diffusion, x_T, y=None if y is None else y.to(x_T.device),
                                     num_frames=args.frames, method=args.method, steps=steps, generator=gen,
                                     progress=True)
    if y is not None:
        picture.row_labels = [r for name in m.row_names(y) for r in (f"{name}: x_t", "predicted x0")]
    picture.title = m.describe(f"Reverse process, {args.method.upper()} {steps} steps")
    write_picture(args, picture)


def cmd_interpolate(args, m: Loaded) -> None:
    steps = m.setting.steps
    gen = ImageGenerator(args.seed, range(2 * args.num), m.diffusion.betas.device)
    noise, y = gen.randn((2 * args.num, *m.shape)), m.labels(args.num)
    picture = pictures.interpolation(m.guided, m.diffusion, noise[0::2], noise[1::2], args.frames, y=y,
                                     steps=steps, progress=True)
    picture.title, picture.row_labels = m.describe(f"Slerp between two noises, DDIM {steps} steps"), m.row_names(y)
    write_picture(args, picture)


def cmd_compare(args, m: Loaded) -> None:
    T = m.diffusion.timesteps
    steps = args.steps or [s for s in DEFAULT_COMPARE_STEPS if s <= T] or [T]
    y = m.labels(args.num)
    picture = pictures.sampler_comparison(m.guided, m.diffusion, args.num, m.shape, seed=args.seed, steps=steps,
                                          y=y, progress=True)
    picture.title, picture.row_labels = m.describe("Same noise: DDPM (eta 1) vs DDIM (eta 0)"), m.row_names(y)
    write_picture(args, picture)


def cmd_schedule(args) -> None:
    fig = pictures.schedule_figure(args.timesteps)
    write_output(args.out, lambda tmp: fig.savefig(tmp, dpi=100))


def training_params(params: dict | None, variant: str | None) -> dict | None:
    """The sections of the pipeline's params.yaml (--params) that trained a model of `variant`: the shared ones
    and the model's own train_<variant>."""
    keys = ("profile", "seed", "data", "diffusion", "model", "train", f"train_{variant}")
    return None if params is None else {k: params[k] for k in keys if k in params}


def cmd_export(args, m: Loaded) -> None:
    params, scores = read_inputs(args.params, args.metrics)
    grid = argparse.Namespace(**vars(args), method="ddim", eta=None, spacing="uniform", clip_x0=False,
                              batch_size=250)
    picture, _ = sample_picture(grid, m)
    command = f"ddpm sample --model {args.out} --num {args.num} --seed {args.seed}" + "".join(
        f" --{flag} {value}" for flag, value in (("steps", args.steps), ("guidance", args.guidance),
                                                 ("class", args.klass)) if value is not None)
    note = f"`{command}`: {picture.title}" + (", one row per class." if picture.row_labels else ".")
    write_export(args.model_path, args.out, pictures.grid_image(picture.images, picture.nrow), note,
                 training_params(params, m.meta.get("variant")), scores, args.license)
    print(f"wrote {args.out}: {', '.join(sorted(p.name for p in args.out.iterdir()))}")


def main(argv: list[str] | None = None) -> int:
    with contextlib.ExitStack() as stack:
        return run_command(argv, stack)


def run_command(argv: list[str] | None, stack: contextlib.ExitStack) -> int:
    """main's work; `stack` holds a model URI's download until the command is done."""
    try:
        args = build_parser().parse_args(argv)
        if hasattr(args, "model"):
            args.model_path = stack.enter_context(local_model(args.model))
        loaded = None if args.command == "schedule" else load(args)
        if args.command == "export":
            check_folder(args.out)
            read_inputs(args.params, args.metrics)
        else:
            prepare_output(args.out)
        prepare_output(getattr(args, "save_array", None))
        if loaded is None:
            args.run(args)
        else:
            args.run(args, loaded)
    except (UsageError, CheckpointError, ExportError, NonFiniteImages) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in FULL:
            raise
        print(f"error: {e.strerror} writing {e.filename}; free some space and rerun", file=sys.stderr)
        return 1
    return 0
