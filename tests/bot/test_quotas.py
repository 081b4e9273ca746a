"""Quotas: each limit refuses with the moment the person may try again, lets them once that moment
comes (a rolling 24 hours on a fake clock), follows a server's own limits, and gives back what a job
that failed or never started had counted."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from bot import quotas
from bot.quotas import DAY_S
from bot.scheduler import Refused, Scheduler
from jobs import events
from jobs.payloads import GenerateOutput, Picture, TrainOutput
from jobs.requests import GenerateRequest
from storage import jobs_db, limits_db, usage_db, users_db
from storage.limits_db import Limits
from storage.store import Storage
from tests.bot.test_scheduler import ALICE, BOB, FakeRunner, Recorder, _give_model, _ready_to_train, _settings
from tests.clock import FakeClock
from tests.polling import wait_until

T0 = 1_800_000_000.0
GUILD, OTHER_GUILD = 501, 502
NO_LIMITS = Limits(0, 0, 0, 0, 0)


def stamp(at: float) -> str:
    """How a refusal names a moment: Discord's relative timestamp markup."""
    return f"<t:{math.ceil(at)}:R>"


@pytest.fixture
async def db(tmp_path):
    store = await Storage.open(tmp_path)
    yield store.db
    await store.close()


async def _use(db, owner: int, kind: str, at: float, amount: int = 1, guild_id: int | None = None) -> None:
    await usage_db.record_usage(db, owner, guild_id, kind, amount, now=at)


# ----- the rules, over recorded uses -------------------------------------------------------------


async def test_a_person_s_daily_trainings_run_out_and_come_back_24_hours_after_each(db):
    limits = replace(NO_LIMITS, trainings_per_day=2)
    await _use(db, ALICE, "train", T0)
    assert await quotas.training_refusal(db, limits, ALICE, None, T0 + 60) is None
    await _use(db, ALICE, "train", T0 + 600)
    refusal = await quotas.training_refusal(db, limits, ALICE, None, T0 + 700)
    assert "2 trainings of the last 24 hours" in refusal and stamp(T0 + DAY_S) in refusal
    assert await quotas.training_refusal(db, limits, ALICE, None, T0 + DAY_S - 1) is not None
    assert await quotas.training_refusal(db, limits, ALICE, None, T0 + DAY_S) is None  # the first one left
    assert await quotas.training_refusal(db, limits, BOB, None, T0 + 700) is None  # counted per person


async def test_the_cooldown_counts_from_the_last_training_and_says_when_it_ends(db):
    limits = replace(NO_LIMITS, train_cooldown_min=60)
    assert await quotas.training_refusal(db, limits, ALICE, None, T0) is None  # never trained
    await _use(db, ALICE, "train", T0)
    refusal = await quotas.training_refusal(db, limits, ALICE, None, T0 + 600)
    assert "at least 60 minutes apart" in refusal and stamp(T0 + 3600) in refusal
    assert await quotas.training_refusal(db, limits, ALICE, None, T0 + 3600) is None


async def test_of_several_rules_the_one_that_lets_them_train_last_is_told(db):
    limits = replace(NO_LIMITS, trainings_per_day=1, train_cooldown_min=60)
    await _use(db, ALICE, "train", T0)
    refusal = await quotas.training_refusal(db, limits, ALICE, None, T0 + 60)
    assert "1 training of the last 24 hours" in refusal and stamp(T0 + DAY_S) in refusal


async def test_pictures_count_their_number_and_a_refusal_says_what_is_left_and_when_more_is(db):
    limits = replace(NO_LIMITS, pictures_per_day=10)
    await _use(db, ALICE, "picture", T0, amount=4)
    await _use(db, ALICE, "picture", T0 + 60, amount=4)
    assert await quotas.pictures_refusal(db, limits, ALICE, None, 2, T0 + 120) is None
    refusal = await quotas.pictures_refusal(db, limits, ALICE, None, 4, T0 + 120)
    # After the first four leave the window, four more fit.
    assert "2 of your 10 pictures" in refusal and "ask for 2 or fewer now, or for 4" in refusal
    assert stamp(T0 + DAY_S) in refusal
    await _use(db, ALICE, "picture", T0 + 120, amount=2)
    refusal = await quotas.pictures_refusal(db, limits, ALICE, None, 1, T0 + 180)
    assert "had your 10 pictures" in refusal and stamp(T0 + DAY_S) in refusal
    assert await quotas.pictures_refusal(db, limits, ALICE, None, 4, T0 + DAY_S) is None


async def test_asking_for_more_pictures_than_a_day_allows_says_how_many_may_be_asked(db):
    refusal = await quotas.pictures_refusal(db, replace(NO_LIMITS, pictures_per_day=3), ALICE, None, 4, T0)
    assert "at most 3 pictures a day" in refusal and "3 or fewer" in refusal


