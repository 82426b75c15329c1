"""The GPU check's measurements: torch.mm rates, training steps (images/s and achieved GFLOP/s, FLOPs
counted by torch.utils.flop_counter) per precision, compiled and channels-last, and sampling images/s per
sampler, step count and guidance in fp32 and per precision (sample.precision: ddpm.Autocast); the cifar10
profile's network at 32x32x3; each a row of the report."""

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.gpu_report import Report
from benchmarks.project import merge
from benchmarks.throughput import matmul_gflops, timed
from ddpm import Autocast, ClassifierFree, Diffusion, DiffusionConfig, TrainConfig, Trainer, UNet, UNetConfig, generate

# Per mode: matmul side and repeats, training batch (None: train.batch_size) and timed steps, sampled
# images and sampler steps (at most diffusion.timesteps), and seconds: a measurement's usual cost, a
# compiled one's, and what to keep for the pipeline.
SIZES = {
    "gpu": {"matmul_n": 8192, "matmul_reps": 20, "batch": None, "train_steps": 10, "images": 500,
            "sample_steps": (50, 20), "estimate_s": 20, "compile_s": 120, "pipeline_s": 330},
    "tiny": {"matmul_n": 512, "matmul_reps": 3, "batch": 8, "train_steps": 2, "images": 4,
             "sample_steps": (10, 5), "estimate_s": 1, "compile_s": 0, "pipeline_s": 0},
}
TRAIN_VARIANTS = {  # name: (precision, other TrainConfig fields)
    "fp32": ("fp32", {}), "tf32": ("tf32", {}), "bf16": ("bf16", {}), "fp16": ("fp16", {}),
    "auto, channels-last": ("auto", {"channels_last": True}), "auto, compiled": ("auto", {"compile": True}),
}


def unet_config(params: dict, num_classes: int | None, channels: int = 1, size: int = 28) -> UNetConfig:
    model = {k: tuple(v) if isinstance(v, list) else v for k, v in params["model"].items()}
    return UNetConfig(in_channels=channels, image_size=size, num_classes=num_classes, **model)


