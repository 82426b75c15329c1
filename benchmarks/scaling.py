"""Images/s of training and of sampling with 1 and with several processes, as the pipeline runs them.

Each process count runs under `torchrun --standalone` (gloo on the CPU, nccl on CUDA): training times the
Trainer's steps at one global batch (DistributedDataParallel, each rank its share of the batch), sampling
times `generate` over each rank's share of the images gathered on rank 0 (stages/pipeline/shard.py), as the
sample stages do. Prints one table. Numbers mean something only on an otherwise idle machine.

    python benchmarks/scaling.py --nproc 1 2 --base-channels 16 --train-steps 20 --samples 64 --ddim-steps 20
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # stages/ from a checkout

from ddpm import Diffusion, DiffusionConfig, TrainConfig, Trainer, UNet, UNetConfig, generate  # noqa: E402
from stages.pipeline.shard import gather, share  # noqa: E402

MARK = "scaling-result "


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    p.add_argument("--batch-size", type=int, default=64, help="global training batch")
    p.add_argument("--train-steps", type=int, default=20, help="timed training steps (after one warm-up step)")
    p.add_argument("--samples", type=int, default=64, help="images sampled, split over the processes")
    p.add_argument("--ddim-steps", type=int, default=20)
    p.add_argument("--base-channels", type=int, default=UNetConfig().base_channels)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return p.parse_args()


def measure(args: argparse.Namespace) -> None:
    """One process of the group; rank 0 prints its measurements as one marked JSON line."""
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.device == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=28, base_channels=args.base_channels)).to(device)
    model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else net
    diffusion = Diffusion(DiffusionConfig().betas()).to(device)
    images = torch.randint(0, 256, (args.batch_size * (args.train_steps + 1), 1, 28, 28), dtype=torch.uint8)
    trainer = Trainer(model, diffusion, images, None, TrainConfig(epochs=1, batch_size=args.batch_size), device,
                      rank=rank, world_size=world_size)
    seconds = []
    trainer.fit(on_step=lambda tr, loss, s: seconds.append(s), progress=False)
    train_rate = args.batch_size * args.train_steps / sum(seconds[1:])  # the first step warms up
    mine = share(args.samples, rank, world_size)
    dist.barrier()
    start = time.perf_counter()
    with torch.no_grad():
        part = generate(net.eval(), diffusion, len(mine), (1, 28, 28), seed=0, steps=args.ddim_steps,
                        batch_size=max(1, len(mine)), first=mine.start)
    gather(part, world_size)
    sample_rate = args.samples / (time.perf_counter() - start)
    if rank == 0:
        print(MARK + json.dumps({"processes": world_size, "threads": torch.get_num_threads(),
                                 "train": train_rate, "sample": sample_rate}), flush=True)
    dist.destroy_process_group()


def main() -> None:
    args = parse_args()
    if "WORLD_SIZE" in os.environ:
        return measure(args)
    worker_args = [f"--batch-size={args.batch_size}", f"--train-steps={args.train_steps}",
                   f"--samples={args.samples}", f"--ddim-steps={args.ddim_steps}",
                   f"--base-channels={args.base_channels}", f"--device={args.device}"]  # not --nproc: torchrun's
    rows = []
    for n in args.nproc:
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                              __file__, *worker_args], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(next(line for line in out.splitlines() if line.startswith(MARK))[len(MARK):]))
    print(f"UNet base_channels {args.base_channels}, 28x28x1, {args.device}, {os.cpu_count()} CPU cores; training: "
          f"global batch {args.batch_size}, {args.train_steps} steps; sampling: {args.samples} images, "
          f"DDIM {args.ddim_steps} steps")
    print(f"{'processes':>9} {'threads':>7} {'train img/s':>12} {'sample img/s':>13} {'train x':>8} {'sample x':>9}")
    for r in rows:
        print(f"{r['processes']:>9} {r['threads']:>7} {r['train']:>12.1f} {r['sample']:>13.1f} "
              f"{r['train'] / rows[0]['train']:>8.2f} {r['sample'] / rows[0]['sample']:>9.2f}")


if __name__ == "__main__":
    main()
