"""Datasets for the prepare stage: real MNIST / Fashion-MNIST / CIFAR-10 and offline "glyphs".

Every loader returns an `ImageData` of uint8 images (N, C, H, W) and int64 labels (N,): (N, 1, 28, 28)
for the MNIST-like sets, (N, 3, 32, 32) for CIFAR-10. Any problem with the data on disk raises
`DataError` with one line naming the offending file or folder.
"""

import gzip
import hashlib
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

DEBIAN_ROOT = Path("/usr/share/datasets")  # `apt-get install dataset-fashion-mnist` lands here

CLASS_NAMES = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer",
                "dog", "frog", "horse", "ship", "truck"),
    "glyphs": tuple(str(d) for d in range(10)),
}
IDX_FILES = {  # split -> (images, labels) file stems, as distributed by LeCun et al.
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
IDX_MAGIC = {0x00000801: 1, 0x00000803: 3}  # uint8 labels (N,), uint8 images (N, H, W)


class DataError(ValueError):
    """A dataset is missing, corrupt or inconsistent; the message names the file or folder, and `argument`
    the argument of `load_images` at fault, if one is (a caller that took it from a config names its key)."""

    def __init__(self, message: str, argument: str | None = None):
        super().__init__(message)
        self.argument = argument


@dataclass(frozen=True)
class ImageData:
    """Images uint8 (N, C, H, W) and labels int64 (N,) of both splits, plus the class names."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: tuple[str, ...]

    def content_hash(self) -> str:
        """Hex sha256 over the dtype, shape and raw bytes of the four tensors."""
        h = hashlib.sha256()
        for t in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


# ---- idx files (MNIST format) ----

def read_idx(path: str | Path) -> torch.Tensor:
    """A uint8 idx file, gzipped (`.gz`) or raw: labels (N,) or images (N, H, W)."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read idx file {path}: {e}") from e
    if len(raw) < 4:
        raise DataError(f"idx file {path} is truncated: {len(raw)} bytes, no header")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic not in IDX_MAGIC:
        raise DataError(f"idx file {path} has magic number 0x{magic:08x}, "
                        "expected 0x00000801 (uint8 labels) or 0x00000803 (uint8 images)")
    ndim = IDX_MAGIC[magic]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"idx file {path} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"idx file {path} holds {len(raw) - header} data bytes, "
                        f"its header {dims} says {expected}")
    return torch.from_numpy(np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy())


def _idx_file(folder: Path, stem: str) -> Path | None:
    """`folder/stem` or `folder/stem.gz`, whichever exists (raw first)."""
    return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)


def _find_idx_files(folder: Path, name: str) -> tuple[dict[str, Path] | None, str]:
    """The four idx files in `folder` (or torchvision's `<folder>/<Name>/raw/`), else why not."""
    stems = [s for pair in IDX_FILES.values() for s in pair]
    for sub in (folder / TORCHVISION_FOLDER[name] / "raw", folder):
        files = {stem: _idx_file(sub, stem) for stem in stems}
        if all(files.values()):
            return files, ""
    if not folder.is_dir():
        return None, "no such folder"
    return None, "missing " + ", ".join(f"{s}[.gz]" for s, p in files.items() if p is None)


def _load_idx(files: dict[str, Path], name: str) -> ImageData:
    """Both splits from the four idx files, images as (N, 1, 28, 28)."""
    splits = []
    for image_stem, label_stem in IDX_FILES.values():
        images, labels = read_idx(files[image_stem]), read_idx(files[label_stem])
        if images.dim() != 3 or labels.dim() != 1:
            raise DataError(f"{files[image_stem]} / {files[label_stem]}: expected images (N, H, W) "
                            f"and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}")
        splits += [images.unsqueeze(1), labels.long()]
        _check_split(splits[-2], splits[-1], len(CLASS_NAMES[name]), files[image_stem])
    return ImageData(*splits, class_names=CLASS_NAMES[name])


def _check_split(images: torch.Tensor, labels: torch.Tensor, num_classes: int, where: Path) -> None:
    """One split has as many labels as images, all below `num_classes`."""
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")
    if len(labels) and int(labels.max()) >= num_classes:
        raise DataError(f"{where}: label {int(labels.max())} outside 0..{num_classes - 1}")


# ---- CIFAR-10 (python pickle batches) ----

