"""Scheduling rules and event handling, with an in-process runner standing in for the workers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.config import load_settings
from bot.scheduler import MAX_RESTARTS, Refused, Scheduler
from jobs import events
from jobs.payloads import GenerateOutput, Picture, TrainOutput, WorkItem
from jobs.requests import GenerateRequest
from jobs.runner import JobRunner
from storage import generations_db, jobs_db, models_db, photos_db, users_db
from storage.store import Storage
from tests.polling import wait_until

ALICE, BOB = 1001, 1002


class FakeRunner(JobRunner):
    """Accepts up to `capacity` items and lets the test play the worker's events."""

    def __init__(self, capacity: int = 1) -> None:
        self.capacity = capacity
        self.running: dict[int, WorkItem] = {}
        self.submitted: list[WorkItem] = []
        self.cancelled: list[int] = []
        self.forgotten: list[str] = []
        self.forgotten_jobs: list[int] = []

    async def start(self, on_event):
        self.on_event = on_event

    async def stop(self):
        pass

    def workers_online(self) -> int:
        return 1 if self.capacity else 0

    def idle_capacity(self, kind: str | None = None) -> int:
        return self.capacity - len(self.running)

    async def submit(self, item: WorkItem) -> None:
        self.running[item.job_id] = item
        self.submitted.append(item)

    async def cancel(self, job_id: int) -> None:
        self.cancelled.append(job_id)

    async def forget_adapter(self, key: str) -> None:
        self.forgotten.append(key)

    async def forget_jobs(self, job_ids) -> None:
        self.forgotten_jobs.extend(job_ids)

    async def emit(self, job_id: int, event: events.Event) -> None:
        if isinstance(event, events.FINAL):
            self.running.pop(job_id, None)
        await self.on_event(job_id, event)
        await asyncio.sleep(0.01)  # let the dispatch loop run


class Recorder:
    def __init__(self) -> None:
        self.updates: list[tuple[int, str]] = []
        self.shown: list[tuple[int, dict]] = []  # the progress each update would show
        self.finished: list[tuple[int, str, dict]] = []

    async def job_updated(self, job, event):
        self.updates.append((job.id, event.type))
        self.shown.append((job.id, job.progress))

    async def job_finished(self, job, outcome):
        self.finished.append((job.id, job.state, outcome))


def _settings(tmp_path: Path, **extra: str):
    return load_settings({"DISCORD_TOKEN": "t" * 30, "DATA_DIR": str(tmp_path), "MIN_PHOTOS": "2", **extra},
                         env_file=None)


@pytest.fixture
async def env(tmp_path: Path):
    settings = _settings(tmp_path, MAX_QUEUED_GENERATIONS="2")
    store = await Storage.open(tmp_path)
    runner, observer = FakeRunner(), Recorder()
    scheduler = Scheduler(store, runner, settings, observer)
    await scheduler.start()
    yield store, runner, observer, scheduler
    await scheduler.stop()
    await store.close()


async def _ready_to_train(store: Storage, user: int, handle: str, photos: int = 2) -> None:
    await users_db.ensure_user(store.db, user)
    await users_db.set_handle(store.db, user, handle, "woman")
    for i in range(photos):
        path = store.files.write(user, "photos", f"png-{user}-{i}".encode(), ".png")
        await photos_db.add_photo(store.db, user, sha256=f"{user}{i}", phash=i, path=path, byte_size=5,
                                  width=512, height=512)


async def _give_model(store: Storage, user: int, handle: str) -> int:
    path = store.files.write(user, "models", b"lora-bytes", ".safetensors")
    return await models_db.add_model(store.db, user, None, path, "tiny", {"handle": handle, "class_word": "woman"})


async def test_train_preconditions_are_refused_with_reasons(env):
    store, runner, observer, scheduler = env
    await users_db.ensure_user(store.db, ALICE)
    with pytest.raises(Refused, match="Pick your handle first"):
        await scheduler.enqueue_train(ALICE)
    await users_db.set_handle(store.db, ALICE, "zqalice", "woman")
    with pytest.raises(Refused, match="You have 0 photo"):
        await scheduler.enqueue_train(ALICE)
    await _ready_to_train(store, BOB, "zqbob")
    runner.capacity = 0  # keep it queued to see its position
    job, position = await scheduler.enqueue_train(BOB, steps=100)
    assert position == 1 and job.params["config"]["steps"] == 100
    with pytest.raises(Refused, match="already training or waiting"):
        await scheduler.enqueue_train(BOB)


