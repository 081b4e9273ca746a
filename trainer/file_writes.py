"""Atomic file writes for the trainer (`common.atomic`), with a full disk reported as `DiskFull`, so
every writer in the trainer reports it the same way."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from common import atomic as common_atomic
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


def write_atomic(path: Path, write: Callable[[Path], object], what: str = "file") -> Path:
    """`common.atomic.write_atomic`, with a full disk reported as DiskFull naming `what`: after a
    power cut the file is whole or absent (an empty class picture in the shared cache would break
    every later training of that class)."""
    with disk_errors(what):
        return common_atomic.write_atomic(path, write)


def write_bytes_atomic(path: Path, data: bytes, what: str = "file") -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data), what)
