"""Bring-your-own images: a folder of image files, class subsets, and resizing / channel conversion.

A folder holds either image files directly (unlabelled: unconditional training only) or one
subfolder per class. It may also hold `train/` and `test/` subfolders laid out either way; otherwise
a class-stratified TEST_FRACTION of the images is held out as the test split. Every image is
center-cropped to a square, resized to `image_size` and converted to RGB or grayscale once, at
prepare time, so training never decodes images again. A file that cannot be decoded is refused
with its name, and so is an image name that leads to no regular file (a looping or dangling symbolic
link) and an image whose header claims more than PIL's Image.MAX_IMAGE_PIXELS: a dataset silently
missing some files would not be reproducible.
"""

import stat
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .data import DataError, ImageData, load_dataset, stratified_subset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TEST_FRACTION = 0.1


def _visible(folder: Path) -> list[Path]:
    """The entries of `folder`, sorted, without hidden ones (.DS_Store, .ipynb_checkpoints, ...)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _images(entries: list[Path]) -> list[Path]:
    """The image files among `entries` (subfolders aside); an image name that does not lead to a regular
    file (a looping or dangling symbolic link, a pipe) is refused like an undecodable image."""
    found = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()]
    for p in found:
        try:
            mode = p.stat().st_mode
        except OSError as e:
            raise DataError(f"cannot read image {p}: {e.strerror}") from None
        if not stat.S_ISREG(mode):
            raise DataError(f"cannot read image {p}: not a regular file")
    return found


def _scan(folder: Path) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """(files, labels, class names) of one folder: class subfolders, or images with no classes."""
    entries = _visible(folder)
    classes = [p for p in entries if p.is_dir()]
    if not classes:
        files = _images(entries)
        return files, [0] * len(files), ()
    stray = [p.name for p in _images(entries)]
    if stray:
        raise DataError(f"{folder}: holds class subfolders and also images outside them ({stray[0]}, ...); "
                        "move every image into its class folder")
    files, labels = [], []
    for label, sub in enumerate(classes):
        found = _images(_visible(sub))
        if not found:
            raise DataError(f"class folder {sub} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += found
        labels += [label] * len(found)
    return files, labels, tuple(p.name for p in classes)


def _read(path: Path, size: int, channels: int) -> np.ndarray:
    """One image file -> uint8 (channels, size, size): center-cropped to a square, then resized.

    An image larger than PIL's Image.MAX_IMAGE_PIXELS is refused before it is decoded (PIL itself
    only warns below twice that): its header may claim far more pixels than memory holds."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = ImageOps.exif_transpose(img).convert("RGB" if channels == 3 else "L")
                img = ImageOps.fit(img, (size, size), Image.BICUBIC)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _load_split(folder: Path, size: int, channels: int):
    files, labels, names = _scan(folder)
    if not files:
        raise DataError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    images = np.stack([_read(f, size, channels) for f in files])
    return torch.from_numpy(images), torch.tensor(labels, dtype=torch.int64), names


def load_image_folder(root: str | Path, image_size: int, channels: int = 3, seed: int = 0) -> ImageData:
    """Images of `root` as uint8 (N, channels, image_size, image_size); see the module docstring."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist", "root")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_x, train_y, names = _load_split(root / "train", image_size, channels)
        test_x, test_y, test_names = _load_split(root / "test", image_size, channels)
        if test_names != names:
            raise DataError(f"{root / 'test'}: classes {list(test_names)} differ from {root / 'train'}'s {list(names)}")
        return ImageData(train_x, train_y, test_x, test_y, class_names=names)
    images, labels, names = _load_split(root, image_size, channels)
    if len(images) < 2:
        raise DataError(f"{root}: {len(images)} image; need at least 2 to hold some out for testing")
    n_test = max(1, round(TEST_FRACTION * len(images)))
    test_idx, _ = stratified_subset(torch.arange(len(images)), labels, n_test, seed)
    is_test = torch.zeros(len(images), dtype=torch.bool)
    is_test[test_idx] = True
    return ImageData(images[~is_test], labels[~is_test], images[is_test], labels[is_test], class_names=names)


def select_classes(data: ImageData, classes: list[str | int]) -> ImageData:
    """Keep the listed classes (names or indices), relabelled 0..K-1 in the order given."""
    picked = []
    for c in classes:
        if isinstance(c, str) and c in data.class_names:
            picked.append(data.class_names.index(c))
        elif isinstance(c, int) and 0 <= c < len(data.class_names):
            picked.append(c)
        else:
            names = ", ".join(data.class_names) or "none (unlabelled)"
            raise DataError(f"{c!r} is not a class of this dataset; classes: {names} "
                            f"or indices 0..{len(data.class_names) - 1}", "classes")
    if len(set(picked)) != len(picked):
        raise DataError(f"{list(classes)} names a class twice", "classes")
    relabel = torch.full((len(data.class_names),), -1, dtype=torch.int64)
    relabel[picked] = torch.arange(len(picked))

    def keep(images: torch.Tensor, labels: torch.Tensor):
        new = relabel[labels]
        return images[new >= 0], new[new >= 0]

    return ImageData(*keep(data.train_images, data.train_labels), *keep(data.test_images, data.test_labels),
                     class_names=tuple(data.class_names[i] for i in picked))


def convert(images: torch.Tensor, image_size: int | None = None, channels: int | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, channels, image_size, image_size); None keeps that dimension.

    Grayscale becomes RGB by repetition, RGB grayscale by ITU-R 601 luma; sizes change by antialiased
    bilinear resizing of the center square."""
    if channels is not None and channels != images.shape[1]:
        if channels == 3:
            images = images.expand(-1, 3, -1, -1)
        else:
            luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * luma).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    h, w = images.shape[-2:]
    if image_size is not None and (h, w) != (image_size, image_size):
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        square = images[..., top:top + s, left:left + s]
        images = torch.cat([_resize(chunk, image_size) for chunk in square.split(4096)])
    return images.contiguous()


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, S, S) -> uint8 (N, C, size, size), antialiased bilinear."""
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def load_images(name: str, *, root: str | Path | None = None, raw_dir: str | Path | None = None,
                classes: list[str | int] | None = None, image_size: int | None = None, channels: int | None = None,
                seed: int = 0) -> ImageData:
    """A dataset by name (`load_dataset`, which looks in and downloads into `raw_dir`) or, for "imagefolder",
    the folder `root` (default size 32 px, RGB), keeping only `classes` (relabelled 0..K-1) at `image_size` px
    and `channels` (None: as stored)."""
    if name == "imagefolder":
        data = load_image_folder(root, image_size or 32, channels or 3, seed)
    else:
        data = load_dataset(name, root=root, raw_dir=raw_dir, seed=seed)
    if classes is not None:
        data = select_classes(data, list(classes))
    return ImageData(convert(data.train_images, image_size, channels), data.train_labels,
                     convert(data.test_images, image_size, channels), data.test_labels, class_names=data.class_names)
