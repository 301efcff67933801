"""Durable file writes: a crash (process kill or power loss) leaves either the old file or the new one.

Why each step: writing to a temporary name beside the target and `os.replace`-ing it makes the switch atomic
for readers, but without `fsync` the rename can reach the disk before the data (a power loss then leaves an
empty or partial file under the final name), and without an fsync of the directory the rename itself may be
lost. So: write the temporary file, fsync it, rename, fsync the directory. Whole directories (training
checkpoints, exported model folders: replace_dir) are fsync'd file by file and directory by directory before
their own rename.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import sys
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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Create or replace the folder `path` as a whole: fill(tmp) writes the new content into a temporary folder
    beside it, which is fsync'd and then put in place, so a crash or an exception leaves the complete old folder
    or the complete new one. An existing folder is swapped out atomically where the OS can (Linux renameat2),
    else renamed aside just before the new one is renamed in (a crash between the two renames leaves the old
    folder whole under `.<name>.*.old`), then deleted. If fill raises, `path` is untouched. A symlink `path` is
    followed: the folder it names is replaced. Returns `path`."""
    given = path = Path(path)
    if path.is_symlink():  # replace the folder the link names; renaming onto the link would replace the link
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; model folders are meant to be shared
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        os.replace(tmp, path)
    elif _exchange(tmp, path):  # tmp now holds the old folder
        shutil.rmtree(tmp)
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old)  # onto the empty folder mkdtemp made: POSIX rename replaces an empty directory
        os.replace(tmp, path)
        shutil.rmtree(old)
    fsync_dir(path.parent)
    return given
