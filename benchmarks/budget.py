"""Sample quality for a fixed wall-clock training budget: steps, images/s, FID, its floor and the ratio.

Reads params.yaml with DVC-style `-S key=value` overrides (a "profile"), prepares the data through the
pipeline's own loading path, trains the unconditional model until --minutes have passed (or for
--steps optimizer steps, to compare settings at equal steps; minutes is then the time taken), samples
--num-samples images with DDIM from the EMA weights and scores them with the domain classifier's
features against the test split, next to the floor (a real train subset of the same size). Each run is
logged to MLflow (experiment "budget") and appended to --results. --model scores a model that an
earlier run kept with --save-model (other samplers, no training). --guidance trains the class-conditional
model instead (labels dropped at train_cond.p_uncond) and samples it with balanced labels at each
classifier-free guidance weight. --autoguidance samples the unconditional model guided by the early EMA
snapshot that `-S train_uncond.guide_at=F` keeps (Karras et al. 2024) at each weight; --guidance-interval
limits either guidance to a range of noise levels (Kynkäänniemi et al. 2024). Each row has the recall (and
precision) of the samples in the classifier's features beside the FID, so that a better FID bought by less
variety shows, and for the class-conditional model its conditional accuracy (the classifier's agreement
with the labels asked for). --precision samples with the network at that precision (as sample.precision)
and --sigma-rel scores the post-hoc EMA of each relative length (Karras et al. 2024; `null`: the fixed-decay
EMA) from snapshots taken at evenly spread fractions of the budget, the last at its end (train.posthoc_snapshots).

    python -m benchmarks.budget --minutes 25 -S data.name=fashion_mnist -S model.base_channels=32 \\
        -S train.lr=1e-3 -S train.ema_decay=0.999
"""

import argparse
import copy
import csv
import dataclasses
import itertools
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import mlflow
import torch
import yaml
from mlflow import MlflowClient

from ddpm import (
    Autocast,
    CheckpointError,
    Diffusion,
    SamplerSetting,
    Trainer,
    atomic_save,
    atomic_write,
    generate,
    guide_path,
    load_classifier,
    load_guide,
    load_model,
    make_unet,
    posthoc_path,
    resolve_device,
    save_classifier,
    save_model,
)
from ddpm.checkpoint import posthoc_weights
from ddpm.classifier import Classifier, fit_classifier
from ddpm.data import floor_subset, stratified_subset
from ddpm.metrics import Scorer, make_extractor, reference_features
from ddpm.posthoc_ema import reconstruct
from ddpm.precision import PRECISIONS
from ddpm.request import RequestError, check_flag
from ddpm.samplers import METHODS, SPACINGS
from stages.pipeline.io import load_data, save_grid
from stages.pipeline.keys import apply_overrides, flatten
from stages.pipeline.params import ParamsError, sections, train_config, validate
from stages.pipeline.run import run
from stages.pipeline.store import experiment_id, repo_root, tracking_uri

FIELDS = ["name", "overrides", "minutes", "steps", "images_per_s", "params_m", "method", "ddim_steps", "spacing",
          "guidance", "fid", "floor", "ratio", "sample_s", "interval", "recall", "precision", "accuracy",
          "sigma_rel", "sample_precision"]
# guidance: the conditional model's weight, the unconditional model's autoguidance weight, or blank;
# sigma_rel: the post-hoc EMA's length, blank for the fixed-decay EMA; sample_precision: the network's when sampling


def profile(overrides: list[str]):
    """params.yaml with `key=value` overrides (values parsed as YAML, as `dvc exp run -S` does), validated."""
    return validate(apply_overrides(yaml.safe_load((repo_root() / "params.yaml").read_text()), overrides))


def classifier_for(p, data, path: Path, device) -> Classifier:
    """The domain classifier for this dataset, trained once and kept at `path`."""
    if path.is_file():
        return load_classifier(path, device)
    c = p.classifier
    model, _, acc = fit_classifier((data.train_images, data.train_labels), (data.test_images, data.test_labels),
                                   len(data.class_names), width=c.width, epochs=c.epochs, lr=c.lr,
                                   batch_size=c.batch_size, seed=p.seed, device=device)
    print(f"classifier test accuracy {acc:.4f}")  # trained as the classifier stage trains it
    save_classifier(path, model.cpu())
    return model.to(device)


