"""Writing a file or a folder whole or not at all: it is written to a temporary beside its target (so on the
same filesystem), synced to disk, then renamed over the target in one step. A crash or a kill mid-write leaves
the previous version intact and, at worst, a hidden temporary (`.NAME.tmpPID...`) that the next write of the
same folder removes.

A full disk (or quota) while writing is always one `OSError(ENOSPC or EDQUOT)` naming the target, whatever
the writer raised: torch.save wraps the OSError in a RuntimeError, safetensors in an error of its own, and
a SQLite database says "database or disk is full".
"""

import contextlib
import errno
import os
import shutil
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)
# How an error that wraps one says so: the C library's words for each, and SQLite's (SQLITE_FULL)
WORDS = [(errno.ENOSPC, os.strerror(errno.ENOSPC)), (errno.EDQUOT, os.strerror(errno.EDQUOT)),
         (errno.ENOSPC, "database or disk is full")]


def disk_full(error: BaseException | None) -> OSError | None:
    """An OSError(ENOSPC or EDQUOT) naming the file that `error` names, if any, when `error`, or an error it was
    raised from or while handling, says the disk or quota is full; None otherwise."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = error.errno if isinstance(error, OSError) and error.errno in FULL else None
        code = code or next((c for c, words in WORDS if words in str(error)), None)
        if code:
            filename = error.filename if isinstance(error, OSError) else None
            return OSError(code, os.strerror(code), None if filename is None else str(filename))
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def full_disk_named(temporaries: dict[Path, Path]):
    """Re-raise a full disk inside the block (`disk_full`) as one OSError that names the target, not its
    temporary: for each {temporary: target} in `temporaries`, a file in or at the temporary is named in or at
    the target; a full disk that names no file names the one target, if there is one."""
    try:
        yield
    except Exception as e:
        if (full := disk_full(e)) is None:
            raise
        name = Path(full.filename) if full.filename else None
        if name is None and len(temporaries) == 1:
            name = Path(next(iter(temporaries)))  # the one temporary, named as its target below
        for tmp, target in temporaries.items():
            if name is not None and (name == Path(tmp) or Path(tmp) in name.parents):
                name = Path(target) / name.relative_to(tmp)
                break
        raise OSError(full.errno, full.strerror, None if name is None else str(name)) from None


@contextlib.contextmanager
def atomic_write(path: str | Path):
    """Yield a temporary path beside `path` (same suffix) to write to; on success it is synced to disk
    and renamed over `path`, on failure removed: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        with full_disk_named({tmp: path}):
            yield tmp
            _fsync(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """`text` as the file `path`, through `atomic_write`."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder beside `path`; on success its files are synced to disk and it replaces `path`
    (`move_into_place`), on failure it is removed with the folders made to hold it, so a failure never leaves a
    partial folder. Temporaries that a killed run left beside `path` are removed first."""
    path = Path(path)
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]  # deepest first
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, f".{path.name}.tmp")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.mkdir()
    try:
        with full_disk_named({tmp: path}):
            yield tmp
            for file in (f for f in tmp.rglob("*") if f.is_file()):
                _fsync(file)
            move_into_place(tmp, path)
        made = []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:
            with contextlib.suppress(OSError):  # not empty: something else was written there meanwhile
                folder.rmdir()


def move_into_place(tmp: str | Path, path: str | Path) -> None:
    """Rename the file or folder `tmp` over `path` (a folder already there is removed first)."""
    if Path(path).is_dir() and not Path(path).is_symlink():
        shutil.rmtree(path)
    os.replace(tmp, path)


def remove_stale(folder: str | Path, prefix: str) -> None:
    """Remove the temporaries named `prefix`<pid>... in `folder` that a killed run left (this process's too)."""
    for stale in Path(folder).glob(f"{prefix}[0-9]*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
