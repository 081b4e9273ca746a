"""A person's kept photos: one row per normalised image, with the hashes used to spot duplicates."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from storage.db import Database, from_json, to_json

if TYPE_CHECKING:
    from storage.store import Storage


class DuplicatePhotoError(ValueError):
    """The person already has a photo with exactly these pixels."""


@dataclass(frozen=True)
class Photo:
    id: int
    owner: int
    sha256: str
    phash: int
    path: str
    byte_size: int
    width: int
    height: int
    face_box: tuple[int, int, int, int] | None
    quality_flags: tuple[str, ...]
    created_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Photo:
        box = from_json(row["face_box"])
        return cls(
            id=row["id"],
            owner=row["owner"],
            sha256=row["sha256"],
            phash=int(row["phash"], 16),
            path=row["path"],
            byte_size=row["byte_size"],
            width=row["width"],
            height=row["height"],
            face_box=tuple(box) if box is not None else None,
            quality_flags=tuple(from_json(row["quality_flags"])),
            created_at=row["created_at"],
        )


def _phash_text(phash: int) -> str:
    """64-bit hashes overflow SQLite's signed INTEGER, so they are kept as 16 hex digits."""
    if not 0 <= phash < 2**64:
        raise ValueError(f"perceptual hash out of 64-bit range: {phash}")
    return f"{phash:016x}"


async def add_photo(
    db: Database,
    owner: int,
    *,
    sha256: str,
    phash: int,
    path: str,
    byte_size: int,
    width: int,
    height: int,
    face_box: Sequence[int] | None = None,
    quality_flags: Sequence[str] = (),
) -> int:
    """Record a stored photo file (``path`` relative to the data folder); return its id.

    Width and height are those of the original upload. Raises DuplicatePhotoError when the
    person already has a photo with the same pixel hash.
    """
    try:
        return await db.insert(
            "INSERT INTO photos (owner, sha256, phash, path, byte_size, width, height, face_box, "
            "quality_flags, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                owner,
                sha256,
                _phash_text(phash),
                path,
                byte_size,
                width,
                height,
                to_json(list(face_box)) if face_box is not None else None,
                to_json(list(quality_flags)),
                time.time(),
            ),
        )
    except sqlite3.IntegrityError as exc:
        if "photos.owner, photos.sha256" in str(exc):
            raise DuplicatePhotoError("this photo is already kept") from None
        raise


async def list_photos(db: Database, owner: int) -> list[Photo]:
    """The person's photos, oldest first: photo number N (as people see it) is ``result[N - 1]``."""
    rows = await db.fetchall("SELECT * FROM photos WHERE owner = ? ORDER BY created_at, id", (owner,))
    return [Photo.from_row(row) for row in rows]


async def count_photos(db: Database, owner: int) -> int:
    row = await db.fetchone("SELECT count(*) FROM photos WHERE owner = ?", (owner,))
    return int(row[0]) if row else 0


async def photo_hashes(db: Database, owner: int) -> list[tuple[str, int]]:
    """(sha256, perceptual hash) of each of the person's photos, for duplicate checks."""
    rows = await db.fetchall("SELECT sha256, phash FROM photos WHERE owner = ? ORDER BY id", (owner,))
    return [(row["sha256"], int(row["phash"], 16)) for row in rows]


async def delete_photo(store: Storage, owner: int, photo_id: int) -> bool:
    """Delete one of ``owner``'s photos, row and file; False if they have no photo with that id.

    The row goes first: a crash in between leaves an unreferenced file (removed with the
    person's folder), never a row pointing at nothing.
    """
    row = await store.db.fetchone(
        "DELETE FROM photos WHERE id = ? AND owner = ? RETURNING path", (photo_id, owner)
    )
    if row is None:
        return False
    await asyncio.to_thread(store.files.delete, row["path"], owner)
    return True
