"""What this machine can hold and run: upper bounds on the params that allocate (image counts, batch sizes,
the data's size, the schedule's timesteps, the network's weights) and the device params.yaml names. Checked with
the other params (params._checks), so an absurd value stops every stage in one line before any work, not after an
epoch or past all memory.

The memory estimates are rough lower bounds (uint8 images, float32 feature maps of the networks' main
blocks, the schedule's buffers, the weights' float32 copies that training keeps): they catch absurd values, never
a value that would have fit. The network's parameters are counted exactly, from a network built on PyTorch's meta
device (no storage).
"""

import dataclasses
import math

import torch

from ddpm import UNetConfig
from ddpm.diffusion import SCHEDULE_BYTES
from ddpm.model_config import machine_memory, parameter_count
from ddpm.unet import default_channel_mults

MAX_PICTURE = 10_000  # images in one grid or picture: pictures are for people to look at
KNOWN = {"mnist": (1, 28, 70_000), "fashion_mnist": (1, 28, 70_000), "glyphs": (1, 28, 7_000),
         "cifar10": (3, 32, 60_000)}  # channels, size, train + test images (prepare holds all of them)
NUM_CLASSES = 10  # of each known dataset
INCEPTION_INPUT = 3 * 299 * 299 * 4  # one image resized for Inception-v3, float32


def ram() -> int:
    """This machine's physical memory in bytes."""
    return machine_memory()


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
    for m in p.model.channel_mults or default_channel_mults(size):
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


def weight_copies(p) -> int:
    """The float32 copies of the network's weights that training keeps: the weights, their gradients, AdamW's
    two moments, the EMA weights, the guide model's when train_uncond.guide_at keeps one, and one per post-hoc
    EMA width (train.posthoc_sigma_rels; its snapshots go to host memory)."""
    return 5 + (p.train_uncond.guide_at > 0) + len(p.train.posthoc_sigma_rels)


def parameters(p, base_channels: int | None = None) -> int | None:
    """The parameters of the largest network params.yaml trains (the conditional one, with its class embedding),
    at `base_channels` (model.base_channels by default); None where the image size does not fit the patch size
    (the train stage names that)."""
    c, size = image_shape(p)
    fields = dataclasses.asdict(p.model) | ({} if base_channels is None else {"base_channels": base_channels})
    try:
        return parameter_count(UNetConfig.for_images(c, size, _classes(p), **fields))
    except ValueError:
        return None


def _largest_base_channels(p, limit: int) -> int:
    """The largest model.base_channels whose network has at most `limit` parameters. The count is a quadratic in
    base_channels (each layer maps channels to channels, plus biases and norms), here fitted through 1, 2, 3."""
    n1, n2, n3 = (parameters(p, b) for b in (1, 2, 3))
    a = (n3 - 2 * n2 + n1) / 2
    b = n2 - n1 - 3 * a
    c = n1 - a - b
    if a <= 0 or c > limit:
        return 0
    return int((-b + math.sqrt(b * b - 4 * a * (c - limit))) / (2 * a))


def _weights_fit(p, memory: int, where: str, processes: int):
    """(key, ok, allowed, problem): the weights' copies in training, of every process that shares `memory`."""
    n = parameters(p)
    if n is None:
        return ("model.base_channels", True, "")
    each = 4 * weight_copies(p) * processes
    if n * each <= memory:
        return ("model.base_channels", True, "")
    return ("model.base_channels", False, f"at most {_round_down(_largest_base_channels(p, memory // each))}",
            f"needs about {_gb(n * each)} for the network's weights in training ({n:.2g} parameters, "
            f"{weight_copies(p)} float32 copies: weights, gradients, AdamW's two moments, EMA"
            f"{', guide' if p.train_uncond.guide_at > 0 else ''}"
            f"{', post-hoc EMAs' if p.train.posthoc_sigma_rels else ''}"
            f"{f'; {processes} processes' if processes > 1 else ''}); "
            f"{where} has {_gb(memory)}")


