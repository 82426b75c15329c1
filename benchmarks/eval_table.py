"""The full evaluation table of one trained model: each sampler setting sampled, timed and scored.

For a model file, the prepared data (train.pt, test.pt, info.json) and the domain classifier, it samples
DDPM, DDIM at each --steps x --eta and DPM-Solver++(2M) at each --dpmsolver-steps, x each --guidance for a
conditional model or x each --autoguidance for an unconditional one (guided by its <name>-guide.pt), with
the pipeline's sampler options (--spacing, --clip-x0, --guidance-interval, --precision, --sigma-rel), and prints
one row per setting:
FID, KID, IS, precision/recall, conditional accuracy, FID over the floor, wall time and images/s.
The first row is the floor: a class-stratified real train subset of --num-samples images scored against the
test split exactly as the samples are, the best this protocol lets a model score.

    python benchmarks/eval_table.py --model models/cond/model.pt --data data/prepared \\
        --classifier models/classifier/classifier.pt --num-samples 1000 --steps 10 20 50 --dpmsolver-steps 10 20 \\
        --guidance 1 2 4
"""

import argparse
import time

import torch

from ddpm import (
    Autocast,
    generate,
    guide_path,
    load_classifier,
    load_guide,
    load_model,
    resolve_device,
    safe_load,
    sampler_settings,
)
from ddpm.data import floor_subset
from ddpm.metrics import Scorer, make_extractor, reference_features
from ddpm.precision import PRECISIONS
from ddpm.request import RequestError, check_flag
from ddpm.samplers import METHODS, SPACINGS

COLUMNS = [("FID", "fid", "{:8.3f}"), ("xfloor", "fid_over_floor", "{:7.2f}"), ("KID", "kid_mean", "{:8.4f}"),
           ("±", "kid_std", "{:7.4f}"), ("IS", "is_mean", "{:6.2f}"), ("±", "is_std", "{:5.2f}"),
           ("P", "precision", "{:5.3f}"), ("R", "recall", "{:5.3f}"), ("acc", "cond_accuracy", "{:5.3f}")]


def settings(args, timesteps: int, conditional: bool) -> list:
    """DDPM (unless --no-ddpm), DDIM at each steps x eta and DPM-Solver++(2M) at each of its steps, each at
    every guidance weight when conditional, every autoguidance weight when not."""
    return [s for method in METHODS if not (method == "ddpm" and args.no_ddpm)
            for s in sampler_settings(method, timesteps, steps={"ddpm": [timesteps], "ddim": args.steps}.get(
                                          method, args.dpmsolver_steps),
                                      etas=args.eta, spacing=args.spacing, cfg=args.guidance if conditional else None,
                                      autoguidance=(0.0,) if conditional else args.autoguidance,
                                      interval=args.guidance_interval)]


def scorer_for(args, device: torch.device, n: int) -> Scorer:
    """Reference features of the test split and of the floor subset, for each requested extractor."""
    test, train = (safe_load(f"{args.data}/{split}.pt", ("images", "labels")) for split in ("test", "train"))
    floor = floor_subset(train["images"], train["labels"], n, args.seed)  # as the reference stage draws it
    classifier = load_classifier(args.classifier, device)
    extractors = {e: make_extractor(e, classifier=classifier, weights=args.inception_weights, device=device)
                  for e in args.extractors}
    refs = {e: reference_features(fe, (test["images"], test["labels"]), floor, batch_size=args.batch_size,
                                  device=device) for e, fe in extractors.items()}
    return Scorer(extractors, refs, seed=args.seed, batch_size=args.batch_size, device=device)


