"""The data folder: per-person files under ``users/<discord id>/<category>/`` and a shared area.

Names are always generated (uuid4 hex plus a fixed suffix), never taken from user input, and every
write is atomic: a reader (or the bot after a crash) sees the old state or the whole new file,
never half of one. Paths kept in the database are relative to the data folder and are checked on
the way back in, so a bad row cannot make the bot read or delete outside a person's folder.
These calls block on disk I/O; from the event loop, run them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import logging
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from common.atomic import atomic_file, atomic_write, fsync_dir

log = logging.getLogger(__name__)

CATEGORIES = ("photos", "models", "generations", "checkpoints", "exports")
_SUFFIX_RE = re.compile(r"(\.[a-z0-9]{1,12}){0,2}")


class UnsafePathError(ValueError):
    """A stored path points outside the folder it belongs to."""


def _user_key(user_id: int) -> str:
    if isinstance(user_id, bool) or not isinstance(user_id, int) or user_id <= 0:
        raise ValueError(f"not a Discord user id: {user_id!r}")
    return str(user_id)


class FileStore:
    """Every file the bot keeps, laid out under one data folder."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir).resolve()
        self.users_dir = self.root / "users"
        self.shared_dir = self.root / "shared"
        self.users_dir.mkdir(parents=True, exist_ok=True)
        self.shared_dir.mkdir(parents=True, exist_ok=True)

    def user_dir(self, user_id: int) -> Path:
        """The folder holding everything of one person (it may not exist yet)."""
        return self.users_dir / _user_key(user_id)

    def new_relpath(self, user_id: int, category: str, suffix: str) -> str:
        """A fresh, unused name for a file of ``category``, relative to the data folder."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown file category {category!r}; expected one of {CATEGORIES}")
        if not _SUFFIX_RE.fullmatch(suffix):
            raise ValueError(f"unsupported file suffix {suffix!r}")
        return f"users/{_user_key(user_id)}/{category}/{uuid.uuid4().hex}{suffix}"

    @contextmanager
    def writer(self, user_id: int, category: str, suffix: str) -> Iterator[tuple[BinaryIO, str]]:
        """Stream a new file atomically; yields the open file and the relative path it will have."""
        relpath = self.new_relpath(user_id, category, suffix)
        with atomic_file(self.root / relpath) as handle:
            yield handle, relpath

    def write(self, user_id: int, category: str, data: bytes, suffix: str) -> str:
        """Store ``data`` as a new file of ``category``; return its path relative to the data folder."""
        with self.writer(user_id, category, suffix) as (handle, relpath):
            handle.write(data)
        return relpath

    def resolve(self, relpath: str, user_id: int | None = None) -> Path:
        """The absolute path of a stored ``users/<id>/<category>/<name>`` file.

        Anything else is refused: absolute paths, ``..``, extra folders, unknown categories, a
        path of someone other than ``user_id`` (when given), or a link leading out of the folder.
        """
        parts = PurePosixPath(relpath).parts
        if (
            len(parts) != 4
            or parts[0] != "users"
            or not parts[1].isdigit()
            or parts[2] not in CATEGORIES
            or parts[3] in (".", "..")
            or "\\" in relpath
        ):
            raise UnsafePathError(f"not a stored file path: {relpath!r}")
        owner = int(parts[1])
        if user_id is not None and owner != user_id:
            raise UnsafePathError(f"path {relpath!r} does not belong to user {user_id}")
        path = (self.root / relpath).resolve()
        if not path.is_relative_to(self.user_dir(owner).resolve()):
            raise UnsafePathError(f"path {relpath!r} leads outside the files of its user")
        return path

    def read(self, relpath: str, user_id: int | None = None) -> bytes:
        """The bytes of a stored file (of ``user_id`` when given)."""
        return self.resolve(relpath, user_id).read_bytes()

    def delete(self, relpath: str, user_id: int | None = None) -> bool:
        """Remove a stored file (of ``user_id`` when given); False if it was already gone."""
        path = self.resolve(relpath, user_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(path.parent)
        return True

    def user_usage(self, user_id: int) -> tuple[int, int]:
        """(number of files, total bytes) kept for one person."""
        files = [p for p in self.user_dir(user_id).rglob("*") if p.is_file()]
        return len(files), sum(p.stat().st_size for p in files)

    def category_usage(self) -> dict[str, tuple[int, int]]:
        """(number of files, total bytes) of each category, all people together."""
        usage = {}
        for category in CATEGORIES:
            count = size = 0
            for path in self.users_dir.glob(f"*/{category}/*"):
                try:
                    size += path.stat().st_size
                except FileNotFoundError:  # deleted meanwhile (a /forget, a replaced checkpoint)
                    continue
                count += 1
            usage[category] = count, size
        return usage

    def delete_user_files(self, user_id: int) -> tuple[int, int]:
        """Remove the person's whole folder; return the (files, bytes) that were removed."""
        folder = self.user_dir(user_id)
        if not folder.exists():
            return 0, 0
        usage = self.user_usage(user_id)
        shutil.rmtree(folder)
        fsync_dir(self.users_dir)
        log.info("removed %d files (%d bytes) of one user", *usage)
        return usage

    def shared_path(self, *parts: str) -> Path:
        """A path in the shared area (e.g. the class-image cache); refuses anything escaping it."""
        path = self.shared_dir.joinpath(*parts).resolve()
        if path == self.shared_dir or not path.is_relative_to(self.shared_dir):
            raise UnsafePathError(f"shared path {'/'.join(parts)!r} is outside the shared folder")
        return path

    def write_shared(self, data: bytes, *parts: str) -> Path:
        """Atomically store ``data`` in the shared area and return its absolute path."""
        path = self.shared_path(*parts)
        atomic_write(path, data)
        return path
