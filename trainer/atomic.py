"""Atomic file writes: readers see the old file or the new one, never half of one.

A full disk is turned into `DiskFull` here, so every writer in the trainer reports it the same way.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from storage.files import fsync_dir
from trainer.errors import DiskFull

# How safetensors' Rust writer reports a full disk or quota: not as an OSError, only in its message.
_FULL_IN_WORDS = (f"(os error {errno.ENOSPC})", f"(os error {errno.EDQUOT})")


@contextmanager
def disk_errors(what: str) -> Iterator[None]:
    """Turn "no space left on device" into DiskFull with a message saying what could not be saved."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        full = (exc.errno in (errno.ENOSPC, errno.EDQUOT) if isinstance(exc, OSError)
                else any(words in str(exc) for words in _FULL_IN_WORDS))
        if full:
            raise DiskFull(f"The disk is full, so the {what} could not be saved. Free some space on the "
                           "server and try again.") from exc
        raise


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None], what: str = "file") -> Path:
    """Call `write(tmp)` for a temporary file next to `path`, then rename it into place.

    The data reach the disk before the rename, and the rename before this returns: after a power
    cut the file is whole or absent, never a name with nothing behind it (an empty class picture
    in the shared cache would break every later training of that class).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with disk_errors(what):
            write(tmp)
            _fsync_file(tmp)
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes_atomic(path: Path, data: bytes, what: str = "file") -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data), what)