async def test_training_runs_with_photo_bytes_and_stores_model(env):
    store, runner, observer, scheduler = env
    await _ready_to_train(store, ALICE, "zqalice")
    job, _ = await scheduler.enqueue_train(ALICE)
    await asyncio.sleep(0.05)
    item = runner.submitted[-1]
    assert item.kind == "train" and sorted(item.inputs.photos) == [b"png-1001-0", b"png-1001-1"]
    assert item.inputs.checkpoint is None
    # The worker trains with the bot's rules: two photos are enough here (MIN_PHOTOS=2), not its own 5.
    assert item.params.config.min_photos == 2
    await runner.emit(job.id, events.Progress(5, 10, loss=0.1, eta_s=3))
    assert (await jobs_db.get_job(store.db, job.id)).progress["step"] == 5
    await runner.emit(job.id, events.Checkpoint(5, b"ckpt"))
    stored = await jobs_db.get_job(store.db, job.id)
    assert store.files.read(stored.checkpoint_path, ALICE) == b"ckpt"
    await runner.emit(job.id, events.Done(TrainOutput(
        b"L", b"K", {"handle": "zqalice", "class_word": "woman", "base_model": "tiny"}, 10, 0.05,
        [Picture(b"S", 0)], ["h"])))
    finished = await jobs_db.get_job(store.db, job.id)
    assert finished.state == "succeeded"
    model = await models_db.get_active_model(store.db, ALICE)
    assert store.files.read(model.lora_path, ALICE) == b"L"
    assert store.files.read(model.metadata["kohya_path"], ALICE) == b"K"
    assert not store.files.resolve(stored.checkpoint_path).exists()  # checkpoint removed once done
    assert observer.finished[-1][1] == "succeeded" and observer.finished[-1][2]["samples"][0].png == b"S"


async def test_generation_goes_before_training_and_limits_apply(env):
    store, runner, observer, scheduler = env
    await _ready_to_train(store, ALICE, "zqalice")
    await _ready_to_train(store, BOB, "zqbob")
    await _give_model(store, BOB, "zqbob")
    runner.capacity = 0  # hold everything in the queue
    train_job, _ = await scheduler.enqueue_train(ALICE)
    gen1, pos1 = await scheduler.enqueue_generate(BOB, GenerateRequest("on the moon"))
    gen2, pos2 = await scheduler.enqueue_generate(BOB, GenerateRequest("in paris"))
    assert (pos1, pos2) == (1, 2)
    assert await jobs_db.queue_position(store.db, train_job.id) == 3
    with pytest.raises(Refused, match="already have 2 pictures waiting"):
        await scheduler.enqueue_generate(BOB, GenerateRequest("third"))
    with pytest.raises(Refused, match="limit is 600"):
        await scheduler.enqueue_generate(BOB, GenerateRequest("x" * 601))
    with pytest.raises(Refused, match="^That negative prompt is 6000 characters; the limit is 600"):
        await scheduler.enqueue_generate(BOB, GenerateRequest("x", negative_prompt="y" * 6000))
    assert await jobs_db.count_jobs(store.db, BOB, "generate", ("queued",)) == 2  # neither was queued
    runner.capacity = 3
    scheduler.wake()
    await asyncio.sleep(0.05)
    assert [i.job_id for i in runner.submitted] == [gen1.id, gen2.id, train_job.id]
    assert runner.submitted[0].inputs.lora == b"lora-bytes"
    assert runner.submitted[0].adapter_key.startswith("model-")


async def test_nobody_generates_with_another_persons_model(env):
    store, runner, observer, scheduler = env
    await _ready_to_train(store, ALICE, "zqalice")
    await _give_model(store, ALICE, "zqalice")
    await users_db.ensure_user(store.db, BOB)
    with pytest.raises(Refused, match="don't have a model yet"):
        await scheduler.enqueue_generate(BOB, GenerateRequest("a photo of zqalice woman"))
    job, _ = await scheduler.enqueue_generate(ALICE, GenerateRequest("x"))
    await asyncio.sleep(0.05)
    await runner.emit(job.id, events.Done(GenerateOutput([Picture(b"I", 7)])))
    generation = await generations_db.get_generation(store.db, (await jobs_db.get_job(store.db, job.id)).result["generation_id"])
    # a variation request by Bob of Alice's image is refused before any byte is read
    bob_job = await jobs_db.create_job(store.db, "generate", BOB, {"request": {"prompt": "x"}, "variation_of":
                                                                   {"generation_id": generation.id, "index": 0}})
    scheduler.wake()
    await asyncio.sleep(0.05)
    failed = await jobs_db.get_job(store.db, bob_job)
    assert failed.state == "failed" and "no longer exists" in failed.error
    assert all(item.job_id != bob_job for item in runner.submitted)


