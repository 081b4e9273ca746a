"""End to end: quotas and fairness as people meet them through the real bot and the fake Discord.

The workers are played by the test (`FakeRunner`), so that it decides when each job runs and ends,
and the bot's scheduler runs on a fake clock that the test moves by a day instead of waiting one.
"""

from __future__ import annotations

import math

import pytest

from bot.quotas import DAY_S
from jobs import events
from jobs.payloads import GenerateOutput, Picture, TrainOutput
from storage import jobs_db, models_db, users_db
from tests.bot.test_scheduler import FakeRunner
from tests.clock import FakeClock
from tests.e2e.harness import BotProcess, e2e_settings, last_text, ready_to_train, running_bot, start_training
from tests.polling import wait_until

pytestmark = pytest.mark.slow



def stamp(at: float) -> str:
    """How the bot names a moment: Discord's relative timestamp, shown in each reader's time zone."""
    return f"<t:{math.ceil(at)}:R>"


def _queued(interaction) -> bool:
    return "Queued" in last_text(interaction) or "Starting" in last_text(interaction)


async def finish_running(runner: FakeRunner) -> int:
    """The worker finishes the job it holds, as it would: a model, or the pictures asked for."""
    await wait_until(lambda: runner.running, timeout=30, interval=0.01)
    [(job_id, item)] = runner.running.items()
    if item.kind == "train":
        result = TrainOutput(b"lora", None, {"handle": item.params.handle, "class_word": "person"}, 24, 0.1)
        await runner.emit(job_id, events.Done(result))
    else:
        count = item.params.request.num_images
        await runner.emit(job_id, events.Done(GenerateOutput([Picture(b"png", n) for n in range(count)])))
    return job_id


async def test_a_person_reaches_the_day_s_trainings_and_pictures_and_has_them_again_a_day_later(fake, tmp_path):
    alice = fake.add_user("alice")
    settings = e2e_settings(fake, tmp_path, trainings_per_day=2, train_cooldown_min=60, pictures_per_day=4)
    clock = FakeClock()
    t0 = clock.now
    run = BotProcess(fake, settings, runner=FakeRunner(capacity=1))
    await run.start()
    try:
        run.bot.scheduler.clock = clock
        await ready_to_train(fake, alice, "zqalice")

        await start_training(fake, alice)
        await finish_running(run.runner)
        await fake.wait_for(lambda: any("Your model is trained" in m.content for m in fake.bot_messages_to(alice)),
                            timeout=30)
        clock.now = t0 + 1800
        refused = await fake.invoke_command(alice, "train", in_guild=True)
        await fake.wait_for(lambda: "apart" in last_text(refused), timeout=30)
        assert "60 minutes apart" in last_text(refused) and stamp(t0 + 3600) in last_text(refused)
        assert refused.original.ephemeral  # a refusal in a server is the person's alone

        clock.now = t0 + 3600
        await start_training(fake, alice)
        await finish_running(run.runner)
        clock.now = t0 + 2 * 3600
        refused = await fake.invoke_command(alice, "train")
        await fake.wait_for(lambda: "24 hours" in last_text(refused), timeout=30)
        assert "2 trainings of the last 24 hours" in last_text(refused) and stamp(t0 + DAY_S) in last_text(refused)

        pictures = await fake.invoke_command(alice, "imagine", {"prompt": "on the moon", "count": 4}, in_guild=True)
        await finish_running(run.runner)
        await fake.wait_for(lambda: pictures.original is not None and len(pictures.original.attachments) == 4,
                            timeout=30)
        asked_at = clock.now
        clock.now += 600
        more = await fake.invoke_command(alice, "imagine", {"prompt": "on mars", "count": 1}, in_guild=True)
        await fake.wait_for(lambda: "pictures of the last 24 hours" in last_text(more), timeout=30)
        assert "had your 4 pictures" in last_text(more) and stamp(asked_at + DAY_S) in last_text(more)
        # Refused before anything public: the first answer is the private refusal, not a "thinking…".
        assert more.callback_type == 4 and all(r.message.ephemeral for r in more.responses if r.message)

        status = await fake.invoke_command(alice, "status")
        await fake.wait_for(lambda: "Left of the last 24 hours" in last_text(status), timeout=30)
        assert "0 of 2 trainings and 0 of 4 pictures" in last_text(status)
        assert f"You can train again {stamp(t0 + DAY_S)}" in last_text(status)
    finally:
        await run.stop()

    # Counted in the database: a restart forgets none of it.
    run = BotProcess(fake, settings, runner=FakeRunner(capacity=1))
    await run.start()
    try:
        run.bot.scheduler.clock = clock
        refused = await fake.invoke_command(alice, "train")
        await fake.wait_for(lambda: "24 hours" in last_text(refused), timeout=30)
        assert stamp(t0 + DAY_S) in last_text(refused)

        clock.now = asked_at + DAY_S  # a day after the pictures, and more than a day after both trainings
        await start_training(fake, alice)
        pictures = await fake.invoke_command(alice, "imagine", {"prompt": "on mars", "count": 4})
        await fake.wait_for(lambda: _queued(pictures), timeout=30)
        status = await fake.invoke_command(alice, "status")
        await fake.wait_for(lambda: "Left of the last 24 hours" in last_text(status), timeout=30)
        assert "1 of 2 trainings and 0 of 4 pictures" in last_text(status)
    finally:
        await run.stop()


