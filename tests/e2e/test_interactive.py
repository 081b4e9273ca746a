"""End to end: while the only worker trains someone, the bot keeps its gateway alive, answers commands,
and serves an /imagine between training steps instead of after the training."""

from __future__ import annotations

import pytest

from storage import jobs_db
from tests.e2e.harness import (
    e2e_settings,
    finished_job,
    last_text,
    ready_to_train,
    running_bot,
    samples_message,
    start_training,
)
from tests.fakediscord import FakeDiscord
from tests.polling import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
async def fake():
    async with FakeDiscord(heartbeat_interval=0.2) as server:  # frequent heartbeats to watch
        yield server


async def test_heartbeats_commands_and_imagine_during_someone_elses_training(fake, tmp_path):
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    settings = e2e_settings(fake, tmp_path, workers=1)
    async with running_bot(fake, settings) as run:
        await ready_to_train(fake, alice, "zqalice")
        await start_training(fake, alice)
        await fake.wait_for(lambda: samples_message(fake, alice), timeout=300)

        await ready_to_train(fake, bob, "zqbobby")
        bob_train = await fake.invoke_command(bob, "train", {"steps": 2000})
        await fake.wait_for(lambda: any("Training queued" in (r.message.content if r.message else "")
                                        for r in bob_train.responses), timeout=30)

        async def bob_in_the_loop():
            [job] = await jobs_db.jobs_for_user(run.store.db, bob.id, kind="train")
            return job if job.state == "running" and job.progress.get("stage") == "training" else None
        assert await wait_until(bob_in_the_loop, timeout=120)
        session, beats = fake.session, fake.session.heartbeats
        await fake.wait_for(lambda: session.heartbeats >= beats + 5, timeout=10)  # the gateway stays alive
        status = await fake.invoke_command(bob, "status")
        await fake.wait_for(lambda: "running (training your model" in last_text(status), timeout=10)

        imagine = await fake.invoke_command(alice, "imagine", {"prompt": "on the moon", "count": 1})
        await fake.wait_for(lambda: imagine.original is not None and imagine.original.attachments, timeout=60)
        [bob_job] = await jobs_db.jobs_for_user(run.store.db, bob.id, kind="train")
        assert bob_job.state == "running"  # alice did not wait for bob's 2000 steps
        assert bob_job.progress.get("step", 0) < 2000

        cancel = await fake.invoke_command(bob, "cancel")
        await fake.wait_for(lambda: cancel.responses, timeout=10)
        assert (await wait_until(lambda: finished_job(run.store, bob_job.id))).state == "cancelled"
    assert fake.unknown_routes == []
