"""People an operator has banned. A ban is the operator's record: it outlives /forget."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from storage.db import Database


@dataclass(frozen=True)
class Ban:
    user_id: int
    banned_by: int
    reason: str
    banned_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Ban:
        return cls(row["user_id"], row["banned_by"], row["reason"], row["banned_at"])


async def ban(db: Database, user_id: int, banned_by: int, reason: str = "", now: float | None = None) -> bool:
    """Ban the person; False if they already were (the first ban's record is kept)."""
    changed = await db.execute(
        "INSERT INTO bans (user_id, banned_by, reason, banned_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (user_id) DO NOTHING",
        (user_id, banned_by, reason, time.time() if now is None else now))
    return changed == 1


async def unban(db: Database, user_id: int) -> bool:
    """Lift the ban; False if there was none."""
    return await db.execute("DELETE FROM bans WHERE user_id = ?", (user_id,)) == 1


async def get_ban(db: Database, user_id: int) -> Ban | None:
    row = await db.fetchone("SELECT * FROM bans WHERE user_id = ?", (user_id,))
    return Ban.from_row(row) if row else None