def train_for(p, data, minutes: float, device, max_steps: int | None = None,
              conditional: bool = False) -> tuple[Trainer, float]:
    """The unconditional (or class-conditional) model trained for `minutes` of wall clock, or for
    `max_steps` steps if given, whatever train.epochs says: (trainer, seconds). The post-hoc EMA profiles
    (train.posthoc_sigma_rels) are snapshot train.posthoc_snapshots times, at evenly spread fractions of the
    budget, the last at its end: trainer.snapshots."""
    torch.manual_seed(p.seed)
    classes = len(data.class_names) if conditional else None
    unet = p.model.unet(data.train_images.shape[1], data.train_images.shape[2], classes)
    config = train_config(p, "cond" if conditional else "uncond")
    snapshots = config.posthoc_snapshots if config.posthoc_sigma_rels else 0
    # the budget ends training, not the epochs; it places the snapshots too, since its last step is not known
    config = dataclasses.replace(config, epochs=10**9, steps=None, posthoc_snapshots=0)
    trainer = Trainer(make_unet(unet).to(device), Diffusion.from_config(p.diffusion), data.train_images,
                      data.train_labels if conditional else None, config, device, seed=p.seed)
    trainer.schedule_steps = max_steps  # where an lr decay ends; for a wall-clock budget, estimated as it goes
    start = time.perf_counter()

    def on_step(tr, loss, seconds):
        done = tr.step / max_steps if max_steps else (time.perf_counter() - start) / (60 * minutes)
        if not max_steps:  # the steps the budget will allow at the rate so far
            tr.schedule_steps = max(tr.step + 1, round(tr.step / done))
        taken = len(tr.snapshots) // len(config.posthoc_sigma_rels or [0])
        if taken < snapshots - 1 and (taken + 1) / snapshots <= done < 1:
            tr.snapshots += tr.posthoc.snapshot()

    trainer.fit(on_step, max_steps=max_steps, seconds=None if max_steps else 60 * minutes)
    if snapshots and (not trainer.snapshots or trainer.snapshots[-1]["t"] < trainer.step):  # the last at the end
        trainer.snapshots += trainer.posthoc.snapshot()
    return trainer, time.perf_counter() - start


def sigma_rel_arg(text: str) -> float | None:
    """One of --sigma-rel's values: `null` (the fixed-decay EMA) or a length in (0, 12^-1/2)."""
    value = yaml.safe_load(text)
    if value is not None and not (isinstance(value, (int, float)) and 0 < value < 12 ** -0.5):
        raise ParamsError(f"--sigma-rel {text} is out of range; allowed: null (the fixed-decay EMA) or a number in "
                          f"(0, {12 ** -0.5:.4f})")
    return None if value is None else float(value)


