"""The scheduler's picking order under load: pictures go first, but a steady stream of /imagine
cannot keep a training waiting for more than a bounded time or number of pictures."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bot.scheduler import Scheduler
from jobs import events
from jobs.payloads import GenerateOutput, Picture
from jobs.requests import GenerateRequest
from storage import jobs_db
from storage.store import Storage
from tests.bot.test_scheduler import ALICE, BOB, FakeRunner, Recorder, _give_model, _ready_to_train, _settings
from tests.clock import FakeClock
from tests.polling import wait_until


@pytest.fixture
async def env(tmp_path):
    store = await Storage.open(tmp_path)
    runner, clock = FakeRunner(capacity=1), FakeClock()
    scheduler = Scheduler(store, runner, _settings(tmp_path, MAX_QUEUED_GENERATIONS="2"), Recorder(), clock=clock)
    await _ready_to_train(store, ALICE, "zqalice")
    await _ready_to_train(store, BOB, "zqbob")
    await _give_model(store, BOB, "zqbob")
    await scheduler.start()
    yield store, runner, scheduler, clock
    await scheduler.stop()
    await store.close()


async def _finish_running_picture(runner: FakeRunner) -> None:
    """The worker finishes the picture it holds; the scheduler hands it the next job."""
    [(job_id, item)] = runner.running.items()
    assert item.kind == "generate"
    before = len(runner.submitted)
    await runner.emit(job_id, events.Done(GenerateOutput([Picture(b"png", 1)])))
    await wait_until(lambda: len(runner.submitted) > before, interval=0.01)


async def test_a_training_goes_after_at_most_n_pictures_asked_for_after_it(env):
    store, runner, scheduler, clock = env
    await scheduler.enqueue_generate(BOB, GenerateRequest("first"))
    await wait_until(lambda: runner.running, interval=0.01)
    training, position = await scheduler.enqueue_train(ALICE)
    assert position == 1
    went_first = 0
    while runner.submitted[-1].job_id != training.id:  # Bob keeps asking; no time passes
        await scheduler.enqueue_generate(BOB, GenerateRequest("more"))
        expected = 2 if went_first < jobs_db.TRAINING_MAX_OVERTAKES else 1  # what /status shows
        assert await jobs_db.queue_position(store.db, training.id, now=clock()) == expected
        await _finish_running_picture(runner)
        went_first += runner.submitted[-1].kind == "generate"
    assert went_first == jobs_db.TRAINING_MAX_OVERTAKES
    assert [item.kind for item in runner.submitted[1:]] == ["generate"] * went_first + ["train"]


async def test_a_training_goes_next_once_it_has_waited_long_enough(env):
    store, runner, scheduler, clock = env
    await scheduler.enqueue_generate(BOB, GenerateRequest("first"))
    await wait_until(lambda: runner.running, interval=0.01)
    training, _ = await scheduler.enqueue_train(ALICE)
    waiting, _ = await scheduler.enqueue_generate(BOB, GenerateRequest("second"))
    assert await jobs_db.queue_position(store.db, training.id, now=clock()) == 2  # pictures first ...
    clock.now += jobs_db.TRAINING_MAX_WAIT_S + 1
    assert await jobs_db.queue_position(store.db, training.id, now=clock()) == 1  # ... until it waited
    await _finish_running_picture(runner)
    assert runner.submitted[-1].job_id == training.id
    assert (await jobs_db.get_job(store.db, waiting.id)).state == "queued"


async def test_pictures_go_round_robin_by_person(env):
    """Alice's three pictures do not make Bob wait behind all three: his first goes before her second."""
    store, runner, scheduler, clock = env
    await _give_model(store, ALICE, "zqalice")
    scheduler.settings = replace(scheduler.settings, max_queued_generations=3)
    runner.capacity = 0  # nothing is taken while they ask
    alice = [(await scheduler.enqueue_generate(ALICE, GenerateRequest(f"a{n}")))[0] for n in range(3)]
    bob, bob_position = await scheduler.enqueue_generate(BOB, GenerateRequest("b"))
    assert bob_position == 2  # what his /imagine showed: only Alice's first is before his
    claim_order = [alice[0].id, bob.id, alice[1].id, alice[2].id]
    assert [await jobs_db.queue_position(store.db, j, now=clock()) for j in claim_order] == [1, 2, 3, 4]
    runner.capacity = 1
    scheduler.wake()
    await wait_until(lambda: runner.running, interval=0.01)
    while len(runner.submitted) < len(claim_order):
        await _finish_running_picture(runner)
    assert [item.job_id for item in runner.submitted] == claim_order


async def test_a_person_with_a_picture_running_waits_behind_one_without(env):
    store, runner, scheduler, clock = env
    await _give_model(store, ALICE, "zqalice")
    running, _ = await scheduler.enqueue_generate(BOB, GenerateRequest("b1"))
    await wait_until(lambda: running.id in runner.running, interval=0.01)
    bob_next, _ = await scheduler.enqueue_generate(BOB, GenerateRequest("b2"))
    alice, _ = await scheduler.enqueue_generate(ALICE, GenerateRequest("a1"))
    assert await jobs_db.queue_position(store.db, alice.id, now=clock()) == 1
    assert await jobs_db.queue_position(store.db, bob_next.id, now=clock()) == 2
    await _finish_running_picture(runner)
    assert runner.submitted[-1].job_id == alice.id
