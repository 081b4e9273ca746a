"""End to end: the bot and its workers survive what goes wrong during a training.

A worker killed mid-training, the bot itself stopped mid-training, Discord answering 429, a second
person training at the same time on a second worker, cancelling, and no worker online at all.
"""

from __future__ import annotations

import os
import re
import signal

import pytest

from bot.progress import NO_WORKER_ONLINE
from storage import jobs_db, models_db
from tests.e2e.harness import (
    BotProcess,
    e2e_settings,
    finished_job,
    last_text,
    ready_to_train,
    running_bot,
    samples_message,
    start_training,
)
from tests.polling import wait_until

pytestmark = pytest.mark.slow

PROGRESS_EDIT = r"/channels/\d+/messages/\d+"



async def checkpointed(run: BotProcess, owner: int):
    """The owner's running training once it has stored a checkpoint."""
    async def read():
        jobs = await jobs_db.jobs_for_user(run.store.db, owner, kind="train")
        return next((j for j in jobs if j.checkpoint_path and j.state == "running"), None)
    return await wait_until(read)


async def test_a_worker_killed_mid_training_resumes_from_its_checkpoint_despite_429s(fake, tmp_path):
    alice = fake.add_user("alice")
    settings = e2e_settings(fake, tmp_path, train_steps=60)
    async with running_bot(fake, settings) as run:
        await ready_to_train(fake, alice, "zqalice")
        fake.rate_limit_next("PATCH", PROGRESS_EDIT, retry_after=0.5, times=2)
        progress = await start_training(fake, alice)
        job = await checkpointed(run, alice.id)
        assert job is not None, "the training never stored a checkpoint"
        pid = run.runner.worker_pids[0]
        os.kill(pid, signal.SIGKILL)

        await fake.wait_for(lambda: samples_message(fake, alice), timeout=300)
        job = await jobs_db.get_job(run.store.db, job.id)
        assert (job.state, job.attempts) == ("succeeded", 2)
        assert run.runner.worker_pids[0] not in (None, pid)  # a new worker took over
        texts = [v.content for v in progress.history]
        resumed = [int(m[1]) for t in texts if (m := re.search(r"resumed at step (\d+)", t))]
        assert resumed and resumed[0] > 0  # it did not start over
        assert texts[-1].endswith("Done! Your model is ready.")
        assert [r.status for r in fake.requests_to("PATCH", PROGRESS_EDIT)].count(429) == 2
        assert job.checkpoint_path is None or not (tmp_path / job.checkpoint_path).exists()
    assert fake.unknown_routes == []


async def test_the_bot_stopped_mid_training_picks_the_job_and_its_message_up_again(fake, tmp_path):
    alice = fake.add_user("alice")
    settings = e2e_settings(fake, tmp_path, train_steps=60)
    first = BotProcess(fake, settings)
    await first.start()
    try:
        await ready_to_train(fake, alice, "zqalice")
        progress = await start_training(fake, alice)
        job = await checkpointed(first, alice.id)
        assert job is not None
    finally:
        await first.stop()
    edits_before = len(progress.history)

    async with running_bot(fake, settings) as second:
        await fake.wait_for(lambda: samples_message(fake, alice), timeout=300)
        job = await jobs_db.get_job(second.store.db, job.id)
        assert job.state == "succeeded"
        later = [v.content for v in progress.history[edits_before:]]
        assert later and later[-1].endswith("Done! Your model is ready.")  # the same message, edited on
        assert any(re.search(r"resumed at step [1-9]", t) for t in later)
        assert await models_db.get_active_model(second.store.db, alice.id) is not None
    assert fake.unknown_routes == []


