"""People known to the bot: their handle, class word and settings."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from jobs.handles import HandleTakenError, normalize_class_word, suggest_handle, validate_handle
from storage.db import Database, from_json, to_json


@dataclass(frozen=True)
class User:
    id: int
    handle: str | None
    class_word: str | None
    settings: dict[str, Any]
    created_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> User:
        return cls(row["id"], row["handle"], row["class_word"], from_json(row["settings"]), row["created_at"])


async def ensure_user(db: Database, user_id: int) -> User:
    """The person's row, created on first contact."""
    await db.execute(
        "INSERT INTO users (id, created_at) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
        (user_id, time.time()),
    )
    user = await get_user(db, user_id)
    assert user is not None
    return user


async def get_user(db: Database, user_id: int) -> User | None:
    row = await db.fetchone("SELECT * FROM users WHERE id = ?", (user_id,))
    return User.from_row(row) if row else None


async def all_handles(db: Database) -> set[str]:
    """Every handle in use, lower-cased (for suggesting a free one)."""
    rows = await db.fetchall("SELECT lower(handle) AS handle FROM users WHERE handle IS NOT NULL")
    return {row["handle"] for row in rows}


async def set_handle(db: Database, user_id: int, handle: str, class_word: str) -> User:
    """Give the person a handle and class word, or raise a NameRuleError whose reason says why not.

    The UNIQUE (case-insensitive) index decides who gets a handle, so two people asking for the
    same one at once cannot both succeed; the loser is offered a free alternative.
    """
    class_word = normalize_class_word(class_word)
    handle = validate_handle(handle, class_word)
    try:
        await db.execute(
            "INSERT INTO users (id, handle, class_word, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET handle = excluded.handle, class_word = excluded.class_word",
            (user_id, handle, class_word, time.time()),
        )
    except sqlite3.IntegrityError as exc:
        if "users.handle" not in str(exc):
            raise
        other = suggest_handle(handle, await all_handles(db), class_word)
        raise HandleTakenError(
            f"Someone else already has the handle '{handle}'. How about '{other}'?"
        ) from None
    user = await get_user(db, user_id)
    assert user is not None
    return user


async def update_settings(db: Database, user_id: int, **changes: Any) -> dict[str, Any]:
    """Merge ``changes`` into the person's settings (a None value removes a key); return the result."""
    await ensure_user(db, user_id)
    async with db.transaction() as tx:
        row = await tx.fetchone("SELECT settings FROM users WHERE id = ?", (user_id,))
        settings = from_json(row["settings"]) if row else {}
        for key, value in changes.items():
            if value is None:
                settings.pop(key, None)
            else:
                settings[key] = value
        await tx.execute("UPDATE users SET settings = ? WHERE id = ?", (to_json(settings), user_id))
    return settings