def _classes(p) -> int:
    """The conditional model's classes: data.classes, or the known dataset's (an image folder's: unknown until
    prepared, taken as 1)."""
    return len(p.data.classes) if p.data.classes else NUM_CLASSES if p.data.name in KNOWN else 1


def _fits(key: str, n: int, each: int, what: str, memory: int, where: str):
    """(key, ok, allowed, problem): `n` things of `each` bytes fit in `memory`."""
    need = n * each
    return (key, need <= memory, f"at most {_round_down(memory // max(1, each))}",
            f"needs about {_gb(need)} for {what}; {where} has {_gb(memory)}")


def _picture(key: str, n: int, per: int, what: str):
    """(key, ok, allowed, problem): `n` x `per` images in one picture stay under MAX_PICTURE."""
    return (key, n * per <= MAX_PICTURE, f"at most {MAX_PICTURE // per}",
            f"makes {what} of {n * per} images; pictures hold at most {MAX_PICTURE}")


def size_checks(p):
    """Every size that allocates, against what this machine (or its GPU) holds. The weights come last, counted
    only once the activations fit (a network built on the meta device still takes time per layer)."""
    s, t, v = p.sample, p.train, p.visualize
    c, size = image_shape(p)
    host = ram()
    gpu = _cuda_index(p.device)
    dev, where = (torch.cuda.get_device_properties(gpu).total_memory, f"cuda:{gpu}") if gpu is not None and (
        gpu < torch.cuda.device_count()) else (host, "this machine")
    # what one backward pass holds: on the CPU the processes share RAM
    per_process = (t.batch_size // t.nproc if gpu is not None else t.batch_size) // t.micro_batches
    count = KNOWN.get(p.data.name, (0, 0, 0))[2]  # unknown for an image folder
    k = _classes(p)
    evaluate = classifier_bytes(p, False) + (INCEPTION_INPUT if "inception" in p.evaluate.extractors else 0)
    yield from [
        ("data.image_size", count * c * size * size <= host, f"at most {math.isqrt(host // max(1, count * c))}",
         f"needs about {_gb(count * c * size * size)} for {count} images of {c} x {size} x {size}; this machine "
         f"has {_gb(host)}"),
        _fits("sample.num_samples", s.num_samples, c * size * size, "its images", host, "this machine"),
        _fits("sample.batch_size", s.batch_size or 1, unet_bytes(p, False), "the UNet's activations (an estimate)",
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
        _fits("diffusion.timesteps", p.diffusion.timesteps, SCHEDULE_BYTES, "the diffusion schedule", host,
              "this machine"),
    ]
    yield _weights_fit(p, dev, where, 1) if gpu is not None else _weights_fit(p, host, where, t.nproc)


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


CPU_SAMPLE_BATCH = 250  # images per sampling batch off a GPU: the value measured on 2 cores before it was automatic
MAX_SAMPLE_BATCH = 4096
PROBE = 8  # images of the one forward pass that measures a CUDA device's memory per image


def sample_batch_size(model, device: torch.device, num: int, guided: bool) -> int:
    """Images per sampling batch when sample.batch_size is null: on a CUDA GPU as many as half its free memory
    holds, at the peak memory per image of one forward pass of PROBE images (twice that when guided:
    classifier-free guidance runs both predictions in one batch); elsewhere CPU_SAMPLE_BATCH. At most `num`.
    The images do not depend on it (per-image noise), so it may differ from machine to machine."""
    if device.type != "cuda":
        return max(1, min(num, CPU_SAMPLE_BATCH))
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    labels = torch.zeros(PROBE, dtype=torch.long, device=device) if model.config.num_classes else None
    with torch.no_grad():
        model(torch.zeros(PROBE, *model.config.sample_shape, device=device),
              torch.zeros(PROBE, dtype=torch.long, device=device), labels)
    per_image = (torch.cuda.max_memory_allocated(device) - before) / PROBE * (2 if guided else 1)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(num, MAX_SAMPLE_BATCH, int(free / 2 / max(per_image, 1))))