async def test_two_workers_train_two_people_at_once_and_answer_status_and_cancel(fake, tmp_path):
    alice, bob, carol = fake.add_user("alice"), fake.add_user("bob"), fake.add_user("carol")
    settings = e2e_settings(fake, tmp_path, workers=2, train_steps=30)
    async with running_bot(fake, settings) as run:
        assert len(run.runner.worker_pids) == 2
        for user, handle in ((alice, "zqalice"), (bob, "zqbobby"), (carol, "zqcarol")):
            await ready_to_train(fake, user, handle)
        await start_training(fake, alice)
        await start_training(fake, bob)

        async def both_running() -> bool:
            jobs = await jobs_db.jobs_in_states(run.store.db, ("running",))
            return len(jobs) == 2
        assert await wait_until(both_running)
        await start_training(fake, carol)  # both workers are busy: carol waits

        status = await fake.invoke_command(carol, "status")
        await fake.wait_for(lambda: last_text(status), timeout=10)
        assert re.search(r"Training #\d+: queued, position 1", last_text(status))
        busy = await fake.invoke_command(alice, "status")
        await fake.wait_for(lambda: "running" in last_text(busy), timeout=10)
        cancel = await fake.invoke_command(carol, "cancel")
        await fake.wait_for(lambda: last_text(cancel), timeout=10)
        carol_job = (await jobs_db.jobs_for_user(run.store.db, carol.id, kind="train"))[0]
        assert (await wait_until(lambda: jobs_db.get_job(run.store.db, carol_job.id))).state == "cancelled"

        await fake.wait_for(lambda: samples_message(fake, alice) and samples_message(fake, bob), timeout=300)
        [a] = await jobs_db.jobs_for_user(run.store.db, alice.id, kind="train")
        [b] = await jobs_db.jobs_for_user(run.store.db, bob.id, kind="train")
        assert a.started_at < b.finished_at and b.started_at < a.finished_at  # they ran side by side
        assert samples_message(fake, carol) is None
        carols = next(m for m in fake.bot_messages_to(carol) if "Training your model" in m.history[0].content)
        assert carols.content.endswith("Cancelled. Your photos are kept.")
    assert fake.unknown_routes == []


async def test_a_job_that_kills_its_worker_twice_fails_with_a_reason_and_the_next_one_runs(fake, tmp_path):
    alice = fake.add_user("alice")
    settings = e2e_settings(fake, tmp_path, train_steps=60)
    async with running_bot(fake, settings) as run:
        await ready_to_train(fake, alice, "zqalice")
        progress = await start_training(fake, alice)
        previous = None
        for attempt in (1, 2):
            job = await wait_until(lambda attempt=attempt, previous=previous: _checkpointed_again(
                run, alice.id, attempt, previous))
            assert job is not None, f"attempt {attempt} stored no checkpoint"
            previous = job.checkpoint_path
            os.kill(run.runner.worker_pids[0], signal.SIGKILL)
        failed = await wait_until(lambda: finished_job(run.store, job.id))
        assert failed.state == "failed" and "stopped unexpectedly" in failed.error
        await fake.wait_for(lambda: "It did not work: The GPU worker stopped unexpectedly" in progress.content,
                            timeout=30)
        assert "run `/train` again" in progress.content

        await start_training(fake, alice)  # the replacement worker takes the next job
        await fake.wait_for(lambda: samples_message(fake, alice), timeout=300)
    assert fake.unknown_routes == []


async def _checkpointed_again(run: BotProcess, owner: int, attempt: int, previous: str | None):
    """The owner's training running its `attempt`-th time, once that run stored its own checkpoint."""
    [job] = await jobs_db.jobs_for_user(run.store.db, owner, kind="train")
    fresh = job.checkpoint_path is not None and job.checkpoint_path != previous
    return job if job.state == "running" and job.attempts == attempt and fresh else None


async def test_with_no_worker_online_a_person_is_told_and_their_training_starts_when_one_joins(
        fake, tmp_path, redis_url, celery_workers):
    alice = fake.add_user("alice")
    settings = e2e_settings(fake, tmp_path / "bot", job_backend="celery", redis_url=redis_url)
    async with running_bot(fake, settings) as run:  # every GPU machine is off
        await ready_to_train(fake, alice, "zqalice")
        train = await fake.invoke_command(alice, "train")
        await fake.wait_for(lambda: "Training queued" in last_text(train), timeout=30)
        assert NO_WORKER_ONLINE in last_text(train)
        progress = await fake.wait_for_message(fake.dm_channel_of(alice),
                                               lambda m: m.from_bot and "Training your model" in m.content)
        assert "Position in the queue: 1" in progress.content and NO_WORKER_ONLINE in progress.content
        status = await fake.invoke_command(alice, "status")
        await fake.wait_for(lambda: "queued, position 1" in last_text(status), timeout=10)
        assert NO_WORKER_ONLINE in last_text(status)

        celery_workers.start("w1")
        await fake.wait_for(lambda: samples_message(fake, alice), timeout=300)
        texts = [v.content for v in progress.history]
        assert any("Stage: Training your model" in text for text in texts)
        assert texts[-1].endswith("Done! Your model is ready.")
        assert run.runner.workers_online() == 1
        status = await fake.invoke_command(alice, "status")
        await fake.wait_for(lambda: "Model: trained as" in last_text(status), timeout=10)
        assert NO_WORKER_ONLINE not in last_text(status)