async def test_server_totals_count_everyone_of_that_server_and_only_there(db):
    limits = replace(NO_LIMITS, server_trainings_per_day=1, server_pictures_per_day=5)
    await _use(db, ALICE, "train", T0, guild_id=GUILD)
    await _use(db, ALICE, "picture", T0, amount=4, guild_id=GUILD)
    refusal = await quotas.training_refusal(db, limits, BOB, GUILD, T0 + 60)
    assert "This server's 1 training" in refusal and stamp(T0 + DAY_S) in refusal
    refusal = await quotas.pictures_refusal(db, limits, BOB, GUILD, 2, T0 + 60)
    assert "This server's 5 pictures" in refusal and stamp(T0 + DAY_S) in refusal
    assert await quotas.pictures_refusal(db, limits, BOB, GUILD, 1, T0 + 60) is None
    for guild_id in (OTHER_GUILD, None):  # another server, or a DM: that server's total is not theirs
        assert await quotas.training_refusal(db, limits, BOB, guild_id, T0 + 60) is None
        assert await quotas.pictures_refusal(db, limits, BOB, guild_id, 2, T0 + 60) is None


async def test_a_server_s_own_limits_replace_the_defaults_there(db):
    defaults = replace(NO_LIMITS, pictures_per_day=100)
    await limits_db.set_guild_limit(db, GUILD, "pictures_per_day", 2, updated_by=9)
    await _use(db, ALICE, "picture", T0, amount=2, guild_id=GUILD)
    there = await limits_db.limits_for(db, defaults, GUILD)
    assert "had your 2 pictures" in await quotas.pictures_refusal(db, there, ALICE, GUILD, 1, T0 + 1)
    elsewhere = await limits_db.limits_for(db, defaults, OTHER_GUILD)
    assert await quotas.pictures_refusal(db, elsewhere, ALICE, OTHER_GUILD, 1, T0 + 1) is None


async def test_the_queue_takes_at_most_max_queued_jobs_of_everyone(db):
    for owner in (ALICE, BOB):
        await users_db.ensure_user(db, owner)
        await jobs_db.create_job(db, "train", owner, {})
    assert await quotas.queue_refusal(db, 3) is None
    refusal = await quotas.queue_refusal(db, 2)
    assert "queue is full" in refusal and "try again in a few minutes" in refusal


async def test_status_tells_what_is_left_and_when_the_next_training_may_start(db):
    limits = Limits(2, 10, 60, 20, 5)
    await _use(db, ALICE, "train", T0, guild_id=GUILD)
    await _use(db, ALICE, "picture", T0, amount=3, guild_id=GUILD)
    await _use(db, BOB, "picture", T0, amount=1, guild_id=GUILD)
    left = await quotas.allowance(db, limits, ALICE, GUILD, T0 + 60)
    assert (left.trainings_left, left.pictures_left, left.server_pictures_left) == (1, 7, 1)
    text = quotas.describe(left, T0 + 60)
    assert "1 of 2 trainings and 7 of 10 pictures" in text
    assert "This server has 1 picture left for everyone together" in text
    assert f"You can train again {stamp(T0 + 3600)}" in text
    assert quotas.describe(await quotas.allowance(db, NO_LIMITS, ALICE, GUILD, T0), T0) is None


# ----- in the scheduler: counted when queued, given back by the refund rule ----------------------



@pytest.fixture
async def env(tmp_path):
    store = await Storage.open(tmp_path)
    runner, clock = FakeRunner(capacity=0), FakeClock(T0)
    settings = _settings(tmp_path, TRAININGS_PER_DAY="2", TRAIN_COOLDOWN_MIN="60", PICTURES_PER_DAY="6",
                         MAX_QUEUED_GENERATIONS="3", MAX_QUEUED_JOBS="4")
    scheduler = Scheduler(store, runner, settings, Recorder(), clock=clock)
    for user, handle in ((ALICE, "zqalice"), (BOB, "zqbob")):
        await _ready_to_train(store, user, handle)
        await _give_model(store, user, handle)
    await scheduler.start()
    yield store, runner, scheduler, clock
    await scheduler.stop()
    await store.close()


async def _run(runner: FakeRunner, scheduler: Scheduler, job_id: int) -> None:
    """Let the worker take the job: it is running."""
    runner.capacity = 1
    scheduler.wake()
    await wait_until(lambda: job_id in runner.running, interval=0.01)
    runner.capacity = 0


async def _used(store, owner: int, kind: str) -> int:
    return sum(amount for _, amount in await usage_db.uses_after(store.db, kind, 0, owner=owner))


