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

from trainer.errors import DiskFull


@contextmanager
def disk_errors(what: str) -> Iterator[None]:
    """Turn "no space left on device" into DiskFull with a message saying what could not be saved."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"The disk is full, so the {what} could not be saved. Free some space on the "
                           "server and try again.") from exc
        raise


def write_atomic(path: Path, write: Callable[[Path], None], what: str = "file") -> Path:
    """Call `write(tmp)` for a temporary file next to `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with disk_errors(what):
            write(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes_atomic(path: Path, data: bytes, what: str = "file") -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data), what)
