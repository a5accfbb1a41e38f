"""Files and folders that appear whole or not at all: written under a hidden temporary name beside
their final place (the same filesystem, so the rename is atomic), flushed to disk, then renamed.
A failure before the rename deletes the temporary and leaves what was there before untouched; a
hard kill leaves only a hidden ``.NAME.tmp-...`` that nobody will take for the real thing."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_name(path: str | Path, kind: str = "tmp") -> Path:
    """A hidden, unique sibling of ``path``: ``.NAME.KIND-PID-RANDOM``."""
    path = Path(path)
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def fsync(path: str | Path) -> None:
    """Flush ``path`` to disk. A folder needs it too, or a rename in it may not survive a power
    cut; some systems refuse to sync folders, which is then skipped."""
    path = Path(path)
    if not path.is_dir():
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, *, durable: bool = True) -> Iterator[Path]:
    """A temporary name to write ``path``'s new contents to; when the block ends, that file
    replaces ``path`` in one rename. If the block raises, the temporary file is deleted.
    ``durable=False`` skips the flushes, for scratch files that need not survive a power cut."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if durable:
            fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync(path.parent)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    return write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """An empty temporary folder to fill; when the block ends, everything in it is flushed and it
    takes ``path``'s place (an existing folder is moved aside first and deleted only once the
    rename has succeeded; put back if it fails). If the block raises, the temporary folder is
    deleted. Checks of ``path`` belong at the end of the block, right before the rename."""
    path = Path(path)
    tmp = temporary_name(path)
    tmp.mkdir()
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                fsync(Path(root) / name)
            fsync(root)
        _replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_folder(tmp: Path, path: Path) -> None:
    old = None
    if path.is_dir():
        if any(path.iterdir()):
            old = temporary_name(path, "old")
            os.rename(path, old)
        else:
            path.rmdir()
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    fsync(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
