"""How much one person, and one server's people together, may ask for (TRAININGS_PER_DAY,
PICTURES_PER_DAY, TRAIN_COOLDOWN_MIN, SERVER_TRAININGS_PER_DAY, SERVER_PICTURES_PER_DAY, overridden per
server with /admin limits) and how many jobs may wait at all (MAX_QUEUED_JOBS).

A day is a rolling 24 hours: a use counts from the moment its job is queued until 24 hours later, so
a refusal can say exactly when the person may try again. Uses live in the database (storage.usage_db),
so a restart forgets nothing, and the time is always passed in: the scheduler's clock, which tests
move. A training counts one, a request for pictures (a Reroll and a variation too) its number of
pictures. A job that failed, or was cancelled before it started, gives its use back: the person had
nothing from it. One that succeeded, or was cancelled while it ran, does not.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from jobs.payloads import GenerateParams, from_stored
from storage import jobs_db, usage_db
from storage.db import Database
from storage.jobs_db import Job
from storage.limits_db import Limits
from storage.usage_db import UsageKind

log = logging.getLogger(__name__)

DAY_S = 86400.0


def when(at: float, now: float) -> str:
    """A moment as Discord shows it to each reader, in their own time zone: "in 3 hours (17:40)"."""
    stamp = math.ceil(at)
    return f"<t:{stamp}:R> (<t:{stamp}:{'t' if at - now < DAY_S / 2 else 'f'}>)"  # f: with the date


def use_of(job: Job) -> tuple[UsageKind, int]:
    """What a job counts against: one training, or the number of pictures asked for."""
    if job.kind == "train":
        return "train", 1
    params = from_stored("generate", job.params)
    assert isinstance(params, GenerateParams)
    return "picture", params.request.num_images


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _free_at(uses: list[tuple[float, int]], limit: int, wanted: int) -> float | None:
    """When `wanted` more fit under `limit` as `uses` (oldest first) leave the window; None: now."""
    excess = sum(amount for _, amount in uses) + wanted - limit
    if excess <= 0:
        return None
    for at, amount in uses:
        excess -= amount
        if excess <= 0:
            return at + DAY_S
    return math.inf  # `wanted` alone is over the limit; callers refuse that first


async def _training_waits(db: Database, limits: Limits, owner: int, guild_id: int | None,
                          now: float) -> list[tuple[float, str]]:
    """Each rule that keeps the person from training now: when it will let them, and what to say."""
    waits: list[tuple[float, str]] = []
    if limits.train_cooldown_min:
        last = await usage_db.last_use(db, owner, "train")
        if last is not None and now < (rested := last + limits.train_cooldown_min * 60):
            waits.append((rested, f"Trainings are at least {_plural(limits.train_cooldown_min, 'minute')} "
                                  f"apart, so you can train again {when(rested, now)}."))
    if limits.trainings_per_day:
        uses = await usage_db.uses_after(db, "train", now - DAY_S, owner=owner)
        if (at := _free_at(uses, limits.trainings_per_day, 1)) is not None:
            waits.append((at, f"You have had your {_plural(limits.trainings_per_day, 'training')} of the last "
                              f"24 hours, so you can train again {when(at, now)}."))
    if guild_id is not None and limits.server_trainings_per_day:
        uses = await usage_db.uses_after(db, "train", now - DAY_S, guild_id=guild_id)
        if (at := _free_at(uses, limits.server_trainings_per_day, 1)) is not None:
            waits.append((at, f"This server's {_plural(limits.server_trainings_per_day, 'training')} of the "
                              f"last 24 hours are used up, so you can train again {when(at, now)}."))
    return waits


async def training_refusal(db: Database, limits: Limits, owner: int, guild_id: int | None,
                           now: float) -> str | None:
    """Why the person may not start a training now, saying when they may; None: they may."""
    waits = await _training_waits(db, limits, owner, guild_id, now)
    return max(waits)[1] if waits else None  # the rule that lets them last is the one to tell


async def pictures_refusal(db: Database, limits: Limits, owner: int, guild_id: int | None, count: int,
                           now: float) -> str | None:
    """Why the person may not ask for `count` pictures now, saying when they may; None: they may."""
    per_day = limits.pictures_per_day
    server_per_day = limits.server_pictures_per_day if guild_id is not None else 0
    if per_day and count > per_day:
        return f"You can have at most {_plural(per_day, 'picture')} a day, so please ask for {per_day} or fewer."
    if server_per_day and count > server_per_day:
        return (f"This server allows {_plural(server_per_day, 'picture')} a day for everyone together, so "
                f"please ask for {server_per_day} or fewer.")
    waits: list[tuple[float, str]] = []
    if per_day:
        uses = await usage_db.uses_after(db, "picture", now - DAY_S, owner=owner)
        if (at := _free_at(uses, per_day, count)) is not None:
            left = max(per_day - sum(amount for _, amount in uses), 0)
            waits.append((at, f"You have {left} of your {per_day} pictures of the last 24 hours left, so please "
                              f"ask for {left} or fewer now, or for {count} {when(at, now)}." if left else
                              f"You have had your {_plural(per_day, 'picture')} of the last 24 hours, so you "
                              f"can ask for more {when(at, now)}."))
    if server_per_day:
        uses = await usage_db.uses_after(db, "picture", now - DAY_S, guild_id=guild_id)
        if (at := _free_at(uses, server_per_day, count)) is not None:
            waits.append((at, f"This server's {_plural(server_per_day, 'picture')} of the last 24 hours are "
                              f"used up, so you can ask for {count} more {when(at, now)}."))
    return max(waits)[1] if waits else None


async def queue_refusal(db: Database, max_queued_jobs: int) -> str | None:
    """Why no more jobs may wait now (MAX_QUEUED_JOBS, everyone's together); None: one more may."""
    waiting = await jobs_db.count_jobs(db, None, states=("queued",))
    if waiting < max_queued_jobs:
        return None
    return (f"The queue is full right now ({waiting} jobs are waiting), so please try again in a few minutes, "
            "once some have run.")


async def record(db: Database, job: Job) -> None:
    """Count a job just queued, at its creation time (how `give_back` finds its use again)."""
    kind, amount = use_of(job)
    await usage_db.record_usage(db, job.owner, job.guild_id, kind, amount, now=job.created_at)


def gives_back(job: Job) -> bool:
    """Whether an ended job returns its use: it failed, or it was cancelled before it ever started."""
    return job.state == "failed" or (job.state == "cancelled" and job.started_at is None)


async def settle(db: Database, job: Job) -> None:
    """Give an ended job's use back if the rule says so (`job` as stored after it ended)."""
    if gives_back(job):
        kind, amount = use_of(job)
        if await usage_db.give_back(db, job.owner, job.guild_id, kind, amount, job.created_at):
            log.info("job %d %s: its %d %s use(s) given back", job.id, job.state, amount, kind)


@dataclass(frozen=True)
class Allowance:
    """What a person has left of the last 24 hours (None: no such limit), for /status."""

    limits: Limits
    trainings_left: int | None
    pictures_left: int | None
    server_trainings_left: int | None
    server_pictures_left: int | None
    train_again_at: float | None  # when the next training may start, if not now


async def allowance(db: Database, limits: Limits, owner: int, guild_id: int | None, now: float) -> Allowance:
    """The person's remaining quota at `now`, with their server's limits (`guild_id`, or none)."""
    async def left(limit: int, kind: UsageKind, *, by: int | None = None, guild: int | None = None) -> int | None:
        if not limit or (by is None and guild is None):
            return None
        uses = await usage_db.uses_after(db, kind, now - DAY_S, owner=by, guild_id=guild)
        return max(limit - sum(amount for _, amount in uses), 0)

    waits = await _training_waits(db, limits, owner, guild_id, now)
    return Allowance(limits,
                     await left(limits.trainings_per_day, "train", by=owner),
                     await left(limits.pictures_per_day, "picture", by=owner),
                     await left(limits.server_trainings_per_day, "train", guild=guild_id),
                     await left(limits.server_pictures_per_day, "picture", guild=guild_id),
                     max(waits)[0] if waits else None)


def describe(allowance: Allowance, now: float) -> str | None:
    """/status's line about quotas, or None where nothing is limited."""
    limits = allowance.limits
    parts = []
    if allowance.trainings_left is not None:
        parts.append(f"{allowance.trainings_left} of {_plural(limits.trainings_per_day, 'training')}")
    if allowance.pictures_left is not None:
        parts.append(f"{allowance.pictures_left} of {_plural(limits.pictures_per_day, 'picture')}")
    sentences = [f"Left of the last 24 hours: {' and '.join(parts)}." if parts else ""]
    shared = [_plural(n, what) for n, mine, what in (
        (allowance.server_trainings_left, allowance.trainings_left, "training"),
        (allowance.server_pictures_left, allowance.pictures_left, "picture"))
        if n is not None and (mine is None or n < mine)]
    if shared:
        sentences.append(f"This server has {' and '.join(shared)} left for everyone together.")
    if allowance.train_again_at is not None:
        sentences.append(f"You can train again {when(allowance.train_again_at, now)}.")
    text = " ".join(s for s in sentences if s)
    return text or None
