"""Retention in the running bot: old pictures' files go on a schedule, a new model drops the one before
the previous, and what relied on a deleted file gets a plain answer."""

from __future__ import annotations

import asyncio

import pytest

from bot.housekeeping import Housekeeping
from bot.scheduler import Scheduler
from jobs import events
from jobs.payloads import GenerateOutput, Picture, TrainOutput, VariationOf
from jobs.requests import GenerateRequest
from storage import generations_db, jobs_db, models_db, usage_db
from storage.retention import DAY_S
from storage.store import Storage
from tests.bot.test_scheduler import ALICE, FakeRunner, Recorder, _give_model, _ready_to_train, _settings
from tests.polling import wait_until


@pytest.fixture
async def env(tmp_path):
    store = await Storage.open(tmp_path)
    runner, observer = FakeRunner(), Recorder()
    scheduler = Scheduler(store, runner, _settings(tmp_path), observer)
    await scheduler.start()
    yield store, runner, observer, scheduler
    await scheduler.stop()
    await store.close()


async def _picture(store, runner, scheduler, prompt: str, **kwargs) -> int:
    job, _ = await scheduler.enqueue_generate(ALICE, GenerateRequest(prompt), **kwargs)
    await wait_until(lambda: job.id in runner.running, interval=0.01)
    await runner.emit(job.id, events.Done(GenerateOutput([Picture(b"png", 1)])))
    return (await jobs_db.get_job(store.db, job.id)).result["generation_id"]


async def test_pictures_past_the_retention_lose_their_files_on_the_next_pass(env):
    store, runner, observer, scheduler = env
    await _ready_to_train(store, ALICE, "zqalice")
    await _give_model(store, ALICE, "zqalice")
    generation_id = await _picture(store, runner, scheduler, "x")
    [path] = (await generations_db.get_generation(store.db, generation_id)).paths
    now = [(await generations_db.get_generation(store.db, generation_id)).created_at]
    housekeeping = Housekeeping(store, runner, 30, clock=lambda: now[0])

    now[0] += 29 * DAY_S
    await housekeeping.run_once()
    assert (store.data_dir / path).exists()
    now[0] += 2 * DAY_S
    await housekeeping.run_once()
    assert not (store.data_dir / path).exists()
    assert (await generations_db.get_generation(store.db, generation_id)).paths == []

    # "More like #1" of it now fails with a plain reason instead of an internal error.
    job, _ = await scheduler.enqueue_generate(ALICE, GenerateRequest("x"), variation_of=VariationOf(generation_id, 0))
    await wait_until(lambda: observer.finished and observer.finished[-1][0] == job.id, interval=0.01)
    failed = await jobs_db.get_job(store.db, job.id)
    assert failed.state == "failed" and failed.error == "The image to vary no longer exists."


async def test_quota_uses_are_kept_eight_days_then_pruned(env):
    store, runner, observer, scheduler = env
    now = [1_800_000_000.0]
    await usage_db.record_usage(store.db, ALICE, None, "picture", 4, now=now[0])
    housekeeping = Housekeeping(store, runner, 30, clock=lambda: now[0])
    now[0] += usage_db.USAGE_KEEP_S - 60
    await housekeeping.run_once()
    assert await usage_db.uses_after(store.db, "picture", 0, owner=ALICE) == [(now[0] - usage_db.USAGE_KEEP_S + 60, 4)]
    now[0] += 120
    await housekeeping.run_once()
    assert await usage_db.uses_after(store.db, "picture", 0, owner=ALICE) == []


async def test_the_loop_runs_at_start_and_then_every_interval(env):
    store, runner, observer, scheduler = env
    passes = []

    def clock() -> float:
        passes.append(1)
        return 0.0

    housekeeping = Housekeeping(store, runner, 30, clock=clock, interval_s=0.01)
    housekeeping.start()
    await wait_until(lambda: len(passes) >= 3, interval=0.01)
    await housekeeping.stop()


async def test_a_new_model_drops_the_one_before_the_previous_from_disk_and_workers(env):
    store, runner, observer, scheduler = env
    await _ready_to_train(store, ALICE, "zqalice")
    first = await _give_model(store, ALICE, "zqalice")
    await _give_model(store, ALICE, "zqalice")
    first_path = (await models_db.get_model(store.db, first)).lora_path
    job, _ = await scheduler.enqueue_train(ALICE)
    await wait_until(lambda: job.id in runner.running, interval=0.01)
    await runner.emit(job.id, events.Done(TrainOutput(b"L", None, {"handle": "zqalice", "class_word": "woman"},
                                                      10, 0.1)))
    await asyncio.sleep(0)
    models = await models_db.list_models(store.db, ALICE)
    assert len(models) == 2 and first not in [m.id for m in models]
    assert not (store.data_dir / first_path).exists()
    assert f"model-{first}" in runner.forgotten


def test_the_retention_setting_is_checked_at_start(tmp_path):
    from bot.config import ConfigError, load_settings

    base = {"DISCORD_TOKEN": "t" * 30, "DATA_DIR": str(tmp_path)}
    assert load_settings(base, env_file=None).picture_retention_days == 30
    assert load_settings({**base, "PICTURE_RETENTION_DAYS": "0"}, env_file=None).picture_retention_days == 0
    for bad, says in (("-1", r"must be 0 \(keep pictures for ever\) or a positive"), ("a week", "not a whole number")):
        with pytest.raises(ConfigError, match=says):
            load_settings({**base, "PICTURE_RETENTION_DAYS": bad}, env_file=None)