async def test_imagine_before_the_first_model_is_trained_points_to_status(env):
    store, runner, observer, scheduler = env
    await _ready_to_train(store, ALICE, "zqalice")
    runner.capacity = 0
    job, _ = await scheduler.enqueue_train(ALICE)
    with pytest.raises(Refused, match=r"still being trained; `/status`"):  # queued
        await scheduler.enqueue_generate(ALICE, GenerateRequest("x"))
    runner.capacity = 1
    scheduler.wake()
    await wait_until(lambda: runner.submitted, interval=0.02)
    assert (await jobs_db.get_job(store.db, job.id)).state == "running"
    with pytest.raises(Refused, match=r"still being trained; `/status`"):
        await scheduler.enqueue_generate(ALICE, GenerateRequest("x"))
    await runner.emit(job.id, events.Error("The GPU ran out of memory.", "out_of_memory"))
    with pytest.raises(Refused, match="don't have a model yet"):  # nothing trains any more
        await scheduler.enqueue_generate(ALICE, GenerateRequest("x"))


async def test_lost_worker_requeues_once_then_fails(env):
    store, runner, observer, scheduler = env
    await _ready_to_train(store, ALICE, "zqalice")
    job, _ = await scheduler.enqueue_train(ALICE)
    await asyncio.sleep(0.05)
    await runner.emit(job.id, events.Checkpoint(3, b"ckpt-3"))
    await runner.emit(job.id, events.WorkerLost("The GPU worker stopped."))
    await asyncio.sleep(0.05)
    again = runner.submitted[-1]
    assert again.job_id == job.id and again.inputs.checkpoint == b"ckpt-3"
    assert (await jobs_db.get_job(store.db, job.id)).attempts == 2
    await runner.emit(job.id, events.WorkerLost("The GPU worker stopped."))
    failed = await jobs_db.get_job(store.db, job.id)
    assert failed.state == "failed" and "2 times" in failed.error


async def test_a_worker_shut_down_mid_training_costs_the_job_no_attempt(env):
    """A scale-down or `docker stop` of a worker is not the job's failure: stopped any number of
    times, it is sent again from its checkpoint, and its owner is told what happened."""
    store, runner, observer, scheduler = env
    await _ready_to_train(store, ALICE, "zqalice")
    job, _ = await scheduler.enqueue_train(ALICE)
    await wait_until(lambda: runner.submitted, interval=0.01)
    await runner.emit(job.id, events.Checkpoint(3, b"ckpt-3"))
    for stop in range(1, 4):
        await runner.emit(job.id, events.WorkerStopped())
        await wait_until(lambda stop=stop: len(runner.submitted) == 1 + stop, interval=0.01)
        again = await jobs_db.get_job(store.db, job.id)
        assert again.state == "running" and again.attempts == 1
        assert runner.submitted[-1].inputs.checkpoint == b"ckpt-3"
    assert [e for _, e in observer.updates].count("requeued") == 3


async def test_errors_and_cancel(env):
    store, runner, observer, scheduler = env
    await _ready_to_train(store, ALICE, "zqalice")
    job, _ = await scheduler.enqueue_train(ALICE)
    await asyncio.sleep(0.05)
    await runner.emit(job.id, events.Error("The GPU ran out of memory.", "out_of_memory"))
    assert (await jobs_db.get_job(store.db, job.id)).error == "The GPU ran out of memory."
    job2, _ = await scheduler.enqueue_train(ALICE)  # a failed job does not block a new one
    await asyncio.sleep(0.05)
    cancelled = await scheduler.cancel_user_jobs(ALICE)
    assert [j.id for j in cancelled] == [job2.id] and runner.cancelled == [job2.id]
    await runner.emit(job2.id, events.Error("The job was cancelled.", "cancelled"))
    assert (await jobs_db.get_job(store.db, job2.id)).state == "cancelled"


