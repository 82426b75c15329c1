"""sample: draw images from a trained model with DDPM at each of sample.ddpm_steps (T: all of them; fewer: a
strided chain), with DDIM at each of sample.ddim_steps x sample.eta or with DPM-Solver++(2M) at each of
sample.dpmsolver_steps.

usage: python -m stages.sample VARIANT METHOD --model FILE --out DIR
Writes, per sampler setting (ddpm.SamplerSetting), <tag>.pt (uint8 images + requested labels), <tag>.png (a
grid) and index.json (the settings, wall time, images/s). The conditional model gets balanced labels at each
classifier-free guidance weight of sample.guidance; the unconditional model each autoguidance weight of
sample.autoguidance, guided by its guide model (model-guide.pt beside it, kept by train_uncond.guide_at); each
guided only at the noise levels of sample.guidance_interval / sample.autoguidance_interval where set; with
the weights of each of sample.sigma_rel (null: model.pt's fixed-decay EMA; a length: the post-hoc EMA
reconstructed from model-posthoc.pt beside it); the network at sample.precision (recorded in index.json as what it
means on this device). A method that sample.methods leaves out writes an empty index.json.
"""

import time

import torch

from ddpm import (
    Autocast,
    atomic_save,
    generate,
    load_guide,
    load_model,
    resolve_device,
    resolve_precision,
    sampler_settings,
)
from ddpm.samplers import METHODS

from .pipeline.bounds import sample_batch_size
from .pipeline.io import atomic_dir, file_hash, save_grid, write_json
from .pipeline.params import load_params, sections
from .pipeline.run import check_writable, init_distributed, join_or_relaunch, path_parser, run, seed_everything
from .pipeline.shard import gather, share
from .pipeline.tracking import stage_run


def settings(method: str, p, timesteps: int, conditional: bool):
    s = p.sample
    steps = {"ddpm": s.ddpm_steps, "ddim": s.ddim_steps, "dpmsolver": s.dpmsolver_steps}[method]
    return sampler_settings(method, timesteps, steps=steps,
                            etas=s.eta, spacing=s.spacing, cfg=s.guidance if conditional else None,
                            autoguidance=(0.0,) if conditional else s.autoguidance,
                            interval=s.guidance_interval if conditional else s.autoguidance_interval,
                            sigma_rels=s.sigma_rel)


def main(argv: list[str]) -> None:
    ap = path_parser("--model", "--out")
    ap.add_argument("variant", choices=("uncond", "cond"))
    ap.add_argument("method", choices=METHODS)
    a = ap.parse_args(argv)
    p = load_params()
    check_writable(a.out)
    join_or_relaunch(p.train, "stages.sample", argv)  # the images do not depend on the number of processes
    rank, world_size, device = init_distributed(p.device)
    if rank > 0:  # only rank 0 writes files and talks to MLflow
        if a.method in p.sample.methods:
            draw(a, p, None, device, rank, world_size)
        return
    with stage_run(f"sample-{a.method}", a.variant, sections(p, "seed", "device", "sample")) as tracker:
        tracker.set_tags({"precision": resolve_precision(p.sample.precision, device)})  # what auto means here
        sample(a, p, tracker, device, world_size)


def sample(a, p, tracker, device=None, world_size: int = 1) -> None:
    device = device or resolve_device(p.device)
    with atomic_dir(a.out) as tmp:
        if a.method in p.sample.methods:
            index = draw(a, p, tmp, device, 0, world_size)
        else:  # nothing to sample, so the model is not even loaded
            print(f"{a.variant} {a.method}: not in sample.methods, nothing to sample")
            index = []
        write_json(tmp / "index.json", index)
    for s in index:  # a series per sampler and guidance over the step count, e.g. ddim_eta0_w1 at steps 5, 10
        tracker.log_image(a.out / f"{s['tag']}.png", s["tag"].replace(f"{s['method']}{s['steps']}", s["method"], 1),
                          step=s["steps"])
    tracker.log_artifact(a.out / "index.json", "samples")
    tracker.log_table(index, "samples/timings.json")


def draw(a, p, out, device, rank: int, world_size: int) -> list[dict]:
    """Sample every setting of the method into `out` (<tag>.pt and <tag>.png); returns the index rows. With
    several processes each draws its share of the images and rank 0 (`out` set) gathers and writes them."""
    seed_everything(p.seed)
    model, diffusion, _ = load_model(a.model, device)
    k, n = model.config.num_classes, p.sample.num_samples
    grid = settings(a.method, p, diffusion.timesteps, k is not None)
    guide = load_guide(a.model, device) if any(s.autoguidance for s in grid) else None
    guide = Autocast(guide, p.sample.precision) if guide is not None else None
    nets = {w: Autocast(load_model(a.model, device, sigma_rel=w)[0] if w is not None else model, p.sample.precision)
            for w in p.sample.sigma_rel}  # each reconstructed (and checked) before any sampling
    labels = torch.arange(n) % k if k else None
    mine, index = share(n, rank, world_size), []
    model_hash = file_hash(a.model)  # which model version the scores of these samples belong to
    my_labels = labels[mine.start:mine.stop] if k else None
    for s in grid:
        net = nets[s.sigma_rel]
        batch = p.sample.batch_size or sample_batch_size(model, device, len(mine), bool(s.cfg or s.autoguidance))
        if rank == 0:
            print(f"{a.variant} {s.tag}: {n} images in batches of {batch} on {device} in {net.precision} "
                  f"({world_size} processes)")
        start = time.perf_counter()
        images = generate(s.model(net, guide, diffusion), diffusion, len(mine), model.config.sample_shape,
                          seed=p.seed, method=s.method, steps=s.steps, eta=s.eta, labels=my_labels,
                          batch_size=batch, clip_x0=p.sample.clip_x0, spacing=s.spacing,
                          progress=rank == 0, first=mine.start)
        if (images := gather(images, world_size)) is None:
            continue
        seconds = time.perf_counter() - start
        atomic_save({"images": images, "labels": labels if k else torch.zeros(0, dtype=torch.long)},
                    out / f"{s.tag}.pt")
        save_grid(images[:p.sample.grid_size], out / f"{s.tag}.png", nrow=k)
        index.append({**s.to_dict(), "variant": a.variant, "num_samples": n, "seed": p.seed, "model_hash": model_hash,
                      "precision": net.precision, "batch_size": batch, "seconds": round(seconds, 2),
                      "images_per_second": round(n / seconds, 2), "processes": world_size})
        print(f"{a.variant} {s.tag}: {n} images in {seconds:.1f} s")
    return index


if __name__ == "__main__":
    run(main)
