"""Starting and stopping on the Celery path. A worker that cannot start says why and exits non-zero;
one started passes none of the bot's secrets on. A worker told to stop (SIGTERM, as `docker stop`
sends) and a bot that stops both end the training in progress at its next step; its checkpoints stay
with the bot, which sends the job again and resumes it from the last one."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from dataclasses import replace

import pytest

from bot.config import Settings
from bot.scheduler import Scheduler
from jobs.celery_protocol import worker_key
from jobs.celery_runner import CeleryRunner, _Known
from storage import jobs_db
from storage.store import Storage
from tests.e2e.harness import finished_job
from tests.jobs.test_celery import Observed, add_person
from tests.jobs.worker_process import start_worker
from tests.polling import wait_until, wait_until_sync
from tests.work_items import JOB_SECRET, generate_item

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
        assert finished.attempts == 1  # the stop was the worker's, not the job's failure
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


def test_a_worker_stopped_while_it_starts_exits_0_and_leaves_no_folder(redis_url, tmp_path):
    worker = start_worker(redis_url, tmp_path / "w", env={"TEST_SLOW_START": "1"})
    assert wait_until_sync((tmp_path / "w" / "starting").exists, timeout=120), worker.log
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(60) == 0, worker.log
    assert f"worker {worker.default_name} stopped during its start" in worker.log
    assert list((tmp_path / "w" / "worker-data").iterdir()) == []


def test_a_worker_started_without_a_valid_secret_exits_non_zero_and_says_why(redis_url, tmp_path):
    for secret, words in (("", "JOB_SECRET is not set"), ("short", "JOB_SECRET is too short")):
        worker = start_worker(redis_url, tmp_path / "w", env={"JOB_SECRET": secret})
        assert worker.process.wait(120) == 1
        assert words in worker.log


def test_a_worker_that_cannot_reach_redis_exits_non_zero_and_says_why(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    worker = start_worker(f"redis://127.0.0.1:{port}/0", tmp_path / "w")
    assert worker.process.wait(120) == 1
    assert "Could not reach Redis" in worker.log and "Traceback" not in worker.log
    assert list((tmp_path / "w" / "worker-data").iterdir()) == []  # it left no folder behind


def test_a_job_run_by_a_worker_sees_no_discord_token_nor_job_secret(redis_url, tmp_path):
    """A worker started with the bot's .env in its environment (docker compose's env_file) passes neither
    the bot's token nor the job secret on: its own environment, which every process it starts inherits,
    no longer has them."""
    worker = start_worker(redis_url, tmp_path / "w", "--name", "w1",
                          env={"DISCORD_TOKEN": "MTIz.discord-token-of-the-bot", "REDIS_URL": redis_url})
    runner = CeleryRunner(redis_url, JOB_SECRET)
    runner._workers = {"w1": _Known()}
    try:
        assert wait_until_sync(lambda: runner.redis.exists(worker_key("w1")), timeout=60), worker.log
        asyncio.run(runner.submit(generate_item(1)))
        env_file = tmp_path / "w" / "env.json"
        assert wait_until_sync(env_file.exists, timeout=60), worker.log
        names = json.loads(env_file.read_text())
        assert "PATH" in names and not {"DISCORD_TOKEN", "JOB_SECRET", "REDIS_URL"} & set(names)
    finally:
        worker.stop()

