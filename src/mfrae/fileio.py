"""Crash-safe file writing: write to a temporary name, flush to disk, rename into place.

A reader (or a resumed run) therefore only ever sees complete files. The writers here never write through a
symbolic link: an atomic write replaces a link at the final name by a regular file (the rename acts on the
name, not on what it points to), and `append_text` refuses a link.
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


def _write_new(path: Path, data: bytes, flags: int) -> None:
    # O_NOFOLLOW: opening fails (ELOOP) where the last path component is a symbolic link.
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | flags, 0o644)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked (e.g. near a full disk)
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> Path:
    """Replace `path` by a file holding `text`, atomically; on failure the old file is untouched and the
    temporary file removed. A symbolic link at `path` is replaced, its target left alone."""
    path = Path(path)
    tmp = temp_path(path)
    tmp.unlink(missing_ok=True)  # a leftover of this pid (unlink removes a link itself, never its target)
    try:
        _write_new(tmp, text.encode(), os.O_CREAT | os.O_EXCL)
        return commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_text(path: Path, text: str) -> None:
    """Append `text` to `path` (created if absent); refuses (OSError ELOOP) to write through a symbolic link."""
    _write_new(Path(path), text.encode(), os.O_CREAT | os.O_APPEND)
