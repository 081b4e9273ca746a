"""A person's own defaults for /imagine, set with /settings: one row per person who set any."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, fields
from typing import Any

from storage.db import Database


@dataclass(frozen=True)
class PersonalDefaults:
    """What a person wants when they leave an /imagine option out; None: not set (the built-in
    default applies). The names are GenerateRequest's."""

    negative_prompt: str | None = None
    style: str | None = None
    aspect: str | None = None
    num_images: int | None = None
    face_pass: bool | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> PersonalDefaults:
        face_pass = row["face_pass"]
        return cls(row["negative_prompt"], row["style"], row["aspect"], row["num_images"],
                   None if face_pass is None else bool(face_pass))

    def is_empty(self) -> bool:
        return all(getattr(self, name) is None for name in DEFAULT_NAMES)


DEFAULT_NAMES: tuple[str, ...] = tuple(f.name for f in fields(PersonalDefaults))
NO_DEFAULTS = PersonalDefaults()


async def get_defaults(db: Database, user_id: int) -> PersonalDefaults:
    """The person's defaults (all None if they set none)."""
    row = await db.fetchone("SELECT * FROM user_settings WHERE user_id = ?", (user_id,))
    return PersonalDefaults.from_row(row) if row else NO_DEFAULTS


async def set_defaults(db: Database, user_id: int, **changes: Any) -> PersonalDefaults:
    """Change some of the person's defaults (a None value unsets one) and return them all.

    The values are checked by the caller (bot.personal_defaults); only the names are checked here.
    """
    unknown = set(changes) - set(DEFAULT_NAMES)
    if unknown:
        raise ValueError(f"unknown default(s): {', '.join(sorted(unknown))}")
    now = time.time()
    async with db.transaction() as tx:
        await tx.execute("INSERT INTO users (id, created_at) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
                         (user_id, now))
        await tx.execute("INSERT INTO user_settings (user_id, updated_at) VALUES (?, ?) "
                         "ON CONFLICT (user_id) DO NOTHING", (user_id, now))
        if changes:
            columns = ", ".join(f"{name} = ?" for name in changes)  # names from DEFAULT_NAMES only
            await tx.execute(f"UPDATE user_settings SET {columns}, updated_at = ? WHERE user_id = ?",
                             (*changes.values(), now, user_id))
        row = await tx.fetchone("SELECT * FROM user_settings WHERE user_id = ?", (user_id,))
    assert row is not None
    return PersonalDefaults.from_row(row)


async def clear_defaults(db: Database, user_id: int) -> bool:
    """Remove all of the person's defaults; return whether they had any row."""
    return await db.execute("DELETE FROM user_settings WHERE user_id = ?", (user_id,)) > 0
