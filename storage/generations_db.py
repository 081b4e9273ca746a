"""Pictures made for a person: the request that made them, so buttons can reroll or vary them later."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from storage.db import Database, from_json, to_json


@dataclass(frozen=True)
class Generation:
    id: int
    owner: int
    model_id: int | None
    job_id: int | None
    prompt: str
    negative: str
    seeds: list[int]
    params: dict[str, Any]
    paths: list[str]
    channel_id: int | None
    message_id: int | None
    created_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Generation:
        values = dict(row)
        for key in ("seeds", "params", "paths"):
            values[key] = from_json(values[key])
        return cls(**values)


async def add_generation(
    db: Database,
    owner: int,
    model_id: int | None,
    job_id: int | None,
    prompt: str,
    negative: str,
    seeds: Sequence[int],
    params: dict[str, Any],
    paths: Sequence[str],
    channel_id: int | None = None,
    message_id: int | None = None,
) -> int:
    """Record a set of stored images (``paths`` relative to the data folder, one per seed); return its id."""
    return await db.insert(
        "INSERT INTO generations (owner, model_id, job_id, prompt, negative, seeds, params, paths, "
        "channel_id, message_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            owner,
            model_id,
            job_id,
            prompt,
            negative,
            to_json(list(seeds)),
            to_json(params),
            to_json(list(paths)),
            channel_id,
            message_id,
            time.time(),
        ),
    )


async def get_generation(db: Database, generation_id: int) -> Generation | None:
    row = await db.fetchone("SELECT * FROM generations WHERE id = ?", (generation_id,))
    return Generation.from_row(row) if row else None


async def generation_for_message(db: Database, message_id: int) -> Generation | None:
    """The pictures a Discord message shows (a button pressed after a restart names only its message)."""
    row = await db.fetchone(
        "SELECT * FROM generations WHERE message_id = ? ORDER BY id DESC LIMIT 1", (message_id,)
    )
    return Generation.from_row(row) if row else None


async def set_generation_message(db: Database, generation_id: int, channel_id: int, message_id: int) -> None:
    """Remember the Discord message that shows these pictures."""
    await db.execute(
        "UPDATE generations SET channel_id = ?, message_id = ? WHERE id = ?",
        (channel_id, message_id, generation_id),
    )