def ema_nets(model, sigma_rels, snapshots=None, model_file: Path | None = None) -> dict:
    """{sigma_rel: the network with that post-hoc EMA's weights (None: `model`, the fixed-decay EMA)},
    reconstructed from `snapshots` or from the ones saved beside `model_file`."""
    nets = {}
    for w in sigma_rels:
        if w is None:
            nets[w] = model
            continue
        weights = posthoc_weights(model_file, w) if model_file else reconstruct(snapshots, w)
        nets[w] = copy.deepcopy(model)
        nets[w].load_state_dict(weights)
    return nets


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--minutes", type=float, default=25.0, help="wall-clock training budget")
    ap.add_argument("--steps", type=int, help="train for this many steps instead of --minutes")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--method", nargs="+", default=["ddim"], choices=[m for m in METHODS if m != "ddpm"],
                    help="samplers (dpmsolver: DPM-Solver++(2M), one model call per step as DDIM)")
    ap.add_argument("--ddim-steps", type=int, nargs="+", default=[50],
                    help="sampler steps (model calls); one result row per value")
    ap.add_argument("--spacing", nargs="+", default=["uniform"], choices=SPACINGS,
                    help="DDIM timestep spacings, one result row per value and step count")
    ap.add_argument("--guidance", type=float, nargs="+", metavar="W",
                    help="train the class-conditional model and sample it at these guidance weights (0: the "
                    "conditional model alone); default: the unconditional model")
    ap.add_argument("--autoguidance", type=float, nargs="+", metavar="W",
                    help="sample the unconditional model guided by its guide model (-S train_uncond.guide_at=F) at "
                    "these weights (0: the model alone)")
    ap.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"),
                    help="guide only where the noise level sigma_t = sqrt((1 - alpha_bar) / alpha_bar) is in "
                    "(LOW, HIGH] (ddpm.guidance_interval); default: at every step")
    ap.add_argument("--sigma-rel", nargs="+", default=["null"], metavar="S",
                    help="the weights to score, each in turn: post-hoc EMA lengths (needs train.posthoc_sigma_rels; "
                    "with --model, its <name>-posthoc.pt); null: the fixed-decay EMA (default)")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32",
                    help="the network's precision when sampling, as sample.precision (x_t stays fp32)")
    ap.add_argument("--name", default="", help="a label for the results table")
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("budget_results.csv"))
    ap.add_argument("--save-model", type=Path, help="also write the EMA model here (for `ddpm sample --model`), "
                    "and its guide model, if any, beside it as <name>-guide.pt")
    ap.add_argument("--model", type=Path, help="score this --save-model file instead of training (its -S "
                    "overrides unless given)")
    ap.add_argument("--classifier", type=Path,
                    help="default: benchmarks/.cache/<dataset>[-<root folder>]-classifier.pt")
    args = ap.parse_args(argv)

    saved = None
    if args.model:  # before any work: a missing or foreign file is one line
        saved = load_model(args.model)
        args.overrides = args.overrides or saved[2].get("overrides", [])
        if (saved[0].config.num_classes is not None) != (args.guidance is not None):
            raise ParamsError(f"{args.model}: a class-conditional model needs --guidance, an unconditional one "
                              "takes none")
    try:  # the rules of a sampler setting
        check_flag("--guidance", "cfg", args.guidance)
        check_flag("--autoguidance", "autoguidance", args.autoguidance)
        check_flag("--guidance-interval", "interval", args.guidance_interval and [tuple(args.guidance_interval)])
    except RequestError as e:
        raise ParamsError(str(e)) from None
    if args.guidance is not None and args.autoguidance is not None:
        raise ParamsError("--autoguidance: the unconditional model's; the class-conditional one takes --guidance")
    args.sigma_rel = [sigma_rel_arg(w) for w in args.sigma_rel]
    p = profile(args.overrides)
    posthoc = any(w is not None for w in args.sigma_rel)
    if posthoc and args.model and not posthoc_path(args.model).is_file():
        raise CheckpointError(f"--sigma-rel: {posthoc_path(args.model)}: no such file; --save-model keeps the post-hoc "
                              "EMA snapshots beside the model")
    if posthoc and not args.model and not p.train.posthoc_sigma_rels:
        raise ParamsError("--sigma-rel: set -S train.posthoc_sigma_rels=[...] to keep the snapshots it needs")
    autoguided = any(args.autoguidance or ())
    if autoguided and not args.model and not p.train_uncond.guide_at:
        raise ParamsError("--autoguidance: the model needs a guide model; set -S train_uncond.guide_at=F (0 < F < 1)")
    device = resolve_device(p.device)
    guide = load_guide(args.model, device) if autoguided and args.model else None  # before any work
    data = load_data(p)
    train = stratified_subset(data.train_images, data.train_labels, p.data.limit, p.seed)
    data = dataclasses.replace(data, train_images=train[0], train_labels=train[1])
    source = p.data.name + (f"-{Path(p.data.root).name}" if p.data.root else "")
    cache = Path(__file__).with_name(".cache") / f"{source}-classifier.pt"
    classifier = classifier_for(p, data, args.classifier or cache, device)
    floor = floor_subset(data.train_images, data.train_labels, args.num_samples, p.seed)
    extractor = make_extractor("classifier", classifier=classifier, device=device)
    scorer = Scorer({"classifier": extractor},
                    {"classifier": reference_features(extractor, (data.test_images, data.test_labels), floor,
                                                      device=device)}, seed=p.seed, device=device)

    track()
    if saved:
        model, diffusion, meta = saved
        model, diffusion = model.to(device), diffusion.to(device)
        steps, rate, minutes = meta.get("steps"), meta.get("images_per_s"), meta.get("minutes")
        nets = ema_nets(model, args.sigma_rel, model_file=args.model)
    else:
        trainer, seconds = train_for(p, data, args.minutes, device, args.steps, args.guidance is not None)
        model, diffusion = trainer.ema.module, trainer.diffusion
        guide = trainer.guide
        steps, rate = trainer.step, round(trainer.step * p.train.batch_size / seconds, 1)
        minutes = round(seconds / 60, 3) if args.steps else args.minutes
        if args.save_model:
            save_model(args.save_model, model, trainer.net.config, p.diffusion,
                       {"class_names": list(data.class_names), "steps": steps, "overrides": args.overrides,
                        "minutes": minutes, "images_per_s": rate})
            if guide is not None:
                save_model(guide_path(args.save_model), guide, trainer.net.config, p.diffusion,
                           {"class_names": list(data.class_names), "steps": trainer.guide_step})
            if trainer.snapshots:
                atomic_save({"snapshots": trainer.snapshots, "meta": {"steps": steps}}, posthoc_path(args.save_model))
        nets = ema_nets(model, args.sigma_rel, trainer.snapshots)
    guide = Autocast(guide, args.precision) if guide is not None else None
    params_m = round(sum(x.numel() for x in model.parameters()) / 1e6, 2)
    k = model.config.num_classes
    labels = torch.arange(args.num_samples) % k if k else None  # balanced, as the sample stage draws them
    interval = " ".join(f"{v:g}" for v in args.guidance_interval or ())
    for sigma_rel, method, ddim_steps, spacing, w in itertools.product(
            args.sigma_rel, args.method, args.ddim_steps, args.spacing, args.guidance or args.autoguidance or [None]):
        start = time.perf_counter()
        setting = SamplerSetting(method, min(ddim_steps, p.diffusion.timesteps), spacing=spacing,
                                 cfg=(w or 0.0) if k else None, autoguidance=(w or 0.0) if not k else 0.0,
                                 interval=args.guidance_interval, sigma_rel=sigma_rel)
        net = Autocast(nets[sigma_rel], args.precision)
        images = generate(setting.model(net, guide, diffusion), diffusion, args.num_samples,
                          tuple(data.train_images.shape[1:]), seed=p.seed, method=method, steps=setting.steps,
                          clip_x0=p.sample.clip_x0, spacing=spacing, labels=labels, progress=True)
        sample_s = time.perf_counter() - start
        scores = scorer(images, labels)["classifier"]
        fid, floor_fid = scores["fid"], scorer.floor["classifier"]["fid"]
        row = {"name": args.name, "overrides": " ".join(args.overrides), "minutes": minutes, "steps": steps,
               "images_per_s": rate, "params_m": params_m, "method": method, "ddim_steps": ddim_steps,
               "spacing": spacing, "guidance": "" if w is None else w, "fid": float(f"{fid:.5g}"),
               "floor": float(f"{floor_fid:.5g}"), "ratio": round(fid / floor_fid, 2), "sample_s": round(sample_s, 1),
               "interval": interval, "recall": round(scores["recall"], 4), "precision": round(scores["precision"], 4),
               "accuracy": round(scores["cond_accuracy"], 4) if k else "",
               "sigma_rel": "" if sigma_rel is None else sigma_rel, "sample_precision": net.precision}
        print("  ".join(f"{k}={v}" for k, v in row.items()))
        record(args.name, setting, p, row, images, args.results)


