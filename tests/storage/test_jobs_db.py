"""The job queue: claim order, positions, leases, cancellation, crash recovery, concurrent claims."""

from __future__ import annotations

import asyncio

import pytest

from storage import jobs_db, users_db
from storage.db import Database
from storage.store import DB_NAME, Storage

ALICE, BOB = 101, 202


@pytest.fixture
async def db(tmp_path):
    store = await Storage.open(tmp_path)
    for user in (ALICE, BOB):
        await users_db.ensure_user(store.db, user)
    yield store.db
    await store.close()


async def _claim_all(db: Database, worker: str = "w") -> list[int]:
    claimed = []
    while (job := await jobs_db.claim_next_job(db, worker, 60)) is not None:
        claimed.append(job.id)
    return claimed


async def test_create_and_get_job(db):
    job_id = await jobs_db.create_job(db, "train", ALICE, {"steps": 400}, channel_id=5, message_id=6)
    job = await jobs_db.get_job(db, job_id)
    assert job is not None
    assert (job.kind, job.owner, job.state, job.params) == ("train", ALICE, "queued", {"steps": 400})
    assert (job.channel_id, job.message_id, job.progress, job.result, job.attempts) == (5, 6, {}, None, 0)
    assert await jobs_db.get_job(db, job_id + 1) is None
    with pytest.raises(ValueError):
        await jobs_db.create_job(db, "paint", ALICE, {})


async def test_generations_are_claimed_before_trainings_then_first_come_first_served(db):
    t1 = await jobs_db.create_job(db, "train", ALICE, {})
    g1 = await jobs_db.create_job(db, "generate", BOB, {})
    t2 = await jobs_db.create_job(db, "train", BOB, {})
    g2 = await jobs_db.create_job(db, "generate", ALICE, {})
    assert await _claim_all(db) == [g1, g2, t1, t2]


async def test_claim_sets_running_state_worker_lease_and_attempt(db):
    job_id = await jobs_db.create_job(db, "generate", ALICE, {})
    job = await jobs_db.claim_next_job(db, "gpu-0", 30, now=1000.0)
    assert job is not None and job.id == job_id
    assert (job.state, job.worker_id, job.lease_expires_at, job.started_at, job.attempts) == (
        "running",
        "gpu-0",
        1030.0,
        1000.0,
        1,
    )
    assert await jobs_db.claim_next_job(db, "gpu-1", 30) is None


async def test_claim_only_the_kinds_asked_for(db):
    g = await jobs_db.create_job(db, "generate", ALICE, {})
    t = await jobs_db.create_job(db, "train", ALICE, {})
    job = await jobs_db.claim_next_job(db, "trainer", 60, kinds=("train",))
    assert job is not None and job.id == t
    job = await jobs_db.claim_next_job(db, "trainer", 60, kinds=("train",))
    assert job is None
    assert (await jobs_db.get_job(db, g)).state == "queued"


async def test_queue_positions_follow_claim_order(db):
    t1 = await jobs_db.create_job(db, "train", ALICE, {})
    g1 = await jobs_db.create_job(db, "generate", BOB, {})
    t2 = await jobs_db.create_job(db, "train", BOB, {})
    g2 = await jobs_db.create_job(db, "generate", ALICE, {})
    assert [await jobs_db.queue_position(db, j) for j in (g1, g2, t1, t2)] == [1, 2, 3, 4]
    await jobs_db.claim_next_job(db, "w", 60)  # takes g1
    assert await jobs_db.queue_position(db, g1) is None
    assert [await jobs_db.queue_position(db, j) for j in (g2, t1, t2)] == [1, 2, 3]
    assert await jobs_db.queue_position(db, 9999) is None


async def test_cancel_a_queued_job_ends_it_at_once(db):
    job_id = await jobs_db.create_job(db, "train", ALICE, {})
    assert await jobs_db.request_cancel(db, job_id) == "cancelled"
    job = await jobs_db.get_job(db, job_id)
    assert job.state == "cancelled" and job.finished_at is not None
    assert await jobs_db.claim_next_job(db, "w", 60) is None


async def test_cancel_a_running_job_asks_its_worker(db):
    job_id = await jobs_db.create_job(db, "train", ALICE, {})
    await jobs_db.claim_next_job(db, "w", 60)
    assert await jobs_db.request_cancel(db, job_id) == "running"
    job = await jobs_db.get_job(db, job_id)
    assert job.state == "running" and job.cancel_requested
    assert await jobs_db.finish_job(db, job_id, "cancelled", error="Stopped as you asked.")
    assert (await jobs_db.get_job(db, job_id)).state == "cancelled"


async def test_cancel_leaves_finished_and_unknown_jobs_alone(db):
    job_id = await jobs_db.create_job(db, "generate", ALICE, {})
    await jobs_db.claim_next_job(db, "w", 60)
    await jobs_db.finish_job(db, job_id, "succeeded", result={"generation_id": 3})
    assert await jobs_db.request_cancel(db, job_id) == "succeeded"
    assert not (await jobs_db.get_job(db, job_id)).cancel_requested
    assert await jobs_db.request_cancel(db, 9999) is None


