"""The pipeline's files: every output written atomically (`ddpm.files`: a temporary beside it, then one
rename), a stage's outputs put in place together (`staged_files`), and the prepared data read back."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import torch

from ddpm import safe_load
from ddpm.data import DataError, ImageData
from ddpm.files import atomic_dir, atomic_write, full_disk_named, move_into_place, remove_stale, write_text  # noqa: F401
from ddpm.images import load_images
from ddpm.pictures import grid_image

RAW_DIR = Path("data/raw")  # where the prepare stage looks for a dataset, and downloads it, when data.root is unset


@contextlib.contextmanager
def staged_files(paths, prefix: str):
    """Yield {path: a temporary path with the same name, in a hidden folder `prefix`.tmp<pid> beside it} to
    write each output (a file or a folder) to; when the block succeeds, move each into place in the order of
    `paths` (a stage's outputs appear together, the metrics last), with SIGTERM and Ctrl-C held back until all
    are moved; whatever happens, remove the temporaries. Those a killed run left go first."""
    folders = {Path(p).parent / f"{prefix}.tmp{os.getpid()}" for p in paths}
    for folder in folders:
        remove_stale(folder.parent, f"{prefix}.tmp")
        folder.mkdir(parents=True)
    tmp = {p: Path(p).parent / f"{prefix}.tmp{os.getpid()}" / Path(p).name for p in paths}
    try:
        with full_disk_named({t: p for p, t in tmp.items()}):
            yield tmp
        with signals_held():
            for p in paths:
                move_into_place(tmp[p], p)
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def signals_held(signums=(signal.SIGTERM, signal.SIGINT)):
    """Hold back `signums` during the block (in the main thread; elsewhere nothing is held), then act on the
    first that arrived, as it would have: a group of renames is not split by a stop request."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived = []
    saved = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in signums}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        if arrived:
            signal.raise_signal(arrived[0])


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


def load_prepared(folder: str | Path, split: str, mmap: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(images uint8 (N, C, H, W), labels int64 (N,), info) of a split written by the prepare stage; `mmap`:
    memory-mapped, so that each process reads only the images it indexes."""
    info = load_info(folder)
    data = safe_load(Path(folder) / f"{split}.pt", ("images", "labels"), mmap=mmap)
    return data["images"], data["labels"], info


def load_data(p) -> ImageData:
    """The dataset that params `p` name (the data section, seeded by `seed`); an error about one of
    load_images' arguments names its key (data.classes, data.root, ...)."""
    d = p.data
    try:
        return load_images(d.name, root=d.root, raw_dir=RAW_DIR, classes=d.classes, image_size=d.image_size,
                           channels=d.channels, seed=p.seed)
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