async def test_trainings_are_refused_with_when_and_allowed_again_on_the_clock(env):
    store, runner, scheduler, clock = env
    first, _ = await scheduler.enqueue_train(ALICE, guild_id=GUILD)
    assert first.guild_id == GUILD and first.created_at == T0
    await _run(runner, scheduler, first.id)
    await runner.emit(first.id, events.Done(TrainOutput(b"L", None, {}, 1, 0.1)))
    clock.now = T0 + 1800
    with pytest.raises(Refused, match="60 minutes apart") as refused:
        await scheduler.enqueue_train(ALICE, guild_id=GUILD)
    assert stamp(T0 + 3600) in refused.value.message
    clock.now = T0 + 3600
    second, _ = await scheduler.enqueue_train(ALICE, guild_id=GUILD)
    await _run(runner, scheduler, second.id)
    await runner.emit(second.id, events.Done(TrainOutput(b"L", None, {}, 1, 0.1)))
    clock.now = T0 + 2 * 3600
    with pytest.raises(Refused, match="2 trainings of the last 24 hours") as refused:
        await scheduler.enqueue_train(ALICE)
    assert stamp(T0 + DAY_S) in refused.value.message
    clock.now = T0 + DAY_S
    await scheduler.enqueue_train(ALICE)


async def test_pictures_count_what_was_asked_for(env):
    store, runner, scheduler, clock = env
    await scheduler.enqueue_generate(ALICE, GenerateRequest("a", num_images=4))
    await scheduler.enqueue_generate(ALICE, GenerateRequest("b", num_images=2))
    assert await _used(store, ALICE, "picture") == 6
    with pytest.raises(Refused, match="had your 6 pictures"):
        await scheduler.enqueue_generate(ALICE, GenerateRequest("c"))
    assert len(await jobs_db.jobs_for_user(store.db, ALICE)) == 2  # the refused one was not queued


async def test_a_full_queue_refuses_everyone(env):
    store, runner, scheduler, clock = env
    for n in range(3):
        await scheduler.enqueue_generate(ALICE, GenerateRequest(f"a{n}"))
    await scheduler.enqueue_generate(BOB, GenerateRequest("b"))
    with pytest.raises(Refused, match="queue is full"):
        await scheduler.enqueue_train(BOB)


async def test_what_never_ran_or_failed_is_given_back_what_ran_is_not(env):
    store, runner, scheduler, clock = env
    # Cancelled while queued: given back.
    await scheduler.enqueue_generate(ALICE, GenerateRequest("a", num_images=4))
    await scheduler.cancel_user_jobs(ALICE)
    assert await _used(store, ALICE, "picture") == 0
    # Failed (here its worker was lost twice): given back.
    failed, _ = await scheduler.enqueue_generate(ALICE, GenerateRequest("b", num_images=3))
    for _ in range(2):
        await _run(runner, scheduler, failed.id)
        await runner.emit(failed.id, events.WorkerLost("The worker stopped."))
    assert (await jobs_db.get_job(store.db, failed.id)).state == "failed"
    assert await _used(store, ALICE, "picture") == 0
    # Succeeded: counted.
    done, _ = await scheduler.enqueue_generate(ALICE, GenerateRequest("c", num_images=2))
    await _run(runner, scheduler, done.id)
    await runner.emit(done.id, events.Done(GenerateOutput([Picture(b"png", 1), Picture(b"png", 2)])))
    assert await _used(store, ALICE, "picture") == 2
    # Cancelled while it ran: counted.
    stopped, _ = await scheduler.enqueue_generate(ALICE, GenerateRequest("d", num_images=1))
    await _run(runner, scheduler, stopped.id)
    await scheduler.cancel_user_jobs(ALICE)
    await runner.emit(stopped.id, events.Error("The job was cancelled.", code="cancelled"))
    assert (await jobs_db.get_job(store.db, stopped.id)).state == "cancelled"
    assert await _used(store, ALICE, "picture") == 3
    # A training cancelled before it started leaves no cooldown either.
    await scheduler.enqueue_train(ALICE)
    await scheduler.cancel_user_jobs(ALICE)
    await scheduler.enqueue_train(ALICE)


async def test_forgetting_oneself_does_not_reset_the_quota(env):
    store, runner, scheduler, clock = env
    done, _ = await scheduler.enqueue_generate(ALICE, GenerateRequest("a", num_images=4))
    await _run(runner, scheduler, done.id)
    await runner.emit(done.id, events.Done(GenerateOutput([Picture(b"png", n) for n in range(4)])))
    await scheduler.forget(ALICE)
    await _ready_to_train(store, ALICE, "zqalice")
    await _give_model(store, ALICE, "zqalice")
    with pytest.raises(Refused, match="2 of your 6 pictures"):
        await scheduler.enqueue_generate(ALICE, GenerateRequest("b", num_images=4))
