"""The pipeline's files: every output written atomically (a temporary beside it, then one rename), and
the prepared data read back."""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ddpm import safe_load
from ddpm.checkpoint import atomic_write
from ddpm.data import DataError, ImageData
from ddpm.images import load_images
from ddpm.pictures import grid_image


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename,
    on failure it is removed (with the folders made to hold it), so a failed stage never leaves a partial
    output."""
    path = Path(path)
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]  # deepest first
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        made = []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:
            with contextlib.suppress(OSError):  # not empty: something else was written there meanwhile
                folder.rmdir()


@contextlib.contextmanager
def staged_files(paths, prefix: str):
    """Yield {path: a temporary path with the same name, in a hidden folder `prefix`.tmp<pid> beside it}; when
    the block succeeds, move each into place in the order of `paths` (a stage's outputs appear together, the
    metrics last); whatever happens, remove the temporaries."""
    folders = {Path(p).parent / f"{prefix}.tmp{os.getpid()}" for p in paths}
    for folder in folders:
        for stale in folder.parent.glob(f"{prefix}.tmp*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        folder.mkdir(parents=True)
    tmp = {p: Path(p).parent / f"{prefix}.tmp{os.getpid()}" / Path(p).name for p in paths}
    try:
        yield tmp
        for p in paths:
            os.replace(tmp[p], p)
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def file_hash(path: str | Path) -> str:
    """The hex sha256 of a file's bytes: which model file a version, a sample set or a fine-tuning started from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    """Save uint8 images (N, C, H, W) as one PNG grid."""
    with atomic_write(path) as tmp:
        grid_image(images, nrow or max(1, int(len(images) ** 0.5))).save(tmp)


def save_figure(fig, path: str | Path) -> None:
    """Save a matplotlib figure as PNG."""
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=120)


def load_info(folder: str | Path) -> dict:
    """info.json of the prepared data (counts, shape, class names, content hash)."""
    path = Path(folder) / "info.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; run the prepare stage first (dvc repro prepare)")
    return json.loads(path.read_text())


def class_names(info: dict, needed_by: str) -> list[str]:
    """The prepared data's class names; `needed_by` (conditional training, the classifier) needs two or more."""
    names = info["class_names"]
    if len(names) < 2:
        have = f"only class {names[0]!r}" if names else "no classes (an image folder without class subfolders)"
        raise DataError(f"{needed_by} needs at least 2 classes but the prepared data has {have}; "
                        "use class subfolders or data.classes, or run only the unconditional stages "
                        "(dvc repro sample-ddpm@uncond sample-ddim@uncond sample-dpmsolver@uncond)")
    return names


def load_prepared(folder: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(images uint8 (N, C, H, W), labels int64 (N,), info) of a split written by the prepare stage."""
    info = load_info(folder)
    data = safe_load(Path(folder) / f"{split}.pt", ("images", "labels"))
    return data["images"], data["labels"], info


def load_data(p) -> ImageData:
    """The dataset that params `p` name (the data section, seeded by `seed`); an error about one of
    load_images' arguments names its key (data.classes, data.root, ...)."""
    d = p.data
    try:
        return load_images(d.name, root=d.root, classes=d.classes, image_size=d.image_size, channels=d.channels,
                           seed=p.seed)
    except DataError as e:
        raise DataError(f"data.{e.argument}: {e}" if e.argument else str(e)) from None


def why_unwritable(path: Path) -> str | None:
    """Why `path` cannot be written (stages.pipeline.run.check_writable), or None if it can."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    for folder in [parent] + ([path] if path.is_dir() else []):
        if not folder.is_dir():
            return f"{folder} is not a folder"
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            return f"{folder} is not writable ({e.strerror})"
    return None