async def test_finish_never_overwrites_a_terminal_state(db):
    job_id = await jobs_db.create_job(db, "generate", ALICE, {})
    await jobs_db.claim_next_job(db, "w", 60)
    assert await jobs_db.finish_job(db, job_id, "failed", error="Out of memory.")
    assert not await jobs_db.finish_job(db, job_id, "succeeded", result={"x": 1})
    job = await jobs_db.get_job(db, job_id)
    assert (job.state, job.error, job.result) == ("failed", "Out of memory.", None)
    with pytest.raises(ValueError):
        await jobs_db.finish_job(db, job_id, "running")


async def test_progress_message_and_checkpoint_are_stored(db):
    job_id = await jobs_db.create_job(db, "train", ALICE, {})
    await jobs_db.claim_next_job(db, "w", 60)
    assert await jobs_db.update_progress(db, job_id, {"step": 10, "total": 400, "loss": 0.12})
    await jobs_db.set_job_message(db, job_id, 77, 88)
    await jobs_db.set_checkpoint(db, job_id, "users/101/checkpoints/abc.zip")
    job = await jobs_db.get_job(db, job_id)
    assert job.progress == {"step": 10, "total": 400, "loss": 0.12}
    assert (job.channel_id, job.message_id, job.checkpoint_path) == (77, 88, "users/101/checkpoints/abc.zip")
    assert jobs_db.with_progress(job, {"step": 11}).progress == {"step": 11}
    await jobs_db.finish_job(db, job_id, "succeeded")
    assert not await jobs_db.update_progress(db, job_id, {"step": 12})


async def test_only_the_holder_renews_a_lease(db):
    job_id = await jobs_db.create_job(db, "train", ALICE, {})
    await jobs_db.claim_next_job(db, "w1", 60, now=0.0)
    assert await jobs_db.renew_lease(db, job_id, "w1", 60, now=50.0)
    assert (await jobs_db.get_job(db, job_id)).lease_expires_at == 110.0
    assert not await jobs_db.renew_lease(db, job_id, "w2", 60, now=50.0)


async def test_expired_leases_are_requeued_keeping_params_and_checkpoint(db):
    stale = await jobs_db.create_job(db, "train", ALICE, {"steps": 800})
    live = await jobs_db.create_job(db, "train", BOB, {})
    await jobs_db.claim_next_job(db, "w1", 60, now=0.0)
    await jobs_db.claim_next_job(db, "w2", 60, now=0.0)
    await jobs_db.set_checkpoint(db, stale, "users/101/checkpoints/step200.zip")
    await jobs_db.renew_lease(db, live, "w2", 60, now=50.0)

    assert await jobs_db.requeue_interrupted(db, now=100.0) == [stale]
    job = await jobs_db.get_job(db, stale)
    assert (job.state, job.worker_id, job.lease_expires_at) == ("queued", None, None)
    assert (job.params, job.checkpoint_path, job.attempts) == (
        {"steps": 800},
        "users/101/checkpoints/step200.zip",
        1,
    )
    assert (await jobs_db.get_job(db, live)).state == "running"
    again = await jobs_db.claim_next_job(db, "w3", 60, now=101.0)
    assert again.id == stale and again.attempts == 2 and again.checkpoint_path.endswith("step200.zip")


async def test_at_start_every_running_job_is_requeued_and_cancelled_ones_end(db):
    a = await jobs_db.create_job(db, "train", ALICE, {})
    b = await jobs_db.create_job(db, "generate", BOB, {})
    c = await jobs_db.create_job(db, "generate", ALICE, {})
    for _ in range(3):
        await jobs_db.claim_next_job(db, "w", 3600, now=0.0)
    await jobs_db.request_cancel(db, c)
    assert await jobs_db.requeue_interrupted(db, now=1.0, all_running=True) == [a, b]
    assert [(await jobs_db.get_job(db, j)).state for j in (a, b, c)] == ["queued", "queued", "cancelled"]
    # A restart is not the worker's failure: the claim it interrupted is given back, and counted apart.
    assert [((job := await jobs_db.get_job(db, j)).attempts, job.restarts) for j in (a, b)] == [(0, 1), (0, 1)]
    assert (await jobs_db.claim_next_job(db, "w", 3600, now=2.0)).id == b  # pictures go first
    assert await jobs_db.requeue_interrupted(db, now=3.0, all_running=True) == [b]
    assert [((job := await jobs_db.get_job(db, j)).attempts, job.restarts) for j in (a, b)] == [(0, 1), (0, 2)]


async def test_requeue_one_lost_job(db):
    job_id = await jobs_db.create_job(db, "train", ALICE, {})
    await jobs_db.claim_next_job(db, "w", 60)
    assert await jobs_db.requeue(db, job_id)
    assert await jobs_db.queue_position(db, job_id) == 1
    assert not await jobs_db.requeue(db, job_id)


