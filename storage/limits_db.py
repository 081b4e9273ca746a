"""Quota limits: the operator's defaults (settings), overridden per server with /admin limits."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, replace

from storage.db import Database, from_json, to_json


@dataclass(frozen=True)
class Limits:
    """What one person, and one server's people together, may use in a day. 0: no limit."""

    trainings_per_day: int
    pictures_per_day: int
    train_cooldown_min: int
    server_trainings_per_day: int
    server_pictures_per_day: int


LIMIT_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Limits))


async def guild_overrides(db: Database, guild_id: int) -> dict[str, int]:
    """The limits set for one server with /admin limits (only those set)."""
    row = await db.fetchone("SELECT limits FROM guild_limits WHERE guild_id = ?", (guild_id,))
    stored = from_json(row["limits"]) if row else {}
    return {name: int(value) for name, value in stored.items() if name in LIMIT_NAMES}


async def limits_for(db: Database, defaults: Limits, guild_id: int | None) -> Limits:
    """The limits that apply in a server (the defaults where it set none, or with no server)."""
    if guild_id is None:
        return defaults
    return replace(defaults, **await guild_overrides(db, guild_id))


async def set_guild_limit(db: Database, guild_id: int, name: str, value: int | None, updated_by: int) -> None:
    """Set one limit for a server; `None` goes back to the operator's default."""
    if name not in LIMIT_NAMES:
        raise ValueError(f"unknown limit {name!r}")
    async with db.transaction() as tx:
        row = await tx.fetchone("SELECT limits FROM guild_limits WHERE guild_id = ?", (guild_id,))
        stored = from_json(row["limits"]) if row else {}
        if value is None:
            stored.pop(name, None)
        else:
            stored[name] = value
        await tx.execute(
            "INSERT INTO guild_limits (guild_id, limits, updated_by, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (guild_id) DO UPDATE SET limits = excluded.limits, updated_by = excluded.updated_by, "
            "updated_at = excluded.updated_at",
            (guild_id, to_json(stored), updated_by, time.time()))


def as_dict(limits: Limits) -> dict[str, int]:
    return asdict(limits)
