"""sample: draw images from a trained model with DDPM, with DDIM at each of sample.ddim_steps or with
DPM-Solver++(2M) at each of sample.dpmsolver_steps.

usage: python -m stages.sample VARIANT METHOD --model FILE --out DIR
Writes, per sampler setting, <tag>.pt (uint8 images + requested labels), <tag>.png (a grid) and
index.json (settings, wall time, images/s). The conditional model gets balanced labels and each
classifier-free guidance weight of sample.guidance; the unconditional model each autoguidance weight of
sample.autoguidance where it is not 0, guided by the model's guide model (model-guide.pt beside it: the
EMA weights that train.guide_at kept).
A method that sample.methods leaves out writes an empty index.json.
"""

import itertools
import time

import torch

from ddpm import Autoguided, atomic_save, generate, guide_path, load_model, resolve_device
from ddpm.sampling import METHODS

from .pipeline.io import atomic_dir, save_grid, write_json
from .pipeline.params import load_params, sections
from .pipeline.run import path_parser, run, seed_everything
from .pipeline.tracking import stage_run


def settings(method: str, p, timesteps: int, conditional: bool) -> list[dict]:
    """Every sampler setting of this method: steps x eta x guidance weight (classifier-free guidance when
    conditional, autoguidance when not)."""
    ws = p.sample.guidance if conditional else p.sample.autoguidance
    if method == "ddpm":
        grid = [{"method": "ddpm", "steps": timesteps, "eta": 1.0, "guidance": w} for w in ws]
    elif method == "ddim":
        grid = [{"method": "ddim", "steps": s, "eta": e, "spacing": p.sample.spacing, "guidance": w}
                for s, e, w in itertools.product(p.sample.ddim_steps, p.sample.eta, ws)]
    else:  # deterministic: eta 0, as DDIM's ODE sampler
        grid = [{"method": method, "steps": s, "eta": 0.0, "spacing": p.sample.spacing, "guidance": w}
                for s, w in itertools.product(p.sample.dpmsolver_steps, ws)]
    for g in grid:
        if method == "ddpm":
            name = "ddpm"
        elif method == "ddim":
            name = f"ddim{g['steps']}_eta{g['eta']:g}"
        else:
            name = f"{method}{g['steps']}"
        if conditional:
            name += f"_w{g['guidance']:g}"
        elif g["guidance"]:  # autoguidance; unguided tags stay as they were before it existed
            name += f"_ag{g['guidance']:g}"
        g["tag"] = name
    return grid


def main(argv: list[str]) -> None:
    ap = path_parser("--model", "--out")
    ap.add_argument("variant", choices=("uncond", "cond"))
    ap.add_argument("method", choices=METHODS)
    a = ap.parse_args(argv)
    p = load_params()
    with stage_run(f"sample-{a.method}", a.variant, sections(p, "seed", "device", "sample")) as tracker:
        sample(a, p, tracker)


def sample(a, p, tracker) -> None:
    with atomic_dir(a.out) as tmp:
        if a.method in p.sample.methods:
            index = draw(a, p, tracker, tmp)
        else:  # nothing to sample, so the model is not even loaded
            print(f"{a.variant} {a.method}: not in sample.methods, nothing to sample")
            index = []
        write_json(tmp / "index.json", index)
    for f in [*sorted(a.out.glob("*.png")), a.out / "index.json"]:
        tracker.log_artifact(f, "samples")


def draw(a, p, tracker, out) -> list[dict]:
    """Sample every setting of the method into `out` (<tag>.pt and <tag>.png); returns the index rows."""
    seed_everything(p.seed)
    device = resolve_device(p.device)
    model, diffusion, _ = load_model(a.model, device)
    k = model.config.num_classes
    grid = settings(a.method, p, diffusion.timesteps, k is not None)
    guide = None
    if k is None and any(s["guidance"] for s in grid):  # autoguidance: the snapshot that train.guide_at kept
        guide = load_model(guide_path(a.model), device)[0]
    n = p.sample.num_samples
    labels = torch.arange(n) % k if k else None
    shape = (model.config.in_channels, model.config.image_size, model.config.image_size)
    index = []
    for s in grid:
        start = time.perf_counter()
        net = Autoguided(model, guide, s["guidance"]) if guide is not None else model
        images = generate(net, diffusion, n, shape, seed=p.seed, method=s["method"], steps=s["steps"],
                          eta=s["eta"], labels=labels, guidance=s["guidance"] if k else 0.0,
                          batch_size=p.sample.batch_size, clip_x0=p.sample.clip_x0,
                          spacing=p.sample.spacing, progress=True)
        seconds = time.perf_counter() - start
        atomic_save({"images": images, "labels": labels if k else torch.zeros(0, dtype=torch.long)},
                    out / f"{s['tag']}.pt")
        save_grid(images[:p.sample.grid_size], out / f"{s['tag']}.png", nrow=k)
        index.append({**s, "variant": a.variant, "num_samples": n, "seed": p.seed,
                      "seconds": round(seconds, 2), "images_per_second": round(n / seconds, 2)})
        print(f"{a.variant} {s['tag']}: {n} images in {seconds:.1f} s")
        tracker.log_metrics({f"{s['tag']}.seconds": seconds, f"{s['tag']}.images_per_second": n / seconds})
    return index


if __name__ == "__main__":
    run(main)
