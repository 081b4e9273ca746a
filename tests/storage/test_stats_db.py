"""What /admin stats counts, over the last day and week, and whose jobs held the workers longest."""

from __future__ import annotations

import time

import pytest

from storage import bans_db, generations_db, jobs_db, models_db, stats_db, usage_db, users_db
from storage.store import Storage

ALICE, BOB, CAROL = 101, 202, 303
NOW = time.time()
HOUR, DAY = 3600.0, 86400.0


@pytest.fixture
async def store(tmp_path):
    store = await Storage.open(tmp_path)
    for user in (ALICE, BOB, CAROL):
        await users_db.ensure_user(store.db, user)
    yield store
    await store.close()


async def job(store: Storage, kind: str, owner: int, *, created: float, started: float | None = None,
              finished: float | None = None, state: str = "succeeded") -> int:
    """A job with the times given (seconds before NOW)."""
    job_id = await jobs_db.create_job(store.db, kind, owner, {})
    await store.db.execute(
        "UPDATE jobs SET state = ?, created_at = ?, started_at = ?, finished_at = ? WHERE id = ?",
        (state, NOW - created, None if started is None else NOW - started,
         None if finished is None else NOW - finished, job_id))
    return job_id


async def test_a_day_and_a_week_count_people_trainings_pictures_and_what_the_filter_withheld(store):
    db = store.db
    train = await job(store, "train", ALICE, created=2 * HOUR, started=2 * HOUR, finished=HOUR)
    await job(store, "train", BOB, created=3 * DAY, started=3 * DAY, finished=3 * DAY)
    await job(store, "train", CAROL, created=HOUR, started=HOUR, finished=HOUR / 2, state="failed")  # no model
    await job(store, "train", ALICE, created=10 * DAY, started=10 * DAY, finished=10 * DAY)  # too old
    model_id = await models_db.add_model(db, ALICE, train, "users/101/models/a.safetensors", "tiny", {})
    picture = await job(store, "generate", BOB, created=HOUR, started=HOUR, finished=HOUR)
    await generations_db.add_generation(db, BOB, model_id, picture, "p", "", [1, 2, 3, 4], {}, [])
    old = await generations_db.add_generation(db, BOB, model_id, picture, "p", "", [5], {}, [])
    await db.execute("UPDATE generations SET created_at = ? WHERE id = ?", (NOW - 2 * DAY, old))
    await usage_db.record_usage(db, BOB, None, "flagged", 2, now=NOW - HOUR)
    await usage_db.record_usage(db, BOB, None, "flagged", 1, now=NOW - 3 * DAY)

    day = await stats_db.window(db, NOW - DAY)
    week = await stats_db.window(db, NOW - 7 * DAY)
    assert day == stats_db.Window(active_people=3, trainings=1, pictures=4, flagged=2)
    assert week == stats_db.Window(active_people=3, trainings=2, pictures=5, flagged=3)


async def test_totals_count_people_those_with_a_model_and_bans(store):
    db = store.db
    await models_db.add_model(db, ALICE, None, "users/101/models/a.safetensors", "tiny", {})
    await models_db.add_model(db, ALICE, None, "users/101/models/b.safetensors", "tiny", {})
    await bans_db.ban(db, CAROL, banned_by=1)
    assert await stats_db.totals(db) == stats_db.Totals(people=3, with_model=1, banned=1)


async def test_gpu_time_counts_what_ran_in_the_window_and_what_runs_now_most_first(store):
    db = store.db
    await job(store, "train", ALICE, created=3 * HOUR, started=2 * HOUR, finished=HOUR)  # 3600 s
    await job(store, "generate", ALICE, created=HOUR, started=100, finished=40)  # 60 s
    await job(store, "train", BOB, created=HOUR, started=600, state="running")  # 600 s so far
    await job(store, "train", CAROL, created=10 * DAY, started=10 * DAY, finished=10 * DAY - 60)  # before
    await job(store, "train", CAROL, created=HOUR, state="queued")  # never ran
    # A week's window that began in the middle of a job counts the part inside it.
    await job(store, "train", CAROL, created=8 * DAY, started=7 * DAY + 50, finished=7 * DAY - 50)

    top = await stats_db.gpu_seconds_by_person(db, NOW - 7 * DAY, now=NOW)
    assert [owner for owner, _ in top] == [ALICE, BOB, CAROL]
    assert [round(seconds) for _, seconds in top] == [3660, 600, 50]
    assert await stats_db.gpu_seconds_by_person(db, NOW - 7 * DAY, limit=1, now=NOW) == [top[0]]