async def test_a_job_cancelled_while_queued_is_cancelled_for_the_runner_too(env):
    """An attempt of it from before a restart may still be out there (a remote worker's queue)."""
    store, runner, observer, scheduler = env
    await _ready_to_train(store, ALICE, "zqalice")
    runner.capacity = 0
    job, _ = await scheduler.enqueue_train(ALICE)
    await scheduler.cancel_user_jobs(ALICE)
    assert (await jobs_db.get_job(store.db, job.id)).state == "cancelled" and runner.cancelled == [job.id]


async def test_a_requeued_training_cancelled_while_queued_leaves_no_checkpoint(env):
    """A training re-queued with its checkpoint (its worker died) and then cancelled before it ran
    again is never resumed: its checkpoint, part of the person's model, is deleted at once."""
    store, runner, observer, scheduler = env
    await _ready_to_train(store, ALICE, "zqalice")
    runner.capacity = 0
    job, _ = await scheduler.enqueue_train(ALICE)
    await jobs_db.set_checkpoint(store.db, job.id, store.files.write(ALICE, "checkpoints", b"ckpt", ".zip"))
    checkpoint = (await jobs_db.get_job(store.db, job.id)).checkpoint_path
    await scheduler.cancel_user_jobs(ALICE)
    assert (await jobs_db.get_job(store.db, job.id)).state == "cancelled"
    assert not store.files.resolve(checkpoint).exists()
    assert observer.finished[-1][1] == "cancelled"


async def test_an_operator_cancels_one_job_of_anyones_and_its_owner_hears_who(env):
    store, runner, observer, scheduler = env
    await _ready_to_train(store, ALICE, "zqalice")
    await _ready_to_train(store, BOB, "zqbob")
    running, _ = await scheduler.enqueue_train(ALICE)
    await wait_until(lambda: runner.running, interval=0.02)
    queued, _ = await scheduler.enqueue_train(BOB)  # the one worker is busy
    reason = jobs_db.CANCELLED_BY_OPERATOR

    assert (await scheduler.cancel_job(queued.id, reason)).owner == BOB
    assert observer.finished[-1][:2] == (queued.id, "cancelled")
    assert (await jobs_db.get_job(store.db, queued.id)).error == reason
    assert await scheduler.cancel_job(queued.id, reason) is None  # ended already
    assert await scheduler.cancel_job(queued.id + 100, reason) is None  # no such job

    assert (await scheduler.cancel_job(running.id, reason)).id == running.id
    assert runner.cancelled[-1] == running.id  # it stops at its next step, and says so
    await runner.emit(running.id, events.Error("The job was cancelled.", "cancelled"))
    ended = await jobs_db.get_job(store.db, running.id)
    assert (ended.state, ended.error) == ("cancelled", reason)


async def test_restart_requeues_running_jobs(tmp_path):
    settings = _settings(tmp_path)
    store = await Storage.open(tmp_path)
    await _ready_to_train(store, ALICE, "zqalice")
    first = Scheduler(store, FakeRunner(), settings, Recorder())
    await first.start()
    job, _ = await first.enqueue_train(ALICE)
    await asyncio.sleep(0.05)
    assert (await jobs_db.get_job(store.db, job.id)).state == "running"
    await first.stop()  # the bot dies; the row still says running
    runner = FakeRunner()
    second = Scheduler(store, runner, settings, Recorder())
    assert await second.start() == [job.id]
    await asyncio.sleep(0.05)
    assert runner.submitted[0].job_id == job.id
    # The restart was not the worker's failure: a worker lost now still gets the job its one retry.
    await runner.emit(job.id, events.WorkerLost("The GPU worker stopped."))
    await asyncio.sleep(0.05)
    again = await jobs_db.get_job(store.db, job.id)
    assert (again.state, again.attempts, again.restarts) == ("running", 2, 1)
    await second.stop()
    await store.close()


async def test_jobs_ended_at_a_restart_are_told_to_their_owners(tmp_path):
    settings = _settings(tmp_path)
    store = await Storage.open(tmp_path)
    await _ready_to_train(store, ALICE, "zqalice")
    await _ready_to_train(store, BOB, "zqbob")
    first = Scheduler(store, FakeRunner(capacity=2), settings, Recorder())
    await first.start()
    worn, _ = await first.enqueue_train(ALICE)
    dropped, _ = await first.enqueue_train(BOB)
    await asyncio.sleep(0.05)
    await first.runner.on_event(worn.id, events.Checkpoint(3, b"ckpt"))
    await first.stop()
    await store.db.execute("UPDATE jobs SET restarts = ? WHERE id = ?", (MAX_RESTARTS - 1, worn.id))
    await jobs_db.request_cancel(store.db, dropped.id)  # asked to cancel while the bot was down
    observer = Recorder()
    second = Scheduler(store, FakeRunner(capacity=0), settings, observer)
    await second.start()
    assert sorted(observer.finished) == [(worn.id, "failed", {}), (dropped.id, "cancelled", {})]
    assert "interrupted too many times" in (await jobs_db.get_job(store.db, worn.id)).error
    assert second.runner.cancelled == [worn.id]  # its last attempt may still run on a remote worker
    assert list((tmp_path / "users").rglob("*.zip")) == []  # an ended training's checkpoint goes
    await second.stop()
    await store.close()


