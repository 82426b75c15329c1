"""Training and sampling throughput of the UNet on this machine.

Prints training images/s, the FLOPs of one training step (forward + backward, counted by
torch.utils.flop_counter), the achieved FLOP/s against this machine's measured matmul rate, and the
overhead of the DDIM sampler over the bare network forwards it makes.

    python benchmarks/throughput.py --steps 5                  # the default UNetConfig at 28x28x1
    python benchmarks/throughput.py --batch-size 32 --base-channels 32 --precision bf16
"""

import argparse
import contextlib
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddpm import (
    Diffusion,
    DiffusionConfig,
    TrainConfig,
    Trainer,
    UNet,
    UNetConfig,
    ddim_sample,
    ddim_timesteps,
    resolve_device,
)
from ddpm.precision import AUTOCAST, PRECISIONS, resolve_precision, tf32


def timed(fn, device: torch.device, reps: int = 1) -> float:
    """Seconds per call of fn(), after the work queued on the device has finished."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps


def matmul_gflops(device: torch.device, precision: str, n: int = 2048, reps: int = 3) -> float:
    """torch.mm of two n x n matrices in `precision` (fp32, tf32, bf16, fp16), GFLOP/s."""
    a, b = (torch.randn(n, n, device=device).to(AUTOCAST.get(precision, torch.float32)) for _ in range(2))
    with tf32(precision == "tf32") if device.type == "cuda" else contextlib.nullcontext():
        torch.mm(a, b)  # warm-up
        return 2 * n**3 / timed(lambda: torch.mm(a, b), device, reps) / 1e9


def main() -> None:
    default = UNetConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--image-size", type=int, default=default.image_size)
    p.add_argument("--channels", type=int, default=default.in_channels)
    p.add_argument("--base-channels", type=int, default=default.base_channels)
    p.add_argument("--channel-mults", type=int, nargs="+", default=list(default.channel_mults))
    p.add_argument("--num-res-blocks", type=int, default=default.num_res_blocks)
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="for training (as train.precision) and sampling (autocast for bf16 and fp16)")
    args = p.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    unet = UNetConfig(in_channels=args.channels, image_size=args.image_size, base_channels=args.base_channels,
                      channel_mults=tuple(args.channel_mults), num_res_blocks=args.num_res_blocks)
    model = UNet(unet).to(device)
    diffusion = Diffusion(DiffusionConfig().betas()).to(device)
    precision = resolve_precision(args.precision, device)
    threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
    print(f"device {device}{threads}, {precision}, UNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"params, {args.image_size}x{args.image_size}x{args.channels}, batch {args.batch_size}")

    # Training: one counted (and warm-up) step, then timed steps.
    images = torch.randint(0, 256, (args.batch_size, args.channels, args.image_size, args.image_size),
                           dtype=torch.uint8)
    config = TrainConfig(batch_size=args.batch_size, precision=precision)
    trainer = Trainer(model, diffusion, images, None, config, device)
    idx = torch.arange(args.batch_size, device=device)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(idx)
    flops = counter.get_total_flops()
    step_s = timed(lambda: trainer.train_step(idx), device, args.steps)
    peak = matmul_gflops(device, precision)
    print(f"train        {step_s:.3f} s/step, {args.batch_size / step_s:.1f} images/s")
    print(f"FLOPs/step   {flops / 1e9:.1f} GFLOP (forward + backward) -> {flops / step_s / 1e9:.1f} GFLOP/s")
    print(f"matmul       {peak:.1f} GFLOP/s (2048^3 torch.mm) -> training reaches {flops / step_s / 1e9 / peak:.0%}")

    # Sampling: DDIM vs the same number of bare forwards, both without gradients.
    model.eval()
    x_T = torch.randn(args.sample_batch, args.channels, args.image_size, args.image_size, device=device)
    taus = ddim_timesteps(diffusion.timesteps, args.sample_steps)

    def forwards():
        for tau in reversed(taus):
            model(x_T, torch.full((args.sample_batch,), tau, device=device))

    dtype = AUTOCAST.get(precision)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        forwards()  # warm-up
        raw_s = timed(forwards, device)
        ddim_s = timed(lambda: ddim_sample(model, diffusion, x_T, args.sample_steps), device)
    print(f"DDIM-{args.sample_steps:<6} {ddim_s:.2f} s for {args.sample_batch} images; "
          f"{args.sample_steps} bare forwards {raw_s:.2f} s -> sampler overhead {ddim_s / raw_s - 1:+.1%}")


if __name__ == "__main__":
    main()