def track() -> None:
    """Log to the pipeline's MLflow store, experiment "budget", which the MLflow UI shows as a runs table."""
    budget = experiment_id(MlflowClient(tracking_uri()), "budget")  # before set_tracking_uri, which sets the variable
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment_id=budget)


def record(name: str, setting: SamplerSetting, p, row: dict, images: torch.Tensor, results: Path) -> None:
    """One result: an MLflow run (params, metrics, a sample grid), named by --name and the sampler setting so that
    the runs of one call tell apart in the runs table, and a CSV row."""
    grid = Path(tempfile.mkdtemp()) / "samples.png"
    save_grid(images[:100], grid, nrow=10)
    with mlflow.start_run(run_name=f"{name}: {setting.label}" if name else setting.label):
        mlflow.log_params({**flatten(sections(p, "data", "diffusion", "model", "train")), "name": name,
                           "minutes": row["minutes"],
                           "method": row["method"], "ddim_steps": row["ddim_steps"], "spacing": row["spacing"],
                           **({"guidance": row["guidance"]} if row["guidance"] != "" else {}),
                           **({"guidance_interval": row["interval"]} if row["interval"] else {}),
                           **({"sigma_rel": row["sigma_rel"]} if row["sigma_rel"] != "" else {}),
                           "sample_precision": row["sample_precision"],
                           "overrides": row["overrides"][:500]})
        metrics = ("steps", "images_per_s", "fid", "floor", "ratio", "sample_s", "recall", "precision", "accuracy")
        mlflow.log_metrics({k: float(row[k]) for k in metrics if row[k] not in (None, "")})
        mlflow.log_artifact(str(grid))
    with results.open(newline="") if results.exists() else nullcontext([]) as f:
        rows = list(csv.DictReader(f))  # rewritten whole, so that a column added since reads blank in old rows
    with atomic_write(results) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, restval="")
        writer.writeheader()
        writer.writerows([*rows, row])


if __name__ == "__main__":
    run(main)
