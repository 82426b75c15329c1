"""What this machine can hold and run: upper bounds on the params that allocate (image counts, batch sizes,
the data's size) and the device params.yaml names. Checked with the other params (params._checks), so an
absurd value stops every stage in one line before any work, not after an epoch or past all memory.

The memory estimates are rough lower bounds (uint8 images, float32 feature maps of the networks' main
blocks): they catch absurd values, never a value that would have fit.
"""

import math
import os

import torch

MAX_PICTURE = 10_000  # images in one grid or picture: pictures are for people to look at
KNOWN = {"mnist": (1, 28, 70_000), "fashion_mnist": (1, 28, 70_000), "glyphs": (1, 28, 7_000),
         "cifar10": (3, 32, 60_000)}  # channels, size, train + test images (prepare holds all of them)
NUM_CLASSES = 10  # of each known dataset
INCEPTION_INPUT = 3 * 299 * 299 * 4  # one image resized for Inception-v3, float32


def ram() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _cuda_index(device: str) -> int | None:
    """The CUDA device that `device` puts the networks on, or None (the CPU or MPS, whose memory is RAM)."""
    kind, _, index = device.partition(":")
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        return int(index or 0)
    return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.0f} GB" if n >= 1e10 else f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def _round_down(n: int) -> int:
    """`n` to two significant digits, rounded down: a limit people can read."""
    k = 10 ** max(0, len(str(n)) - 2)
    return n // k * k


def image_shape(p) -> tuple[int, int]:
    """(channels, size) of the prepared images: the dataset's own unless data.channels/image_size set them."""
    c, s, _ = KNOWN.get(p.data.name, (3, 32, 0))  # an image folder: 3 x 32 x 32 unless set
    return p.data.channels or c, p.data.image_size or s


def unet_bytes(p, training: bool) -> int:
    """Activations per image of the UNet (rough lower bound): a c x s x s feature map per res block and level,
    down and up, in float32; training keeps about six per block for the backward pass (16-bit ones when
    train.precision may be 16-bit)."""
    _, size = image_shape(p)
    side, maps = math.ceil(size / p.model.patch_size), 0
    for m in p.model.channel_mults or ((1, 2, 2) if size <= 32 else (1, 2, 2, 2)):
        maps += p.model.base_channels * m * side * side
        side = (side + 1) // 2
    per_map = ((2 if p.train.precision in ("bf16", "fp16", "auto") else 4) * 6) if training else 4
    return maps * (2 * p.model.num_res_blocks + 1) * per_map


def classifier_bytes(p, training: bool) -> int:
    """Float32 activations per image of the domain classifier (rough lower bound): its three conv stages,
    two conv-bn-relu layers each; training keeps about four maps per layer."""
    c, size = image_shape(p)
    w = p.classifier.width
    maps = 2 * sum(w * 2 ** i * (size // 2 ** i) ** 2 for i in range(3))
    return 4 * maps * (4 if training else 1)


def _fits(key: str, n: int, each: int, what: str, memory: int, where: str):
    """(key, ok, allowed, problem): `n` things of `each` bytes fit in `memory`."""
    need = n * each
    return (key, need <= memory, f"at most {_round_down(memory // max(1, each))}",
            f"needs about {_gb(need)} for {what}; {where} has {_gb(memory)}")


def _picture(key: str, n: int, per: int, what: str):
    """(key, ok, allowed, problem): `n` x `per` images in one picture stay under MAX_PICTURE."""
    return (key, n * per <= MAX_PICTURE, f"at most {MAX_PICTURE // per}",
            f"makes {what} of {n * per} images; pictures hold at most {MAX_PICTURE}")


def size_checks(p) -> list:
    """Every size that allocates, against what this machine (or its GPU) holds."""
    s, t, v = p.sample, p.train, p.visualize
    c, size = image_shape(p)
    host = ram()
    gpu = _cuda_index(p.device)
    dev, where = (torch.cuda.get_device_properties(gpu).total_memory, f"cuda:{gpu}") if gpu is not None and (
        gpu < torch.cuda.device_count()) else (host, "this machine")
    per_process = t.batch_size // t.nproc if gpu is not None else t.batch_size  # on the CPU they share RAM
    count = KNOWN.get(p.data.name, (0, 0, 0))[2]  # unknown for an image folder
    k = len(p.data.classes) if p.data.classes else NUM_CLASSES if p.data.name in KNOWN else 1
    evaluate = classifier_bytes(p, False) + (INCEPTION_INPUT if "inception" in p.evaluate.extractors else 0)
    return [
        ("data.image_size", count * c * size * size <= host, f"at most {math.isqrt(host // max(1, count * c))}",
         f"needs about {_gb(count * c * size * size)} for {count} images of {c} x {size} x {size}; this machine "
         f"has {_gb(host)}"),
        _fits("sample.num_samples", s.num_samples, c * size * size, "its images", host, "this machine"),
        _fits("sample.batch_size", s.batch_size, unet_bytes(p, False), "the UNet's activations (an estimate)",
              dev, where),
        _picture("sample.grid_size", s.grid_size, 1, "a grid"),
        _fits("train.batch_size", per_process, unet_bytes(p, True), "the UNet's activations in training "
              "(an estimate)", dev, where),
        _picture("train.grid_size", t.grid_size, 1, "a grid"),
        _fits("train.grid_size", t.grid_size, unet_bytes(p, False), "the UNet's activations (an estimate)", dev,
              where),
        _fits("evaluate.batch_size", p.evaluate.batch_size, evaluate, "the feature extractors' activations "
              "(an estimate)", dev, where),
        _fits("classifier.batch_size", p.classifier.batch_size, classifier_bytes(p, True),
              "the classifier's activations in training (an estimate)", dev, where),
        _picture("visualize.per_class", v.per_class, k, f"a class grid of {k} classes"),
        _picture("visualize.num_images", v.num_images, 2 * 2, "a reverse-process picture (2 rows per image, "
                 "2 frames or more)"),
        _picture("visualize.frames", v.frames, 2 * v.num_images, f"a reverse-process picture ({2 * v.num_images} "
                 "rows)"),
    ]


def device_checks(p) -> list:
    """The device exists here, and there is a GPU for every training process that wants one."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    names = ["auto", "cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(gpus)] if gpus else []) + (["mps"] * mps)
    kind, _, index = p.device.partition(":")
    exists = (kind in ("auto", "cpu") or kind == "mps" and mps
              or kind == "cuda" and gpus > 0 and (not index or index.isdigit() and int(index) < gpus))
    on_gpus = kind == "cuda" or kind == "auto" and gpus > 0
    have = f"{gpus} CUDA device{'s' * (gpus != 1)}"
    return [
        ("device", exists, "one of " + ", ".join(names), f"is not a device of this machine ({have})"),
        ("train.nproc", not on_gpus or p.train.nproc <= gpus, f"at most {gpus}, or device cpu",
         f"needs a GPU per process with device {p.device}; this machine has {have}"),
    ]