def _find_cifar(folder: Path) -> tuple[Path | None, str]:
    """The torchvision root holding `cifar-10-batches-py/` at or above `folder`, else why not."""
    for root in (folder, folder.parent):
        batches = root / "cifar-10-batches-py"
        if all((batches / b).is_file() for b in CIFAR_FILES):
            return root, ""
    if not folder.is_dir():
        return None, "no such folder"
    return None, "no cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta"


def _load_cifar(root: Path) -> ImageData:
    """Both CIFAR-10 splits through torchvision's checksummed reader, images (N, 3, 32, 32)."""
    from torchvision.datasets import CIFAR10

    splits = []
    for train in (True, False):
        try:
            ds = CIFAR10(str(root), train=train, download=False)
        except Exception as e:  # torchvision raises RuntimeError, pickle/OS errors on bad files
            reason = " ".join(str(e).split())
            raise DataError(f"cannot read CIFAR-10 in {root / 'cifar-10-batches-py'}: {reason}") from e
        splits += [torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                   torch.tensor(ds.targets, dtype=torch.int64)]
        _check_split(splits[-2], splits[-1], 10, root / "cifar-10-batches-py")
    return ImageData(*splits, class_names=CLASS_NAMES["cifar10"])


# ---- lookup of the real datasets ----

def _download(name: str, dest: Path) -> None:
    """Let torchvision download `name` into `dest` (needs internet)."""
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    cls(str(dest), train=True, download=True)


def _try_folder(name: str, folder: Path) -> tuple[ImageData | None, str]:
    """The dataset from `folder` if it holds one, else (None, why not)."""
    if name == "cifar10":
        root, why = _find_cifar(folder)
        return (_load_cifar(root), "") if root else (None, why)
    files, why = _find_idx_files(folder, name)
    return (_load_idx(files, name), "") if files else (None, why)


def _fix_hint(name: str, raw_dir: Path | None) -> str:
    """How a user makes dataset `name` available, as the tail of the not-found message."""
    files = "cifar-10-batches-py/" if name == "cifar10" else \
        f"the four idx files ({', '.join(s + '.gz' for p in IDX_FILES.values() for s in p)})"
    put = f"put {files} in {raw_dir / name}/, " if raw_dir is not None else ""
    apt = ", install it with `apt-get install dataset-fashion-mnist`" if name == "fashion_mnist" else ""
    download = ", or run where torchvision can download it" if raw_dir is not None else ""
    return f"fix: {put}point `root` at a folder holding them{apt}{download}"


def _fetch(name: str, folder: Path) -> tuple[ImageData | None, str]:
    """Dataset `name` downloaded by torchvision into `folder`, else (None, why not)."""
    try:
        _download(name, folder)
    except Exception as e:  # noqa: BLE001 -- offline, torchvision fails in many ways; report, don't crash
        return None, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"  # its message spans several lines
    data, why = _try_folder(name, folder)
    return data, f"finished but {why}"


def _load_real(name: str, root: str | Path | None, raw_dir: Path | None) -> ImageData:
    """First source that holds `name`: root, raw_dir/name, the Debian folder, a torchvision download into
    raw_dir/name (without a raw_dir, only root and the Debian folder)."""
    folders = [Path(root)] if root is not None else []
    folders += [raw_dir / name] if raw_dir is not None else []
    folders += [DEBIAN_ROOT / name.replace("_", "-")]
    tried = [] if root is not None else ["root (not set)"]
    for folder in folders:
        data, why = _try_folder(name, folder)
        if data is not None:
            return data
        tried.append(f"{folder}/ ({why})")
    if raw_dir is not None:
        data, why = _fetch(name, raw_dir / name)
        if data is not None:
            return data
        tried.append(f"download into {raw_dir / name}/ ({why})")
    raise DataError(f"dataset {name} not found; tried {'; '.join(tried)}. {_fix_hint(name, raw_dir)}", "root")


def load_dataset(name: str, root: str | Path | None = None, raw_dir: str | Path | None = None,
                 seed: int = 0) -> ImageData:
    """Dataset `name` (mnist, fashion_mnist, cifar10, glyphs) from `root`, `raw_dir`/name, the Debian folder or a
    download into `raw_dir`/name (None: nowhere to download into); `seed` only affects glyphs."""
    if name == "glyphs":
        return make_glyphs(6000, 1000, seed)
    if name not in CLASS_NAMES:
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(CLASS_NAMES)}", "name")
    return _load_real(name, root, Path(raw_dir) if raw_dir is not None else None)