async def test_two_requests_at_once_cannot_pass_one_check(env):
    store, runner, observer, scheduler = env
    await _ready_to_train(store, ALICE, "zqalice")
    runner.capacity = 0
    trains = await asyncio.gather(scheduler.enqueue_train(ALICE), scheduler.enqueue_train(ALICE),
                                  return_exceptions=True)
    assert sorted(type(r).__name__ for r in trains) == ["Refused", "tuple"]
    await _give_model(store, ALICE, "zqalice")
    pictures = await asyncio.gather(*(scheduler.enqueue_generate(ALICE, GenerateRequest("x")) for _ in range(5)),
                                    return_exceptions=True)
    assert [type(r).__name__ for r in pictures].count("tuple") == 2  # MAX_QUEUED_GENERATIONS
    assert await jobs_db.count_jobs(store.db, ALICE, "generate", ("queued",)) == 2


async def test_a_cancel_between_claim_and_hand_over_reaches_the_worker(env):
    """The cancel finds no worker holding the job yet; the scheduler passes it on once one does."""
    store, runner, observer, scheduler = env
    await _ready_to_train(store, ALICE, "zqalice")
    original_submit = runner.submit

    async def slow_hand_over(item: WorkItem) -> None:
        await scheduler.cancel_user_jobs(ALICE)  # arrives while the job is claimed, not yet submitted
        runner.cancelled.clear()  # as a runner with no worker holding the job: the cancel is lost
        await original_submit(item)

    runner.submit = slow_hand_over
    job, _ = await scheduler.enqueue_train(ALICE)
    await wait_until(lambda: runner.cancelled, interval=0.02)
    assert runner.cancelled == [job.id]
    # A worker that finishes before it hears of the cancel: the job ends cancelled, no model is kept.
    await runner.emit(job.id, events.Done(TrainOutput(b"L", None, {}, 1, 0.1)))
    assert (await jobs_db.get_job(store.db, job.id)).state == "cancelled"
    assert await models_db.list_models(store.db, ALICE) == []


async def test_a_forget_between_claim_and_hand_over_evicts_the_lora_the_hand_over_brought(env):
    """/forget's eviction reached no worker holding the person's LoRA yet; the hand-over then sent
    it to one. The scheduler evicts it again once the hand-over is done."""
    from bot.scheduler import adapter_key

    store, runner, observer, scheduler = env
    await _ready_to_train(store, ALICE, "zqalice")
    model = await _give_model(store, ALICE, "zqalice")
    original_submit = runner.submit

    async def slow_hand_over(item: WorkItem) -> None:
        await scheduler.forget(ALICE)
        runner.cancelled.clear()  # as a runner with no worker holding the job or the LoRA yet
        runner.forgotten.clear()
        await original_submit(item)

    runner.submit = slow_hand_over
    job, _ = await scheduler.enqueue_generate(ALICE, GenerateRequest("x"))
    await wait_until(lambda: runner.forgotten, interval=0.02)
    assert runner.cancelled == [job.id] and runner.forgotten == [adapter_key(model)]


async def test_a_job_that_cannot_be_prepared_fails_kindly_instead_of_hanging(env, caplog):
    store, runner, observer, scheduler = env
    await _ready_to_train(store, ALICE, "zqalice")
    photo = (await photos_db.list_photos(store.db, ALICE))[0]
    (store.data_dir / photo.path).unlink()  # a stored file gone from the disk
    job, _ = await scheduler.enqueue_train(ALICE)
    await wait_until(lambda: observer.finished, interval=0.02)
    failed = await jobs_db.get_job(store.db, job.id)
    assert failed.state == "failed" and failed.error.startswith("Sorry, something went wrong on my side (reference")
    assert "Traceback" not in failed.error and runner.submitted == []
    reference = failed.error.split("`")[1]
    assert any(reference in r.getMessage() and r.exc_info for r in caplog.records)
    await scheduler.enqueue_train(ALICE)  # nothing is left blocking a new training


