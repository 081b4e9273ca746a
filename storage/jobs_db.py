"""The job queue, kept in the database so that nothing is lost when the bot or a worker dies.

A job is claimed with one UPDATE that picks and takes the next row together, so two workers (or
two processes) can never run the same job. A claim comes with a lease: the holder renews it while
the job makes progress, and a job whose lease ran out (its worker died) is put back in the queue
with its parameters and last checkpoint. Terminal states are final: a late message from a worker
that lost its job cannot overwrite what happened since.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from storage.db import Database, from_json, placeholders, to_json

KINDS = ("generate", "train")
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
# Claim order: interactive generations before trainings, each first come, first served, with aging so
# that a steady stream of /imagine cannot starve a training: one that has waited TRAINING_MAX_WAIT_S,
# or seen TRAINING_MAX_OVERTAKES generations asked for after it start before it, goes before every
# generation. (A training re-queued after its worker died has waited since it was first queued.)
# Within each of those, round-robin by person: jobs go by how many jobs of that kind their owner asked
# for in the ROUND_ROBIN_WINDOW_S before them (those that ran or still wait), then first come, first
# served. One person's second picture waits behind everyone else's first, so three pictures of one
# person never make another wait behind all three, even once the first of them has finished.
TRAINING_MAX_WAIT_S = 120.0
TRAINING_MAX_OVERTAKES = 10
ROUND_ROBIN_WINDOW_S = 3600.0
# The `error` of a job an operator cancelled with /admin cancel (its owner is told so).
CANCELLED_BY_OPERATOR = "An operator of this bot cancelled it."
_CLAIM_ORDER = """CASE WHEN q.kind = 'generate' THEN 1
    WHEN q.created_at <= ? OR (SELECT count(*) FROM jobs AS g WHERE g.kind = 'generate' AND g.id > q.id
                               AND g.started_at IS NOT NULL) >= ? THEN 0
    ELSE 2 END,
    (SELECT count(*) FROM jobs AS o WHERE o.owner = q.owner AND o.kind = q.kind AND o.id < q.id
     AND o.created_at > q.created_at - ? AND (o.started_at IS NOT NULL OR o.state IN ('queued', 'running'))),
    q.id"""


def _claim_order_args(now: float | None) -> tuple[float, int, float]:
    """The values `_CLAIM_ORDER`'s placeholders take at ``now``."""
    aged = (time.time() if now is None else now) - TRAINING_MAX_WAIT_S
    return aged, TRAINING_MAX_OVERTAKES, ROUND_ROBIN_WINDOW_S


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    owner: int
    state: str
    params: dict[str, Any]
    progress: dict[str, Any]
    channel_id: int | None
    message_id: int | None
    result: dict[str, Any] | None
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    worker_id: str | None
    lease_expires_at: float | None
    attempts: int
    checkpoint_path: str | None
    cancel_requested: bool
    restarts: int  # bot restarts that interrupted it (apart from `attempts`, which count workers lost)
    result_channel_id: int | None  # the message that showed its result with pictures, if one was sent
    result_message_id: int | None
    guild_id: int | None  # the server its quota counts against (None: none, e.g. a user install in DMs)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        values = dict(row)
        for key in ("params", "progress", "result"):
            values[key] = from_json(values[key])
        values["cancel_requested"] = bool(values["cancel_requested"])
        return cls(**values)


def with_progress(job: Job, progress: dict[str, Any]) -> Job:
    """The same job with other progress (to report a step without reading the row back)."""
    return dataclasses.replace(job, progress=progress)


def _check(values: Sequence[str], allowed: Sequence[str], what: str) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"unknown job {what} {bad}; expected {allowed}")


async def create_job(
    db: Database,
    kind: str,
    owner: int,
    params: dict[str, Any],
    channel_id: int | None = None,
    message_id: int | None = None,
    guild_id: int | None = None,
    now: float | None = None,
) -> int:
    """Queue a job; return its id. ``message_id`` is the Discord message that shows its progress.
    ``now``: its creation time on the scheduler's clock, which the claim order's aging and the
    quotas (bot.quotas) measure."""
    _check([kind], KINDS, "kind")
    now = time.time() if now is None else now
    return await db.insert(
        "INSERT INTO jobs (kind, owner, params, channel_id, message_id, guild_id, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (kind, owner, to_json(params), channel_id, message_id, guild_id, now, now),
    )


async def get_job(db: Database, job_id: int) -> Job | None:
    row = await db.fetchone("SELECT * FROM jobs WHERE id = ?", (job_id,))
    return Job.from_row(row) if row else None


