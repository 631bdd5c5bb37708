"""Files that are never seen half-written: written beside their target, renamed over it."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_open(path: Path, mode: str = "wb") -> Iterator[IO]:
    """A handle on a temporary file beside ``path`` that replaces ``path`` when the block
    ends without an error (a rename within a folder is atomic); on an error, or a kill, the
    target keeps its old content. The file is readable by others (results are shared)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding, newline=None if encoding is None else "") as f:
            yield f
        os.chmod(tmp_name, 0o644)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_atomically(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (text as UTF-8) atomically."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as handle:
        handle.write(data)


# errno of a disk (or a user's quota) that is full
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A write that failed because its disk is full: no retry can succeed until the user
    frees space, so a run stops on it at once (with the folder and the fix) instead of
    training to the next checkpoint and failing again."""


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is a full disk: an errno from the OS, or the same words from a
    library that reraises it without one (pyarrow, which Ray copies checkpoints with)."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    return isinstance(error, OSError) and "No space left on device" in str(error)


@contextmanager
def disk_full_named(folder: Path, what: str) -> Iterator[None]:
    """Turn a full disk while writing ``what`` into ``folder`` into one ``DiskFullError``
    that names the folder, its free space and the fix."""
    try:
        yield
    except OSError as error:
        if not is_disk_full(error):
            raise
        free = shutil.disk_usage(nearest_existing(Path(folder))).free
        raise DiskFullError(
            f"{folder}: no space left on its disk while writing {what} "
            f"({free / 2**20:.0f} MiB free); free some space, or keep fewer checkpoints "
            "(--set train.keep_checkpoints=1), then rerun the same command: the run resumes "
            "from its last checkpoint",
        ) from None


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists: the folder whose disk ``path`` goes on."""
    while not path.exists():
        path = path.parent
    return path