async def test_forget_waits_for_photos_being_stored_and_then_removes_them_too(env):
    from types import SimpleNamespace
    from unittest.mock import AsyncMock

    from bot.cogs.selfies import PhotosCog

    store, runner, observer, scheduler = env
    held: list[bool] = []

    async def take_photos(user_id, attachments):  # as the cog stores a DM's photos
        held.append(scheduler.user_lock(user_id).locked())
        await _ready_to_train(store, ALICE, "zqalice")
        return "Kept 2 photos"

    cog = PhotosCog(SimpleNamespace(scheduler=scheduler, access=SimpleNamespace(require=AsyncMock()),
                                    settings=SimpleNamespace(require_consent=False)))
    cog.take_photos = take_photos
    message = SimpleNamespace(author=SimpleNamespace(id=ALICE, bot=False), guild=None, attachments=["a", "b"],
                              reply=AsyncMock(), channel=SimpleNamespace(send=AsyncMock()))
    await cog.on_message(message)
    assert held == [True]  # the intake holds the person's lock
    message.reply.assert_awaited_once_with("Kept 2 photos", mention_author=False)

    lock = scheduler.user_lock(ALICE)
    await lock.acquire()  # a DM's photos being stored
    forgetting = asyncio.create_task(scheduler.forget(ALICE))
    await asyncio.sleep(0.05)
    assert not forgetting.done()
    path = store.files.write(ALICE, "photos", b"late", ".png")
    await photos_db.add_photo(store.db, ALICE, sha256="late", phash=9, path=path, byte_size=4, width=1, height=1)
    lock.release()
    await forgetting
    assert await users_db.get_user(store.db, ALICE) is None
    assert not (store.data_dir / "users" / str(ALICE)).exists()


async def test_forget_cancels_and_drops_adapters(env):
    store, runner, observer, scheduler = env
    await _ready_to_train(store, ALICE, "zqalice")
    model_id = await _give_model(store, ALICE, "zqalice")
    job, _ = await scheduler.enqueue_generate(ALICE, GenerateRequest("x"))
    await asyncio.sleep(0.05)
    await scheduler.forget(ALICE)
    assert runner.cancelled == [job.id] and runner.forgotten == [f"model-{model_id}"]
    assert runner.forgotten_jobs == [job.id]  # its messages, wherever the runner keeps them, go too
    assert await jobs_db.get_job(store.db, job.id) is None
    await runner.emit(job.id, events.Done(GenerateOutput([Picture(b"I", 1)])))
    assert not (store.data_dir / "users" / str(ALICE)).exists()  # the late result wrote nothing


async def test_a_job_whose_hand_over_fails_waits_for_the_next_worker_without_losing_an_attempt(env):
    store, runner, observer, scheduler = env
    await _ready_to_train(store, ALICE, "zqalice")
    original_submit, failures = runner.submit, []

    async def dying_worker(item: WorkItem) -> None:
        if not failures:
            failures.append(item.job_id)
            raise BrokenPipeError("the worker died as the job was sent")
        await original_submit(item)

    runner.submit = dying_worker
    job, _ = await scheduler.enqueue_train(ALICE)
    await wait_until(lambda: runner.submitted, interval=0.02)
    assert failures == [job.id] and [i.job_id for i in runner.submitted] == [job.id]
    again = await jobs_db.get_job(store.db, job.id)
    assert (again.state, again.attempts) == ("running", 1)


async def test_what_a_worker_says_first_about_a_job_is_what_its_owner_sees_and_is_kept(env):
    store, runner, observer, scheduler = env
    await _ready_to_train(store, ALICE, "zqalice")
    starting = {"stage": "loading_model", "detail": "the worker is still starting up"}
    original_submit = runner.submit

    async def quick_worker(item: WorkItem) -> None:  # its first event arrives before submit returns
        await original_submit(item)
        await runner.on_event(item.job_id, events.Stage(**starting))

    runner.submit = quick_worker
    job, _ = await scheduler.enqueue_train(ALICE)
    await wait_until(lambda: (job.id, starting) in observer.shown, interval=0.02)
    await asyncio.sleep(0.1)
    shown = [progress for job_id, progress in observer.shown if job_id == job.id]
    assert shown == [{"stage": "loading_model", "detail": ""}, starting]  # handed over, then the worker's word
    assert (await jobs_db.get_job(store.db, job.id)).progress == starting