async def claim_next_job(
    db: Database,
    worker_id: str,
    lease_seconds: float,
    kinds: Sequence[str] = KINDS,
    now: float | None = None,
) -> Job | None:
    """Take the next queued job of ``kinds`` for ``worker_id``, or None if none is waiting.

    Selecting and updating happen in one statement, which SQLite runs under its write lock, so
    concurrent claims (from coroutines, connections or processes) never get the same job.
    """
    _check(kinds, KINDS, "kind")
    now = time.time() if now is None else now
    row = await db.fetchone(
        "UPDATE jobs SET state = 'running', worker_id = ?, lease_expires_at = ?, started_at = ?, "
        "updated_at = ?, attempts = attempts + 1 "
        "WHERE id = (SELECT q.id FROM jobs AS q WHERE q.state = 'queued' "
        f"AND q.kind IN ({placeholders(kinds)}) ORDER BY {_CLAIM_ORDER} LIMIT 1) "
        "RETURNING *",
        (worker_id, now + lease_seconds, now, now, *kinds, *_claim_order_args(now)),
    )
    return Job.from_row(row) if row else None


async def renew_lease(
    db: Database, job_id: int, worker_id: str, lease_seconds: float, now: float | None = None
) -> bool:
    """Extend the lease of a job ``worker_id`` is running; False means the job is no longer its own."""
    now = time.time() if now is None else now
    changed = await db.execute(
        "UPDATE jobs SET lease_expires_at = ?, updated_at = ? "
        "WHERE id = ? AND state = 'running' AND worker_id = ?",
        (now + lease_seconds, now, job_id, worker_id),
    )
    return changed == 1


async def update_progress(db: Database, job_id: int, progress: dict[str, Any]) -> bool:
    """Replace the stored progress of an unfinished job (stage, step, total, loss, ETA ...)."""
    changed = await db.execute(
        "UPDATE jobs SET progress = ?, updated_at = ? WHERE id = ? AND state IN ('queued', 'running')",
        (to_json(progress), time.time(), job_id),
    )
    return changed == 1


async def set_job_message(db: Database, job_id: int, channel_id: int, message_id: int) -> None:
    """Remember which Discord message reports on the job, so a restarted bot keeps editing it."""
    await db.execute(
        "UPDATE jobs SET channel_id = ?, message_id = ?, updated_at = ? WHERE id = ?",
        (channel_id, message_id, time.time(), job_id),
    )


async def set_result_message(db: Database, job_id: int, channel_id: int, message_id: int) -> None:
    """Remember the message that brought the job's result with pictures (a training's samples), so
    that forgetting the person deletes it too."""
    await db.execute("UPDATE jobs SET result_channel_id = ?, result_message_id = ?, updated_at = ? WHERE id = ?",
                     (channel_id, message_id, time.time(), job_id))


async def set_checkpoint(db: Database, job_id: int, relpath: str) -> None:
    """Record the latest checkpoint file (relative to the data folder); training resumes from it."""
    await db.execute(
        "UPDATE jobs SET checkpoint_path = ?, updated_at = ? WHERE id = ?", (relpath, time.time(), job_id)
    )


async def finish_job(
    db: Database,
    job_id: int,
    state: str,
    result: dict[str, Any] | None = None,
    error: str | None = None,
) -> bool:
    """Move a queued or running job to a terminal state; False (and no change) if it already ended."""
    _check([state], TERMINAL_STATES, "final state")
    now = time.time()
    changed = await db.execute(
        "UPDATE jobs SET state = ?, result = ?, error = ?, finished_at = ?, updated_at = ?, "
        "lease_expires_at = NULL WHERE id = ? AND state IN ('queued', 'running')",
        (state, to_json(result) if result is not None else None, error, now, now, job_id),
    )
    return changed == 1


async def request_cancel(db: Database, job_id: int, reason: str | None = None) -> str | None:
    """Cancel a job and return its state afterwards (None if there is no such job).

    A queued job is cancelled at once. A running one is flagged with ``cancel_requested`` and
    stays running until its worker stops and reports; a finished one is left as it is.
    ``reason`` becomes the job's ``error``, kept when it ends (e.g. `CANCELLED_BY_OPERATOR`).
    """
    now = time.time()
    row = await db.fetchone(
        "UPDATE jobs SET "
        "state = CASE state WHEN 'queued' THEN 'cancelled' ELSE state END, "
        "finished_at = CASE state WHEN 'queued' THEN ? ELSE finished_at END, "
        "cancel_requested = 1, error = coalesce(?, error), updated_at = ? "
        "WHERE id = ? AND state IN ('queued', 'running') RETURNING state",
        (now, reason, now, job_id),
    )
    if row is not None:
        return str(row["state"])
    job = await get_job(db, job_id)
    return job.state if job else None


