"""Taking one uploaded photo into a person's collection: check, normalise, de-duplicate, store.

Normalisation runs in a worker thread (Pillow and OpenCV release the GIL for most of it), so the
bot's event loop keeps answering while a burst of ten large photos is processed. A photo is
stored only once it is fully checked: the file is written atomically before its row is added,
so a crash can leave at worst an unreferenced file, never a row without its file.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from photos.intake import IntakeError, IntakeLimits, check_duplicates, normalise_photo
from storage import photos_db
from storage.store import Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IntakeOutcome:
    """What happened to one file: kept (with warnings) or refused with a reason."""

    filename: str
    photo_id: int | None = None
    warnings: tuple[str, ...] = ()
    error: str | None = None


async def accept_photo(store: Storage, owner: int, data: bytes, filename: str, limits: IntakeLimits,
                       *, max_photos: int) -> IntakeOutcome:
    """Check and store one photo for `owner`; never raises for a bad photo, only reports it."""
    count = await photos_db.count_photos(store.db, owner)
    if count >= max_photos:
        return IntakeOutcome(filename, error=f"you already have the maximum of {max_photos} photos. "
                                             "Remove some with `/photos` to make room.")
    try:
        photo = await asyncio.to_thread(normalise_photo, data, limits)
        check_duplicates(photo, await photos_db.photo_hashes(store.db, owner), limits)
    except IntakeError as exc:
        return IntakeOutcome(filename, error=exc.message)
    path = store.files.write(owner, "photos", photo.png, ".png")
    try:
        photo_id = await photos_db.add_photo(
            store.db, owner, sha256=photo.sha256, phash=photo.phash, path=path, byte_size=len(photo.png),
            width=photo.width, height=photo.height, face_box=photo.face_box, quality_flags=list(photo.flags))
    except BaseException:  # e.g. the person was deleted meanwhile: no photo file without its row
        store.files.delete(path, owner)
        raise
    log.info("user photo %d stored (%d flags)", photo_id, len(photo.flags))
    return IntakeOutcome(filename, photo_id=photo_id, warnings=photo.warnings)
