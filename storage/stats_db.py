"""What /admin stats counts: people, models, trainings, pictures and GPU time over a window.

Trainings, pictures and GPU time are read from the jobs and pictures kept, so a person who used
/forget no longer counts in them; what the safety filter withheld comes from the usage rows,
which outlive /forget (storage.usage_db).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from storage.db import Database


@dataclass(frozen=True)
class Totals:
    """What the bot holds now."""

    people: int  # everyone it has a record of
    with_model: int  # of them, those with a trained model
    banned: int


@dataclass(frozen=True)
class Window:
    """What happened from `since` on."""

    active_people: int  # people who asked for a training or pictures
    trainings: int  # trainings that ended with a model
    pictures: int  # pictures made
    flagged: int  # pictures the safety filter withheld


async def totals(db: Database) -> Totals:
    row = await db.fetchone(
        "SELECT (SELECT count(*) FROM users) AS people, "
        "(SELECT count(DISTINCT owner) FROM models) AS with_model, "
        "(SELECT count(*) FROM bans) AS banned")
    assert row is not None
    return Totals(row["people"], row["with_model"], row["banned"])


async def window(db: Database, since: float) -> Window:
    row = await db.fetchone(
        "SELECT (SELECT count(DISTINCT owner) FROM jobs WHERE created_at >= ?) AS active_people, "
        "(SELECT count(*) FROM jobs WHERE kind = 'train' AND state = 'succeeded' AND finished_at >= ?) "
        "AS trainings, "
        "(SELECT coalesce(sum(json_array_length(seeds)), 0) FROM generations WHERE created_at >= ?) AS pictures, "
        "(SELECT coalesce(sum(amount), 0) FROM usage WHERE kind = 'flagged' AND at >= ?) AS flagged",
        (since, since, since, since))
    assert row is not None
    return Window(row["active_people"], row["trainings"], row["pictures"], row["flagged"])


async def gpu_seconds_by_person(db: Database, since: float, limit: int = 10,
                                now: float | None = None) -> list[tuple[int, float]]:
    """(person, seconds their jobs held a worker from `since` on), most first: each attempt's run
    from its start to its end, or to `now` while it runs. A picture served between the steps of a
    training counts for its own owner as well; the two shared the GPU."""
    now = time.time() if now is None else now
    rows = await db.fetchall(
        "SELECT owner, sum(min(coalesce(finished_at, ?), ?) - max(started_at, ?)) AS seconds FROM jobs "
        "WHERE started_at IS NOT NULL AND (finished_at >= ? OR (finished_at IS NULL AND state = 'running')) "
        "GROUP BY owner HAVING seconds > 0 ORDER BY seconds DESC, owner LIMIT ?",
        (now, now, since, since, limit))
    return [(row["owner"], float(row["seconds"])) for row in rows]
