"""Stopping gracefully on the Celery path: a worker told to stop (SIGTERM, as `docker stop` sends) and a
bot that stops both end the training in progress at its next step; its checkpoints stay with the bot,
which sends the job again and resumes it from the last one."""

from __future__ import annotations

import signal
from dataclasses import replace

import pytest

from bot.config import Settings
from bot.scheduler import Scheduler
from jobs.celery_runner import CeleryRunner
from storage import jobs_db
from storage.store import Storage
from tests.e2e.harness import finished_job
from tests.jobs.test_celery import Observed, add_person
from tests.polling import wait_until
from tests.work_items import JOB_SECRET

pytestmark = pytest.mark.slow


def settings_for(tmp_path, redis_url: str) -> Settings:
    return replace(Settings(), data_dir=tmp_path / "bot", base_model="tiny", job_backend="celery",
                   redis_url=redis_url, job_secret=JOB_SECRET, train_steps=60, train_resolution=64, train_rank=4,
                   train_learning_rate=1e-3, class_images=2, train_checkpoint_every=4, train_preview_every=0)


async def bot(store: Storage, settings: Settings) -> tuple[Scheduler, CeleryRunner, Observed]:
    runner, observed = CeleryRunner(settings.redis_url, JOB_SECRET), Observed()
    scheduler = Scheduler(store, runner, settings, observed)
    await scheduler.start()
    return scheduler, runner, observed


async def checkpointed(store: Storage, job_id: int):
    job = await jobs_db.get_job(store.db, job_id)
    return job if job.checkpoint_path and job.state == "running" else None


def resumed(observed: Observed, job_id: int) -> bool:
    return any(e.get("detail", "").startswith("resumed at step") for e in observed.events.get(job_id, []))


async def test_a_worker_told_to_stop_ends_the_training_at_its_next_step_and_exits_0(
        redis_url, tmp_path, celery_workers):
    settings = settings_for(tmp_path, redis_url)
    store = await Storage.open(settings.data_dir)
    scheduler, runner, observed = await bot(store, settings)
    try:
        await add_person(store, 1, "zqalice")
        celery_workers.start("w1")
        job, _ = await scheduler.enqueue_train(1)
        assert await wait_until(lambda: checkpointed(store, job.id), timeout=300), celery_workers.log("w1")
        celery_workers.processes["w1"].send_signal(signal.SIGTERM)
        assert celery_workers.processes["w1"].wait(120) == 0, celery_workers.log("w1")
        log = celery_workers.log("w1")
        assert f"job {job.id} stopped at its next step: this worker is stopping" in log
        assert "worker w1 stopped" in log
        steps = [e["step"] for e in observed.events[job.id] if e.get("type") == "progress"]
        assert steps and max(steps) < settings.train_steps  # it did not train on to the end

        celery_workers.start("w2")  # the job waits for a worker, and resumes on it from its checkpoint
        finished = await wait_until(lambda: finished_job(store, job.id), timeout=300)
        assert finished.state == "succeeded", (finished.error, celery_workers.log("w2"))
        assert resumed(observed, job.id)
    finally:
        await scheduler.stop()
        await store.close()


async def test_a_bot_that_stops_stops_the_training_on_its_worker_and_resumes_it_when_it_starts_again(
        redis_url, tmp_path, celery_workers):
    settings = settings_for(tmp_path, redis_url)
    store = await Storage.open(settings.data_dir)
    scheduler, runner, _ = await bot(store, settings)
    try:
        await add_person(store, 1, "zqalice")
        celery_workers.start("w1")
        job, _ = await scheduler.enqueue_train(1)
        assert await wait_until(lambda: checkpointed(store, job.id), timeout=300), celery_workers.log("w1")
    finally:
        await scheduler.stop()
    assert await wait_until(lambda: f"job {job.id} stopped at its next step: the bot no longer waits for it"
                            in celery_workers.log("w1"), timeout=120), celery_workers.log("w1")
    assert (await jobs_db.get_job(store.db, job.id)).state == "running"  # for the next start to re-queue

    scheduler, runner, observed = await bot(store, settings)
    try:
        finished = await wait_until(lambda: finished_job(store, job.id), timeout=300)
        assert finished.state == "succeeded", (finished.error, celery_workers.log("w1"))
        assert resumed(observed, job.id) and finished.restarts == 1
        assert celery_workers.processes["w1"].poll() is None  # the same worker, which went on serving
    finally:
        await scheduler.stop()
        await store.close()