async def test_a_cancelled_request_that_never_ran_gives_its_pictures_back(fake, tmp_path):
    alice = fake.add_user("alice")
    settings = e2e_settings(fake, tmp_path, pictures_per_day=4)
    async with running_bot(fake, settings, runner=FakeRunner(capacity=0)) as run:
        await _give_model(run, alice, "zqalice")
        first = await fake.invoke_command(alice, "imagine", {"prompt": "a", "count": 4})
        await fake.wait_for(lambda: _queued(first), timeout=30)
        refused = await fake.invoke_command(alice, "imagine", {"prompt": "b", "count": 1})
        await fake.wait_for(lambda: "had your 4 pictures" in last_text(refused), timeout=30)
        cancel = await fake.invoke_command(alice, "cancel")
        await fake.wait_for(lambda: "Cancelling 1 job" in last_text(cancel), timeout=30)
        again = await fake.invoke_command(alice, "imagine", {"prompt": "b", "count": 4})
        await fake.wait_for(lambda: _queued(again), timeout=30)


async def _give_model(run: BotProcess, user, handle: str) -> None:
    """A person who trained before: a handle and a model (the runner never reads its file)."""
    db, files = run.store.db, run.store.files
    await users_db.set_handle(db, user.id, handle, "person")
    await models_db.add_model(db, user.id, None, files.write(user.id, "models", b"lora", ".safetensors"),
                              "tiny", {"handle": handle, "class_word": "person"})


async def test_two_people_s_pictures_go_round_robin(fake, tmp_path):
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    async with running_bot(fake, e2e_settings(fake, tmp_path), runner=FakeRunner(capacity=0)) as run:
        await _give_model(run, alice, "zqalice")
        await _give_model(run, bob, "zqbob")
        asked = []
        for person, prompt in ((alice, "a1"), (alice, "a2"), (alice, "a3"), (bob, "b1")):
            interaction = await fake.invoke_command(person, "imagine", {"prompt": prompt, "count": 1}, in_guild=True)
            await fake.wait_for(lambda i=interaction: _queued(i), timeout=30)
            asked.append(interaction)
        # Bob's first picture is behind Alice's first only, not behind all three of hers.
        assert "Queued (position 2)" in last_text(asked[3])
        status = await fake.invoke_command(alice, "status")
        await fake.wait_for(lambda: "position" in last_text(status), timeout=30)
        assert [line.split(": ")[1] for line in last_text(status).splitlines() if line.startswith("•")] == [
            "queued, position 1", "queued, position 3", "queued, position 4"]

        run.runner.capacity = 1
        run.bot.scheduler.wake()
        order = [await finish_running(run.runner) for _ in asked]
        owners = [(await jobs_db.get_job(run.store.db, job_id)).owner for job_id in order]
        assert owners == [alice.id, bob.id, alice.id, alice.id]
        await fake.wait_for(lambda: all(i.original is not None and i.original.attachments for i in asked),
                            timeout=30)
