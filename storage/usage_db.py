"""What quotas count: trainings started, pictures asked for and pictures withheld by the filter.

Rows hold a person's id, a server id, a kind and a time, nothing else, and are kept for
`USAGE_KEEP_S` even after /forget, so that forgetting oneself does not reset a day's quota.
"""

from __future__ import annotations

import time
from typing import Literal

from storage.db import Database

UsageKind = Literal["train", "picture", "flagged"]
USAGE_KEEP_S = 8 * 86400  # a week of /admin stats, and a day of quota


async def record_usage(db: Database, owner: int, guild_id: int | None, kind: UsageKind, amount: int = 1,
                       now: float | None = None) -> None:
    await db.execute("INSERT INTO usage (owner, guild_id, kind, amount, at) VALUES (?, ?, ?, ?, ?)",
                     (owner, guild_id, kind, amount, time.time() if now is None else now))


async def used_by(db: Database, owner: int, kind: UsageKind, since: float) -> int:
    """How much the person used of `kind` from `since` on."""
    row = await db.fetchone("SELECT coalesce(sum(amount), 0) AS n FROM usage WHERE owner = ? AND kind = ? AND at >= ?",
                            (owner, kind, since))
    return int(row["n"]) if row else 0


async def last_use(db: Database, owner: int, kind: UsageKind) -> float | None:
    """When the person last used `kind` (for a cooldown), or None."""
    row = await db.fetchone("SELECT max(at) AS at FROM usage WHERE owner = ? AND kind = ?", (owner, kind))
    return float(row["at"]) if row and row["at"] is not None else None


async def uses_after(db: Database, kind: UsageKind, after: float, *, owner: int | None = None,
                     guild_id: int | None = None) -> list[tuple[float, int]]:
    """(time, amount) of each use of `kind` later than `after`, oldest first: one person's, one
    server's, or everyone's (for a rolling window: when will enough of it have left?)."""
    sql, args = "SELECT at, amount FROM usage WHERE kind = ? AND at > ?", [kind, after]
    if owner is not None:
        sql, args = sql + " AND owner = ?", [*args, owner]
    if guild_id is not None:
        sql, args = sql + " AND guild_id = ?", [*args, guild_id]
    rows = await db.fetchall(sql + " ORDER BY at", args)
    return [(float(row["at"]), int(row["amount"])) for row in rows]


async def last_guild(db: Database, owner: int) -> int | None:
    """The server of the person's latest counted use, or None (none, or not in a server)."""
    row = await db.fetchone("SELECT guild_id FROM usage WHERE owner = ? ORDER BY at DESC, id DESC LIMIT 1",
                            (owner,))
    return int(row["guild_id"]) if row and row["guild_id"] is not None else None


async def give_back(db: Database, owner: int, guild_id: int | None, kind: UsageKind, amount: int,
                    at: float) -> bool:
    """Delete one use recorded with exactly these values (a refund); False if there is none.
    Uses with equal values are interchangeable, so which one goes makes no difference."""
    changed = await db.execute(
        "DELETE FROM usage WHERE id = (SELECT id FROM usage WHERE owner = ? AND guild_id IS ? AND kind = ? "
        "AND amount = ? AND at = ? LIMIT 1)", (owner, guild_id, kind, amount, at))
    return changed == 1


async def prune_usage(db: Database, now: float | None = None) -> int:
    """Delete rows older than USAGE_KEEP_S; return how many."""
    return await db.execute("DELETE FROM usage WHERE at < ?", ((time.time() if now is None else now) - USAGE_KEEP_S,))