def training_speed(device, unet: UNetConfig, diffusion: Diffusion, batch: int, steps: int, precision: str,
                   flops: float | None = None, **options) -> dict:
    """Images/s of Trainer.train_step at `batch`; with `flops` per step, the GFLOP/s that makes."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (batch, *unet.sample_shape), dtype=torch.uint8)
    config = TrainConfig(batch_size=batch, lr=1e-4, warmup_steps=1, precision=precision, **options)
    trainer = Trainer(UNet(unet).to(device), diffusion, images, None, config, device)
    idx = torch.arange(batch, device=device)
    first = timed(lambda: trainer.train_step(idx), device)  # with compiling and autotuning
    trainer.train_step(idx)
    step = timed(lambda: trainer.train_step(idx), device, steps)
    row = {"precision": trainer.precision, "images_per_s": batch / step, "step_ms": 1e3 * step, "first_step_s": first}
    return {**row, "gflops": flops / step / 1e9} if flops else row


def step_flops(unet: UNetConfig, diffusion: DiffusionConfig, batch: int) -> float:
    """Matmul and convolution FLOPs of one training step (forward and backward) at `batch`, counted on the
    meta device: no memory, no time, the same on every machine."""
    with torch.device("meta"):
        model = UNet(unet)
    x0 = torch.zeros(batch, *unet.sample_shape, device="meta")
    with FlopCounterMode(display=False) as counter:
        Diffusion.from_config(diffusion).to("meta").loss(model, x0).mean().backward()
    return float(counter.get_total_flops())


def sampling_speed(model, diffusion, n: int, method: str, steps: int, guided: bool, precision: str = "fp32") -> dict:
    """Images/s of `generate` for n images in one batch, class-conditional (if the model is), guided at w = 1
    or not, the network at `precision` as the sample stages run it (`Autocast`: the sampler's state in fp32)."""
    c = model.config
    labels = torch.arange(n) % c.num_classes if c.num_classes else None
    options = {"seed": 0, "method": method, "labels": labels, "batch_size": n}
    net = Autocast(model, precision)
    net = ClassifierFree(net, 1.0) if guided else net
    generate(net, diffusion, n, c.sample_shape, steps=2, **options)  # warm-up
    start = time.perf_counter()
    generate(net, diffusion, n, c.sample_shape, steps=steps, **options)
    seconds = time.perf_counter() - start
    return {"images_per_s": n / seconds, "seconds": seconds}


def matmul_rows(r: Report, device: torch.device, s: dict) -> None:
    for precision in ("fp32", "tf32", "bf16", "fp16"):
        if precision == "tf32" and device.type != "cuda":
            r.add("matmul", {"precision": precision, "note": "cuda only"})
            continue
        r.measure("matmul", {"precision": precision}, lambda p=precision: {"tflops": matmul_gflops(
            device, p, s["matmul_n"], s["matmul_reps"]) / 1e3}, s["estimate_s"], s["pipeline_s"])


def train_rows(r: Report, device: torch.device, params: dict, s: dict, variants: list[str]) -> None:
    config = DiffusionConfig(**params["diffusion"])
    unet, batch = unet_config(params, None), s["batch"] or params["train"]["batch_size"]
    flops = step_flops(unet, config, batch)
    diffusion = Diffusion.from_config(config).to(device)
    with torch.device("meta"):
        size = sum(p.numel() for p in UNet(unet).parameters())
    r.data["meta"]["train_model"] = (f"UNet {size / 1e6:.1f}M params, 28x28x1, batch {batch}, "
                                     f"{flops / 1e12:.3g} TFLOP per step")
    rate = {row["precision"]: row.get("tflops") for row in r.data["matmul"]}
    for name in variants:
        precision, options = TRAIN_VARIANTS[name]
        if device.type != "cuda" and (precision == "tf32" or "channels_last" in options):
            r.add("train", {"variant": name, "note": "cuda only"})
        elif device.type != "cuda" and "compile" in options:
            r.add("train", {"variant": name, "note": "cuda only here: compiling takes minutes on a small CPU"})
        else:
            estimate = s["compile_s"] if "compile" in options else s["estimate_s"]
            r.measure("train", {"variant": name}, lambda p=precision, o=options: training_speed(
                device, unet, diffusion, batch, s["train_steps"], p, flops, **o), estimate, s["pipeline_s"])
            row = r.data["train"][-1]
            if row.get("gflops") and rate.get(row["precision"]):
                row["of_matmul_rate"] = f"{row['gflops'] / 1e3 / rate[row['precision']]:.0%}"
                r.write()


def sample_rows(r: Report, device: torch.device, params: dict, s: dict) -> None:
    """fp32 per sampler, step count and guidance; then DDIM at the larger step count, guided, per precision."""
    diffusion = Diffusion.from_config(DiffusionConfig(**params["diffusion"])).to(device)
    torch.manual_seed(0)
    model = UNet(unet_config(params, 10)).to(device).eval()
    many, few = s["sample_steps"]
    settings = [(m, k, g, "fp32") for m in ("ddim", "dpmsolver") for k in (many, few) for g in (False, True)]
    for method, steps, guided, precision in [*settings, *(("ddim", many, True, p) for p in ("tf32", "bf16", "fp16"))]:
        row = {"sampler": "DDIM" if method == "ddim" else "DPM-Solver++(2M)", "steps": steps,
               "guidance": "cfg (2 evals/step)" if guided else "none", "precision": precision, "images": s["images"]}
        if precision == "tf32" and device.type != "cuda":
            r.add("sample", {**row, "note": "cuda only"})
            continue
        r.measure("sample", row, lambda m=method, k=steps, g=guided, p=precision: sampling_speed(
            model, diffusion, s["images"], m, k, g, p), s["estimate_s"], s["pipeline_s"])


def cifar10_rows(r: Report, device: torch.device, params: dict, s: dict, tiny: bool) -> None:
    """The cifar10 profile's UNet (`params`: its values) unconditional at 32x32x3: training images/s in the
    profile's precision and what its steps take per model; DDIM-100 images/s and what 50,000 images take.
    --tiny: 8 channels, fp32, DDIM at the tiny sampler steps."""
    if tiny:
        params = merge(params, {"model": {"base_channels": 8}, "train": {"precision": "fp32"}})
    unet, config = unet_config(params, None, 3, 32), DiffusionConfig(**params["diffusion"])
    batch, steps = s["batch"] or params["train"]["batch_size"], params["train_uncond"]["steps"]
    diffusion, sampling_steps = Diffusion.from_config(config).to(device), s["sample_steps"][1] if tiny else 100

    def train():
        row = training_speed(device, unet, diffusion, batch, s["train_steps"], params["train"]["precision"],
                             step_flops(unet, config, batch))
        return {**row, f"hours_for_{steps}_steps": row["step_ms"] * steps / 3.6e6}
    r.measure("cifar10", {"run": f"train, batch {batch}"}, train, s["estimate_s"], s["pipeline_s"])
    model = UNet(unet).to(device).eval()

    def sample():
        row = sampling_speed(model, diffusion, s["images"], "ddim", sampling_steps, False)
        return {**row, "minutes_for_50000_images": 50_000 / row["images_per_s"] / 60}
    r.measure("cifar10", {"run": f"sample DDIM-{sampling_steps}, {s['images']} images"}, sample, s["estimate_s"],
              s["pipeline_s"])