def row(name: str, scores: dict[str, dict], seconds: float | None = None, n: int = 0) -> str:
    main = scores["classifier"]
    cells = [fmt.format(main[key]) if key in main else " " * len(fmt.format(0.0)) for _, key, fmt in COLUMNS]
    cells += [f"{s['fid']:9.3f}" for e, s in scores.items() if e != "classifier"]
    cells += [f"{seconds:8.1f} {n / seconds:8.1f}" if seconds else f"{'':8} {'':8}"]
    return f"{name:<26} " + " ".join(cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a folder written by the prepare stage")
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50], help="DDIM steps")
    ap.add_argument("--eta", type=float, nargs="+", default=[0.0])
    ap.add_argument("--dpmsolver-steps", type=int, nargs="*", default=[], help="DPM-Solver++(2M) steps")
    ap.add_argument("--spacing", default="uniform", choices=SPACINGS, help="DDIM and DPM-Solver timesteps")
    ap.add_argument("--clip-x0", action="store_true", help="clip the predicted x0 to [-1, 1] at every step")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="for a conditional model")
    ap.add_argument("--autoguidance", type=float, nargs="+", default=[0.0],
                    help="for an unconditional model, guided by its guide model <name>-guide.pt "
                    "(train_uncond.guide_at)")
    ap.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"),
                    help="guide only at noise levels sigma in (LOW, HIGH] (ddpm.guidance_interval); default: all")
    ap.add_argument("--no-ddpm", action="store_true", help="skip ancestral sampling over all T steps")
    ap.add_argument("--extractors", nargs="+", default=["classifier"], choices=["classifier", "inception"])
    ap.add_argument("--inception-weights", help="torch-fidelity's Inception-v3 file (else its cache; no download)")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS, help="the network's, as sample.precision")
    ap.add_argument("--sigma-rel", type=float, help="the post-hoc EMA of this length (as sample.sigma_rel; "
                    "default: the model file's fixed-decay EMA)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    args.extractors = ["classifier", *(e for e in args.extractors if e != "classifier")]

    device = resolve_device(args.device)
    model, diffusion, _ = load_model(args.model, device, sigma_rel=args.sigma_rel)
    k, n = model.config.num_classes, args.num_samples
    try:  # the rules of a sampler setting, before any scoring or sampling
        check_flag("--guidance", "cfg", args.guidance)
        check_flag("--autoguidance", "autoguidance", args.autoguidance)
        check_flag("--eta", "eta", args.eta)
        check_flag("--guidance-interval", "interval", args.guidance_interval and [tuple(args.guidance_interval)])
    except RequestError as e:
        ap.error(str(e))
    guide = None
    if any(args.autoguidance):  # checked before any scoring or sampling
        if k is not None:
            ap.error(f"--autoguidance needs an unconditional model, but {args.model} is class-conditional")
        if not guide_path(args.model).is_file():
            ap.error(f"--autoguidance needs the guide model {guide_path(args.model)}; train with "
                     "train_uncond.guide_at > 0")
        guide = Autocast(load_guide(args.model, device), args.precision)
    scorer = scorer_for(args, device, n)
    labels = torch.arange(n) % k if k else None
    net = Autocast(model, args.precision)
    ema = f", post-hoc EMA sigma_rel {args.sigma_rel}" if args.sigma_rel else ""
    counts = scorer.settings()
    print(f"{n} samples per row on {device} in {net.precision}{ema}; reference: {counts['num_real']} test images; "
          f"floor: {counts['num_floor']} train images; extractors: {', '.join(args.extractors)}")
    print(f"{'setting':<26} " + " ".join(f"{h:>{len(fmt.format(0.0))}}" for h, _, fmt in COLUMNS) + "".join(
        f" {'FID ' + e[:4]:>9}" for e in args.extractors[1:]) + f" {'wall s':>8} {'img/s':>8}")
    print(row("floor (real train)", scorer.floor))
    for s in settings(args, diffusion.timesteps, k is not None):
        start = time.perf_counter()
        images = generate(s.model(net, guide, diffusion), diffusion, n, model.config.sample_shape, seed=args.seed,
                          method=s.method, steps=s.steps, eta=s.eta, labels=labels, batch_size=args.batch_size,
                          clip_x0=args.clip_x0, spacing=s.spacing)
        seconds = time.perf_counter() - start
        print(row(s.tag, scorer(images, labels), seconds, n), flush=True)


if __name__ == "__main__":
    main()
