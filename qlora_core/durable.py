"""Durable file writes: a crash (process kill or power loss) leaves either the old file or the new one.

Why each step: writing to a temporary name beside the target and `os.replace`-ing it makes the switch atomic
for readers, but without `fsync` the rename can reach the disk before the data (a power loss then leaves an
empty or partial file under the final name), and without an fsync of the directory the rename itself may be
lost. So: write the temporary file, fsync it, rename, fsync the directory. Whole directories (training
checkpoints) are fsync'd file by file and directory by directory before their own rename.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (renames, new files) to disk. No-op where directories cannot be opened
    (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (PermissionError, IsADirectoryError, OSError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush one file's data and metadata to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], mode: int = 0o644) -> None:
    """Create `path` through write(tmp_path): the temporary file beside it is fsync'd, given `mode`, renamed onto
    `path`, and the directory fsync'd. If write raises, the temporary file is removed and `path` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # mkstemp creates 0600; checkpoints and adapters are meant to be shared
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """atomic_write of a UTF-8 text file."""
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under root, then every directory bottom-up (before the tree is renamed into place)."""
    for d, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(os.path.join(d, name))
        fsync_dir(d)
