"""Taking one uploaded photo into a person's collection: check, normalise, de-duplicate, store.

Normalisation runs in the intake pool's capped worker processes (photos/sandbox.py), never in the
bot's process: a hostile upload can cost at most one child's memory cap and time limit, and the
event loop and its thread pool (which serve /photos, /forget and Redis) stay free while a burst of
photos is decoded. A photo is stored only once it is fully checked: the file is written atomically
before its row is added, so a crash can leave at worst an unreferenced file, never a row without
its file.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from photos.intake import IntakeError, IntakeLimits, Refusal, check_duplicates
from photos.sandbox import IntakePool
from storage import photos_db
from storage.store import Storage

log = logging.getLogger(__name__)

_default_pool: IntakePool | None = None
_default_pool_lock = threading.Lock()


@dataclass(frozen=True)
class IntakeOutcome:
    """What happened to one file: kept (with warnings) or refused with a reason."""

    filename: str
    photo_id: int | None = None
    warnings: tuple[str, ...] = ()
    error: str | None = None


def default_pool() -> IntakePool:
    """The pool for callers that bring none (scripts, tests): two processes, started on first use,
    ended when this process exits. The bot's photo cog brings its own, sized by INTAKE_PROCESSES."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None:
            _default_pool = IntakePool()
        return _default_pool


async def accept_photo(store: Storage, owner: int, data: bytes, filename: str, limits: IntakeLimits,
                       *, max_photos: int, pool: IntakePool | None = None) -> IntakeOutcome:
    """Check and store one photo for `owner`; never raises for a bad photo, only reports it."""
    count = await photos_db.count_photos(store.db, owner)
    if count >= max_photos:
        return IntakeOutcome(filename, error=f"you already have the maximum of {max_photos} photos. "
                                             "Remove some with `/photos` to make room.")
    result = await (pool or default_pool()).normalise(data, limits)
    photo = result.outcome
    if isinstance(photo, Refusal):
        return IntakeOutcome(filename, error=photo.message)
    try:
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
