"""Training images/s with 1 and with several data-parallel processes, as `train.nproc` runs them.

Each process count runs under `torchrun --standalone` (DistributedDataParallel, gloo on the CPU, nccl on
CUDA) and times the Trainer's own steps, like the train stage's `images_per_second`. The global batch
stays the same, so the numbers compare directly. torchrun gives each of several CPU processes one
thread (OMP_NUM_THREADS=1); a single process keeps torch's default.

    python benchmarks/ddp_throughput.py --nproc 1 2 --base-channels 16 --steps 20
"""

import argparse
import os
import subprocess
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ddpm import Diffusion, DiffusionConfig, TrainConfig, Trainer, UNet, UNetConfig


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after one warm-up step)")
    p.add_argument("--base-channels", type=int, default=UNetConfig().base_channels)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return p.parse_args()


def measure(args: argparse.Namespace) -> None:
    """One process of the group: train steps on random 28x28 images; rank 0 prints images/s."""
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.device == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=28, base_channels=args.base_channels)).to(device)
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    images = torch.randint(0, 256, (args.batch_size * (args.steps + 1), 1, 28, 28), dtype=torch.uint8)
    trainer = Trainer(model, Diffusion(DiffusionConfig().betas()), images, None,
                      TrainConfig(epochs=1, batch_size=args.batch_size), device, rank=rank, world_size=world_size)
    seconds = []
    trainer.fit(on_step=lambda tr, loss, s: seconds.append(s), progress=False)
    if rank == 0:
        rate = args.batch_size * args.steps / sum(seconds[1:])  # the first step warms up
        print(f"{world_size} process(es) x {torch.get_num_threads()} thread(s): {rate:.1f} images/s "
              f"({sum(seconds[1:]) / args.steps:.3f} s per step of {args.batch_size} images)", flush=True)
    dist.destroy_process_group()


def main() -> None:
    args = parse_args()
    if "WORLD_SIZE" in os.environ:
        return measure(args)
    print(f"UNet base_channels {args.base_channels}, 28x28x1, global batch {args.batch_size}, {args.steps} steps, "
          f"{args.device}, {os.cpu_count()} CPU cores", flush=True)
    worker_args = [f"--batch-size={args.batch_size}", f"--steps={args.steps}",
                   f"--base-channels={args.base_channels}", f"--device={args.device}"]  # not --nproc: torchrun's
    for n in args.nproc:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                        __file__, *worker_args], check=True)


if __name__ == "__main__":
    main()
