"""Who did what with /admin: each action is written here and to the log."""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass

from storage.db import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdminAction:
    admin_id: int
    guild_id: int | None
    action: str
    detail: str
    at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> AdminAction:
        return cls(row["admin_id"], row["guild_id"], row["action"], row["detail"], row["at"])


async def record_action(db: Database, admin_id: int, guild_id: int | None, action: str, detail: str = "") -> None:
    await db.execute("INSERT INTO admin_actions (admin_id, guild_id, action, detail, at) VALUES (?, ?, ?, ?, ?)",
                     (admin_id, guild_id, action, detail, time.time()))
    log.info("admin %d (server %s): %s %s", admin_id, guild_id, action, detail)


async def recent_actions(db: Database, limit: int = 20) -> list[AdminAction]:
    rows = await db.fetchall("SELECT * FROM admin_actions ORDER BY id DESC LIMIT ?", (limit,))
    return [AdminAction.from_row(row) for row in rows]