async def test_listing_and_counting_jobs(db):
    t = await jobs_db.create_job(db, "train", ALICE, {})
    g1 = await jobs_db.create_job(db, "generate", ALICE, {})
    g2 = await jobs_db.create_job(db, "generate", ALICE, {})
    other = await jobs_db.create_job(db, "generate", BOB, {})
    await jobs_db.request_cancel(db, g2)
    assert [j.id for j in await jobs_db.jobs_for_user(db, ALICE)] == [t, g1, g2]
    assert [j.id for j in await jobs_db.jobs_for_user(db, ALICE, states=("queued", "running"))] == [t, g1]
    assert [j.id for j in await jobs_db.jobs_for_user(db, ALICE, kind="generate")] == [g1, g2]
    assert await jobs_db.count_jobs(db, ALICE, "generate", ("queued",)) == 1
    assert await jobs_db.count_jobs(db, ALICE, "train", ("queued", "running")) == 1
    assert await jobs_db.count_jobs(db, ALICE) == 3
    assert [j.id for j in await jobs_db.jobs_in_states(db, ("queued",))] == [g1, other, t]
    with pytest.raises(ValueError):
        await jobs_db.count_jobs(db, ALICE, states=("done",))


async def test_concurrent_claims_from_two_connections_never_share_a_job(tmp_path, db):
    ids = [await jobs_db.create_job(db, "generate" if i % 3 else "train", ALICE, {}) for i in range(60)]
    second = await Database.open(tmp_path / DB_NAME)
    try:
        first_claims, second_claims = await asyncio.gather(_claim_all(db, "a"), _claim_all(second, "b"))
    finally:
        await second.close()
    claimed = first_claims + second_claims
    assert sorted(claimed) == sorted(ids)
    assert len(set(claimed)) == len(claimed)
    assert {j.worker_id for j in await jobs_db.jobs_in_states(db, ("running",))} <= {"a", "b"}


async def test_requeue_can_refund_the_attempt_of_a_job_that_never_reached_a_worker(db):
    job_id = await jobs_db.create_job(db, "train", ALICE, {})
    await jobs_db.claim_next_job(db, "w", 60)
    assert await jobs_db.requeue(db, job_id, refund_attempt=True)
    assert (await jobs_db.get_job(db, job_id)).attempts == 0
    await jobs_db.claim_next_job(db, "w", 60)
    assert await jobs_db.requeue(db, job_id)
    assert (await jobs_db.get_job(db, job_id)).attempts == 1


async def _created_at(db: Database, job_id: int) -> float:
    return (await jobs_db.get_job(db, job_id)).created_at


async def test_a_training_that_waited_long_enough_goes_before_pictures(db):
    train = await jobs_db.create_job(db, "train", ALICE, {})
    gens = [await jobs_db.create_job(db, "generate", BOB, {}) for _ in range(3)]
    queued_at = await _created_at(db, train)
    soon, late = queued_at + jobs_db.TRAINING_MAX_WAIT_S - 1, queued_at + jobs_db.TRAINING_MAX_WAIT_S
    assert await jobs_db.queue_position(db, train, now=soon) == 4
    assert (await jobs_db.claim_next_job(db, "w", 60, now=soon)).id == gens[0]
    assert await jobs_db.queue_position(db, train, now=late) == 1
    assert [await jobs_db.queue_position(db, g, now=late) for g in gens[1:]] == [2, 3]
    assert (await jobs_db.claim_next_job(db, "w", 60, now=late)).id == train
    assert [(await jobs_db.claim_next_job(db, "w", 60, now=late)).id for _ in gens[1:]] == gens[1:]


async def test_a_training_goes_next_once_enough_pictures_asked_after_it_went_first(db):
    earlier = await jobs_db.create_job(db, "generate", BOB, {})  # asked before: not jumping the queue
    train = await jobs_db.create_job(db, "train", ALICE, {})
    later = [await jobs_db.create_job(db, "generate", BOB, {}) for _ in range(jobs_db.TRAINING_MAX_OVERTAKES + 2)]
    now = await _created_at(db, train)  # no time passes: only the count ages it
    order = [(await jobs_db.claim_next_job(db, "w", 60, now=now)).id for _ in range(len(later) + 2)]
    overtakes = jobs_db.TRAINING_MAX_OVERTAKES
    assert order == [earlier, *later[:overtakes], train, *later[overtakes:]]


async def test_a_picture_cancelled_while_queued_does_not_count_as_going_first(db):
    train = await jobs_db.create_job(db, "train", ALICE, {})
    for _ in range(jobs_db.TRAINING_MAX_OVERTAKES):
        await jobs_db.request_cancel(db, await jobs_db.create_job(db, "generate", BOB, {}))
    picture = await jobs_db.create_job(db, "generate", BOB, {})
    assert (await jobs_db.claim_next_job(db, "w", 60, now=await _created_at(db, train))).id == picture
