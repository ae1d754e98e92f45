"""Crash-safe file writing: write to a temporary name, flush to disk, rename into place.

A reader (or a resumed run) therefore only ever sees complete files.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Persist a directory entry (a rename inside it); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(final: Path) -> Path:
    """A per-process temporary name next to `final` (processes writing the same file never collide)."""
    return final.with_name(f".{final.name}.{os.getpid()}.partial")


def commit(tmp: Path, final: Path) -> Path:
    """Flush `tmp` to disk and atomically rename it to `final`."""
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def atomic_write_text(path: Path, text: str) -> Path:
    path = Path(path)
    tmp = temp_path(path)
    tmp.write_text(text)
    return commit(tmp, path)
