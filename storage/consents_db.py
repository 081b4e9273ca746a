"""Consent: a person's recorded yes, before any photo of theirs is kept."""

from __future__ import annotations

import hashlib
import time

from storage.db import Database
from storage.users_db import ensure_user


def text_digest(text: str) -> str:
    """What a consent was given to: a digest of the text shown, so a changed text can ask again."""
    return hashlib.sha256(text.encode()).hexdigest()


async def record_consent(db: Database, user_id: int, text: str, now: float | None = None) -> None:
    """Record that the person agreed to `text` now (again: the time and text are updated)."""
    await ensure_user(db, user_id)
    await db.execute(
        "INSERT INTO consents (user_id, text_sha256, accepted_at) VALUES (?, ?, ?) "
        "ON CONFLICT (user_id) DO UPDATE SET text_sha256 = excluded.text_sha256, accepted_at = excluded.accepted_at",
        (user_id, text_digest(text), time.time() if now is None else now))


async def consent_time(db: Database, user_id: int, text: str) -> float | None:
    """When the person agreed to this very `text`, or None if they have not."""
    row = await db.fetchone("SELECT accepted_at FROM consents WHERE user_id = ? AND text_sha256 = ?",
                            (user_id, text_digest(text)))
    return float(row["accepted_at"]) if row else None
