"""Split MNIST's test files into a small MNIST-format dataset: four idx files that `data.root` can point at.

Where only the official test split (t10k, 10,000 digits) is at hand, its first --train images become the
train split and the rest the test split, written as MNIST's own file names, so the budget benchmark and the
pipeline read them through the real MNIST loading path:

    python -m benchmarks.mnist_split ../shared/data/mnist-t10k data/raw/mnist-t10k-split
    python -m benchmarks.budget --minutes 25 -S data.name=mnist -S data.root=data/raw/mnist-t10k-split ...
"""

import argparse
import gzip
import struct
from pathlib import Path

import torch

from ddpm.data import class_histogram, read_idx
from ddpm.files import atomic_write
from stages.pipeline.run import run


def write_idx(path: Path, array: torch.Tensor) -> None:
    """A uint8 tensor as a gzipped idx file (magic 0x08 0x<ndim>, big-endian dims, then the bytes)."""
    raw = struct.pack(f">I{array.ndim}I", 0x800 + array.ndim, *array.shape) + array.to(torch.uint8).numpy().tobytes()
    with atomic_write(path) as tmp:
        tmp.write_bytes(gzip.compress(raw))


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="folder with t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
    ap.add_argument("out", type=Path, help="folder for the four idx files")
    ap.add_argument("--train", type=int, default=8000, help="images for the train split; the rest is the test split")
    args = ap.parse_args(argv)
    images = read_idx(args.source / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(args.source / "t10k-labels-idx1-ubyte.gz")
    if not 0 < args.train < len(images):
        raise SystemExit(f"--train must be in [1, {len(images) - 1}], got {args.train}")
    args.out.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", slice(0, args.train)), ("t10k", slice(args.train, None))):
        write_idx(args.out / f"{split}-images-idx3-ubyte.gz", images[part])
        write_idx(args.out / f"{split}-labels-idx1-ubyte.gz", labels[part])
        print(f"{split}: {len(labels[part])} images, per class {class_histogram(labels[part].long(), 10)}")


if __name__ == "__main__":
    run(main)