# ---- glyphs: procedurally drawn digits, no download ----

GLYPH_RENDER = 56  # digits are drawn at 2x and box-filtered down to 28x28 for antialiasing


def _glyph_bases() -> list[list[Image.Image]]:
    """bases[digit][thickness]: a centred white digit on black, GLYPH_RENDER² 'L' images."""
    try:
        font = ImageFont.load_default(size=40)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font; it is scaled up below
        font = ImageFont.load_default()
    bases = []
    for digit in range(10):
        canvas = Image.new("L", (200, 200))
        ImageDraw.Draw(canvas).text((50, 50), str(digit), fill=255, font=font)
        glyph = canvas.crop(canvas.getbbox())
        scale = 34 / glyph.height
        glyph = glyph.resize((max(1, round(glyph.width * scale)), 34), Image.BILINEAR)
        base = Image.new("L", (GLYPH_RENDER, GLYPH_RENDER))
        base.paste(glyph, ((GLYPH_RENDER - glyph.width) // 2, (GLYPH_RENDER - glyph.height) // 2))
        bases.append([base] + [base.filter(ImageFilter.MaxFilter(k)) for k in (3, 5)])
    return bases


def _glyph_split(n: int, rng: np.random.Generator, bases) -> tuple[torch.Tensor, torch.Tensor]:
    """n random digits: balanced labels, random scale/rotation/shear/shift/thickness/intensity."""
    labels = rng.permutation(np.arange(n) % 10)
    images = np.empty((n, 1, 28, 28), np.uint8)
    c = GLYPH_RENDER / 2
    for i, digit in enumerate(labels):
        scale, angle, shear = rng.uniform(0.75, 1.2), np.deg2rad(rng.uniform(-15, 15)), rng.uniform(-0.2, 0.2)
        dx, dy = rng.uniform(-5, 5, size=2)
        cos, sin = np.cos(angle), np.sin(angle)
        # PIL maps each output pixel back to its input: in = c + A (out - c - shift).
        a, b, d, e = cos / scale, (sin + shear * cos) / scale, -sin / scale, (cos - shear * sin) / scale
        coeffs = (a, b, c - a * (c + dx) - b * (c + dy), d, e, c - d * (c + dx) - e * (c + dy))
        base = bases[digit][rng.integers(3)]
        img = base.transform(base.size, Image.AFFINE, coeffs, resample=Image.BILINEAR)
        arr = np.asarray(img.resize((28, 28), Image.BOX), dtype=np.float32)
        images[i, 0] = (arr * rng.uniform(0.75, 1.0)).round().astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def make_glyphs(n_train: int, n_test: int, seed: int) -> ImageData:
    """Offline 10-class dataset of drawn digits, (N, 1, 28, 28); identical bytes for the same seed."""
    bases = _glyph_bases()
    train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    return ImageData(*_glyph_split(n_train, train_rng, bases), *_glyph_split(n_test, test_rng, bases),
                     class_names=CLASS_NAMES["glyphs"])


# ---- subsets and statistics ----

def stratified_subset(images: torch.Tensor, labels: torch.Tensor, limit: int | None,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`limit` examples, as equal per class as possible, in their original order. (N, ...) -> (limit, ...).
    None (no limit) or a limit of N or more returns everything."""
    n = len(labels)
    if limit is None or limit >= n:
        return images, labels
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    order = torch.argsort(labels[perm], stable=True)
    idx, lab = perm[order], labels[perm][order]  # shuffled within each class, classes in turn
    counts = torch.bincount(lab)
    rank = torch.arange(n) - (torch.cumsum(counts, 0) - counts)[lab]  # position within own class
    priority = torch.randperm(len(counts), generator=g)  # which classes get the remainder
    chosen = idx[torch.argsort(rank * len(counts) + priority[lab])[:limit]].sort().values
    return images[chosen], labels[chosen]


def floor_subset(images: torch.Tensor, labels: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real train images that are scored as if generated, for the floor of every metric: a class-stratified
    subset of `n`, drawn with seed + 2 (a pipeline draws its train and test subsets with seed and seed + 1)."""
    return stratified_subset(images, labels, n, seed + 2)


def class_histogram(labels: torch.Tensor, num_classes: int) -> list[int]:
    """Count of each label 0..num_classes-1 in `labels` (N,)."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"labels outside 0..{num_classes - 1}")
    return torch.bincount(labels, minlength=num_classes).tolist()