async def requeue(db: Database, job_id: int, *, refund_attempt: bool = False) -> bool:
    """Put one running job back in the queue (its worker was lost), keeping params and checkpoint.

    `refund_attempt`: the job never reached a worker, so its claim does not count as an attempt.
    """
    changed = await db.execute(
        "UPDATE jobs SET state = 'queued', worker_id = NULL, lease_expires_at = NULL, updated_at = ?, "
        "attempts = attempts - ? WHERE id = ? AND state = 'running'",
        (time.time(), 1 if refund_attempt else 0, job_id),
    )
    return changed == 1


async def requeue_interrupted(db: Database, now: float | None = None, all_running: bool = False) -> list[int]:
    """Put running jobs whose lease has expired back in the queue; return their ids in id order.

    At bot start, with ``all_running=True``, every running job is interrupted by definition (no
    worker survives the bot), whatever its lease says: its claim is not counted as an attempt (its
    worker did not fail it), its ``restarts`` go up by one instead. Params and checkpoint are kept,
    so training resumes from its last checkpoint. An interrupted job whose owner had asked to
    cancel it is cancelled instead of queued again.
    """
    now = time.time() if now is None else now
    interrupted = "state = 'running' AND (? OR lease_expires_at IS NULL OR lease_expires_at < ?)"
    restarted = int(all_running)
    async with db.transaction() as tx:
        await tx.execute(
            "UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ?, worker_id = NULL, "
            f"lease_expires_at = NULL WHERE cancel_requested = 1 AND {interrupted}",
            (now, now, int(all_running), now),
        )
        rows = await tx.fetchall(
            "UPDATE jobs SET state = 'queued', worker_id = NULL, lease_expires_at = NULL, updated_at = ?, "
            f"attempts = max(attempts - ?, 0), restarts = restarts + ? WHERE {interrupted} RETURNING id",
            (now, restarted, restarted, int(all_running), now),
        )
    return sorted(row["id"] for row in rows)


async def queue_position(db: Database, job_id: int, now: float | None = None) -> int | None:
    """1-based place of a queued job in claim order at ``now``; None if it is not queued."""
    rows = await db.fetchall(f"SELECT q.id FROM jobs AS q WHERE q.state = 'queued' ORDER BY {_CLAIM_ORDER}",
                             _claim_order_args(now))
    order = [row["id"] for row in rows]
    return order.index(job_id) + 1 if job_id in order else None


def _filters(owner: int | None, kind: str | None, states: Sequence[str] | None) -> tuple[str, list[Any]]:
    clauses: list[str] = ["1"]
    args: list[Any] = []
    if owner is not None:
        clauses.append("owner = ?")
        args.append(owner)
    if kind is not None:
        _check([kind], KINDS, "kind")
        clauses.append("kind = ?")
        args.append(kind)
    if states is not None:
        _check(states, STATES, "state")
        clauses.append(f"state IN ({placeholders(states)})")
        args.extend(states)
    return " AND ".join(clauses), args


async def jobs_for_user(
    db: Database, owner: int, states: Sequence[str] | None = None, kind: str | None = None
) -> list[Job]:
    """The person's jobs, oldest first, optionally only some states or one kind."""
    where, args = _filters(owner, kind, states)
    rows = await db.fetchall(f"SELECT * FROM jobs WHERE {where} ORDER BY id", args)
    return [Job.from_row(row) for row in rows]


async def jobs_in_states(db: Database, states: Sequence[str]) -> list[Job]:
    """Everyone's jobs in ``states``, in claim order (e.g. to refresh progress messages at start)."""
    where, args = _filters(None, None, states)
    rows = await db.fetchall(f"SELECT * FROM jobs AS q WHERE {where} ORDER BY {_CLAIM_ORDER}",
                             [*args, *_claim_order_args(None)])
    return [Job.from_row(row) for row in rows]


async def count_jobs(
    db: Database, owner: int | None, kind: str | None = None, states: Sequence[str] | None = None
) -> int:
    """How many jobs the person (None: everyone) has of ``kind`` in ``states`` (for the limits)."""
    where, args = _filters(owner, kind, states)
    row = await db.fetchone(f"SELECT count(*) FROM jobs WHERE {where}", args)
    return int(row[0]) if row else 0
