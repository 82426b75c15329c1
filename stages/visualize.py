"""visualize: pictures of the trained models for people to look at (the metrics are evaluate's).

usage: python -m stages.visualize --uncond FILE --cond FILE --out DIR
Writes into DIR, each picture with row and column labels: cond_classes.png (one row per class, with
guidance visualize.guidance; the unconditional model's pictures with autoguidance visualize.autoguidance,
guided by its model-guide.pt; each only in sample.guidance_interval / sample.autoguidance_interval where
set, as the sample stages guide; with the weights of visualize.sigma_rel, the network at sample.precision); for
each model <variant>_reverse.png (x_t and the predicted x0 along
DDIM), <variant>_interpolation.png (DDIM decodings of a slerp between two noises) and
<variant>_compare.png (the same noise through DDPM and DDIM at visualize.compare_steps); and
schedule.png (beta_t, alpha_bar_t and log-SNR of the linear and cosine schedules).
"""

from pathlib import Path

import torch

from ddpm import Autocast, ImageGenerator, SamplerSetting, generate, load_guide, load_model, resolve_device
from ddpm.pictures import Picture, interpolation, reverse_strip, sampler_comparison, schedule_figure

from .pipeline.io import atomic_dir, save_figure
from .pipeline.params import load_params, sections
from .pipeline.run import check_writable, path_parser, run, seed_everything
from .pipeline.tracking import stage_run


def draw(variant: str, model_path: Path, p, device: torch.device, out: Path) -> int:
    """Every picture of one model into `out`; returns the model's T."""
    v, seed, n = p.visualize, p.seed, p.visualize.num_images
    model, diffusion, meta = load_model(model_path, device, sigma_rel=v.sigma_rel)
    k, T = model.config.num_classes, diffusion.timesteps
    shape = model.config.sample_shape
    steps = min(v.steps, T)
    names = [str(c) for c in meta.get("class_names") or range(k or 0)]
    y = torch.arange(n) % k if k else None
    rows = [names[i] for i in y] if k else None
    # every picture below from the guided model: the conditional model with classifier-free guidance, the
    # unconditional one autoguided by its early EMA snapshot, each in its interval as the sample stages guide
    interval = p.sample.guidance_interval if k else p.sample.autoguidance_interval
    setting = SamplerSetting("ddim", steps, cfg=v.guidance if k else None, autoguidance=0.0 if k else v.autoguidance,
                             interval=interval if (v.guidance if k else v.autoguidance) else None,
                             sigma_rel=v.sigma_rel)
    guide = Autocast(load_guide(model_path, device), p.sample.precision) if setting.autoguidance else None
    model = setting.model(Autocast(model, p.sample.precision), guide, diffusion)
    tag = ", ".join(filter(None, [f"{variant} model", setting.guidance_label, setting.ema_label]))

    if k:  # one row per class
        labels = torch.arange(k).repeat_interleave(v.per_class)
        images = generate(model, diffusion, len(labels), shape, seed=seed, steps=steps, labels=labels,
                          batch_size=min(len(labels), 256), progress=True)  # the images do not depend on it
        save_figure(Picture(images, v.per_class, f"{tag}: DDIM {steps} steps", names).figure(),
                    out / f"{variant}_classes.png")

    gen = ImageGenerator(seed, range(n), device)
    strip = reverse_strip(model, diffusion, gen.randn((n, *shape)), y=y.to(device) if k else None,
                          num_frames=v.frames, steps=steps, generator=gen, progress=True)
    strip.title = f"{tag}: reverse process, DDIM {steps} steps"
    if k:
        strip.row_labels = [r for name in rows for r in (f"{name}: x_t", "predicted x0")]
    save_figure(strip.figure(), out / f"{variant}_reverse.png")

    noise = ImageGenerator(seed, range(2 * n), device).randn((2 * n, *shape))
    pic = interpolation(model, diffusion, noise[0::2], noise[1::2], v.frames, y=y, steps=steps,
                        progress=True)
    pic.title, pic.row_labels = f"{tag}: slerp between two noises, DDIM {steps} steps", rows
    save_figure(pic.figure(), out / f"{variant}_interpolation.png")

    pic = sampler_comparison(model, diffusion, n, shape, seed=seed, y=y, progress=True,
                             steps=[s for s in v.compare_steps if s <= T] or [T])
    pic.title, pic.row_labels = f"{tag}: the same noise, DDPM (eta 1) vs DDIM (eta 0)", rows
    save_figure(pic.figure(), out / f"{variant}_compare.png")
    return T


def main(argv: list[str]) -> None:
    a = path_parser("--uncond", "--cond", "--out").parse_args(argv)
    p = load_params()
    check_writable(a.out)
    with stage_run("visualize", params=sections(p, "seed", "device", "visualize", "sample.guidance_interval",
                                                   "sample.autoguidance_interval", "sample.precision")) as tracker:
        seed_everything(p.seed)
        device = resolve_device(p.device)
        with atomic_dir(a.out) as tmp:
            draw("uncond", a.uncond, p, device, tmp)
            T = draw("cond", a.cond, p, device, tmp)
            save_figure(schedule_figure(T), tmp / "schedule.png")
        tracker.log_artifact(a.out, "pictures")


if __name__ == "__main__":
    run(main)
