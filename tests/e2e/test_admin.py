"""End to end: /admin, the real bot against the fake Discord, with a worker that holds what it is given.

An operator (ADMIN_USER_IDS) sees the queue and the workers, cancels a job, reads the stats, sets a
server's limits, bans and unbans, and erases a person who asked; a member with Manage Server sets
their own server's limits and nothing else; everyone else is refused at every subcommand, and
Discord does not even offer /admin in a server to a member without Manage Server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from jobs.events import Error
from jobs.payloads import GenerateParams, TrainParams, WorkItem, to_stored
from jobs.requests import TRAIN_DEFAULTS, GenerateRequest
from jobs.runner import JobRunner, WorkerState
from storage import admin_log_db, bans_db, generations_db, jobs_db, limits_db, photos_db, users_db
from storage.jobs_db import CANCELLED_BY_OPERATOR
from tests.e2e.harness import e2e_settings, last_text, ready_to_train, running_bot, start_training
from tests.fakediscord import FakeDiscord
from tests.fakediscord.models import MANAGE_GUILD
from tests.polling import wait_until

SUBCOMMANDS = ("queue", "cancel", "stats", "limits", "ban", "unban", "forget")
OPERATOR_ONLY = "`/admin` is for this bot's operators"


class HoldingRunner(JobRunner):
    """One worker, `gpu-0`, that takes `capacity` jobs and works on them until they are cancelled."""

    def __init__(self) -> None:
        self.capacity = 1
        self.holding: list[int] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, on_event) -> None:
        self.on_event = on_event

    async def stop(self) -> None:
        await asyncio.gather(*self._tasks)

    def idle_capacity(self, kind: str | None = None) -> int:
        return max(0, self.capacity - len(self.holding))

    def workers_online(self) -> int:
        return 1

    def worker_states(self) -> list[WorkerState]:
        return [WorkerState("gpu-0", "test", tuple(self.holding))]

    async def submit(self, item: WorkItem) -> None:
        self.holding.append(item.job_id)

    async def cancel(self, job_id: int) -> None:
        """As a worker does: it stops at its next step and says so."""
        if job_id in self.holding:
            self.holding.remove(job_id)
            task = asyncio.create_task(self.on_event(job_id, Error("The job was cancelled.", "cancelled")))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def forget_adapter(self, key: str) -> None:
        pass

    async def forget_jobs(self, job_ids) -> None:
        pass


async def admin(fake: FakeDiscord, user, subcommand: str, options: dict[str, Any] | None = None, *,
                in_guild: bool = False) -> str:
    """`/admin <subcommand>` as `user`; the text they see once the bot answered."""
    interaction = await fake.invoke_command(user, f"admin {subcommand}", options, in_guild=in_guild)
    await fake.wait_for(lambda: last_text(interaction), timeout=30)
    assert all(r.message.ephemeral for r in interaction.responses if r.message is not None)
    return last_text(interaction)


async def queued_job(store, kind: str, owner: int) -> int:
    """A job of someone's waiting in the queue, made in storage with parameters as the bot stores them."""
    await users_db.ensure_user(store.db, owner)
    params = (TrainParams("zqjob", "person", TRAIN_DEFAULTS) if kind == "train"
              else GenerateParams(GenerateRequest("a portrait")))
    return await jobs_db.create_job(store.db, kind, owner, to_stored(params))


async def running_job(store, runner: HoldingRunner, kind: str, owner: int) -> int:
    """A job of someone's that a worker is running (claimed in storage, as the scheduler does; the test's
    runner takes no jobs itself: `capacity` 0)."""
    job_id = await queued_job(store, kind, owner)
    claimed = await jobs_db.claim_next_job(store.db, "local", 600, kinds=[kind])
    assert claimed is not None and claimed.id == job_id
    runner.holding.append(job_id)
    return job_id


@pytest.fixture
def people(fake: FakeDiscord):
    operator = fake.add_user("olga")
    fake.grant(operator, MANAGE_GUILD)  # without it, Discord offers her /admin only in her DM with the bot
    return {"operator": operator, "manager": fake.add_user("mona"), "plain": fake.add_user("pat"),
            "alice": fake.add_user("alice"), "bob": fake.add_user("bob")}


async def test_everyone_but_the_operators_is_refused_at_every_subcommand(fake, tmp_path, people):
    operator, manager, plain, bob = people["operator"], people["manager"], people["plain"], people["bob"]
    fake.grant(manager, MANAGE_GUILD)
    runner = HoldingRunner()
    runner.capacity = 0
    settings = e2e_settings(fake, tmp_path, admin_user_ids=(operator.id,), pictures_per_day=100,
                            train_cooldown_min=60)
    async with running_bot(fake, settings, runner) as run:
        [command] = [c for c in fake.commands() if c["name"] == "admin"]
        assert command["default_member_permissions"] == str(MANAGE_GUILD)  # Discord offers it to managers only
        assert {o["name"] for o in command["options"]} == set(SUBCOMMANDS)
        job = await queued_job(run.store, "generate", bob.id)
        options = {"queue": {}, "cancel": {"job": job}, "stats": {}, "limits": {"name": "pictures_per_day", "value": 1},
                   "ban": {"user": bob}, "unban": {"user": bob}, "forget": {"user": bob}}

        for subcommand in SUBCOMMANDS:
            # In a DM, where Discord applies no default permissions, the bot refuses by itself.
            for person in (plain, manager):
                assert OPERATOR_ONLY in await admin(fake, person, subcommand, options[subcommand])
            # In the server, Discord does not offer /admin to a member without Manage Server ...
            with pytest.raises(PermissionError):
                await fake.invoke_command(plain, f"admin {subcommand}", options[subcommand], in_guild=True)
            # ... and a member with it may set their own server's limits, nothing else.
            if subcommand != "limits":
                said = await admin(fake, manager, subcommand, options[subcommand], in_guild=True)
                assert said.startswith(f"Only this bot's operators can use `/admin {subcommand}`"), said

        db = run.store.db
        assert (await jobs_db.get_job(db, job)).state == "queued"
        assert await bans_db.get_ban(db, bob.id) is None and await users_db.get_user(db, bob.id) is not None
        assert await limits_db.guild_overrides(db, fake.guild.id) == {}
        assert await admin_log_db.recent_actions(db) == []  # nothing was done

        said = await admin(fake, manager, "limits", options["limits"], in_guild=True)
        assert "pictures_per_day is now 1" in said
        assert await limits_db.guild_overrides(db, fake.guild.id) == {"pictures_per_day": 1}
        assert "You can see and set the limits of this server only" in await admin(
            fake, manager, "limits", {"server": "12345"}, in_guild=True)
        [action] = await admin_log_db.recent_actions(db)
        assert (action.admin_id, action.guild_id, action.action) == (manager.id, fake.guild.id, "limits set")
        # A server may tighten what the operator allows, not loosen it (the GPUs are the operator's).
        for name, value in (("pictures_per_day", 0), ("pictures_per_day", 101), ("train_cooldown_min", 59)):
            said = await admin(fake, manager, "limits", {"name": name, "value": value}, in_guild=True)
            assert f"A server can only tighten `{name}`" in said
        assert "train_cooldown_min is now 120" in await admin(
            fake, manager, "limits", {"name": "train_cooldown_min", "value": 120}, in_guild=True)
        assert await limits_db.guild_overrides(db, fake.guild.id) == {"pictures_per_day": 1, "train_cooldown_min": 120}


async def test_the_operator_sees_the_queue_and_cancels_a_running_and_a_queued_job(fake, tmp_path, people):
    operator, alice, bob = people["operator"], people["alice"], people["bob"]
    runner = HoldingRunner()
    async with running_bot(fake, e2e_settings(fake, tmp_path, admin_user_ids=(operator.id,)), runner) as run:
        await ready_to_train(fake, alice, "zqalice")
        progress = await start_training(fake, alice)
        training = (await jobs_db.jobs_for_user(run.store.db, alice.id))[0].id
        await fake.wait_for(lambda: runner.holding == [training], timeout=30)
        waiting = [await queued_job(run.store, "generate", bob.id), await queued_job(run.store, "train", bob.id)]

        said = await admin(fake, operator, "queue")
        assert "**Running (1)**" in said and "**Waiting (2)**" in said
        assert f"#{training} training of <@{alice.id}> (`{alice.id}`), running" in said and "on gpu-0" in said
        assert f"1. #{waiting[0]} pictures of <@{bob.id}>" in said and f"2. #{waiting[1]} training of" in said

        runner.capacity = 0  # what is cancelled frees the worker; the queue stays as it is
        said = await admin(fake, operator, "cancel", {"job": training})
        assert f"Cancelling #{training} (training of <@{alice.id}>" in said
        await fake.wait_for(lambda: "Cancelled." in progress.content, timeout=30)
        assert CANCELLED_BY_OPERATOR in progress.content  # alice learns who stopped it
        said = await admin(fake, operator, "cancel", {"job": waiting[1]}, in_guild=True)
        assert f"Cancelling #{waiting[1]}" in said
        assert "is not queued or running" in await admin(fake, operator, "cancel", {"job": training})

        db = run.store.db
        assert (await jobs_db.get_job(db, training)).error == CANCELLED_BY_OPERATOR
        assert [(await jobs_db.get_job(db, j)).state for j in waiting] == ["queued", "cancelled"]
        said = await admin(fake, operator, "queue")
        assert "**Running (0)**" in said and f"1. #{waiting[0]}" in said and f"#{waiting[1]}" not in said
        actions = [(a.admin_id, a.action, a.detail) for a in reversed(await admin_log_db.recent_actions(db))]
        assert actions == [(operator.id, "queue", ""), (operator.id, "cancel", f"job {training} of user {alice.id}"),
                           (operator.id, "cancel", f"job {waiting[1]} of user {bob.id}"), (operator.id, "queue", "")]


async def test_a_ban_cancels_the_persons_jobs_and_lasts_until_lifted(fake, tmp_path, people):
    operator, bob = people["operator"], people["bob"]
    runner = HoldingRunner()
    runner.capacity = 0
    async with running_bot(fake, e2e_settings(fake, tmp_path, admin_user_ids=(operator.id,)), runner) as run:
        db = run.store.db
        running = await running_job(run.store, runner, "train", bob.id)
        waiting = [await queued_job(run.store, "generate", bob.id) for _ in range(2)]

        said = await admin(fake, operator, "ban", {"user": bob, "reason": "asked for pictures of others"},
                           in_guild=True)
        assert said.startswith(f"Banned <@{bob.id}>") and "Cancelled 3 job(s)" in said, said
        ban = await bans_db.get_ban(db, bob.id)
        assert (ban.banned_by, ban.reason) == (operator.id, "asked for pictures of others")

        async def all_cancelled() -> bool:
            return all([(await jobs_db.get_job(db, j)).state == "cancelled" for j in [running, *waiting]])

        assert not runner.holding  # the worker was told to stop the running one
        assert await wait_until(all_cancelled)
        assert "Already banned" in await admin(fake, operator, "ban", {"user": bob})
        assert "is one of this bot's operators" in await admin(fake, operator, "ban", {"user": operator})
        assert await bans_db.get_ban(db, operator.id) is None

        assert "may use the bot again" in await admin(fake, operator, "unban", {"user": bob})
        assert await bans_db.get_ban(db, bob.id) is None
        assert "is not banned" in await admin(fake, operator, "unban", {"user": bob})
        assert [a.action for a in await admin_log_db.recent_actions(db)] == ["unban", "ban", "ban"]


async def test_stats_count_what_was_done_and_what_the_disk_and_workers_hold(fake, tmp_path, people):
    operator, alice, bob = people["operator"], people["alice"], people["bob"]
    runner = HoldingRunner()
    runner.capacity = 0
    async with running_bot(fake, e2e_settings(fake, tmp_path, admin_user_ids=(operator.id,)), runner) as run:
        db, files = run.store.db, run.store.files
        running = await running_job(run.store, runner, "train", alice.id)
        picture = await queued_job(run.store, "generate", bob.id)
        await generations_db.add_generation(db, bob.id, None, picture, "p", "", [1, 2, 3], {},
                                            [files.write(bob.id, "generations", b"x" * 3000, ".png")])
        files.write(alice.id, "photos", b"y" * 100, ".jpg")
        await bans_db.ban(db, people["plain"].id, operator.id)

        said = await admin(fake, operator, "stats")
        assert "**People**: 2 known, 0 with a model, 1 banned" in said  # a ban alone keeps nothing of pat
        assert "• people active: 2 / 2" in said and "• pictures made: 3 / 3" in said
        assert f"1. <@{alice.id}> (`{alice.id}`): " in said  # her training holds the worker
        assert "photos 100 bytes (1 files)" in said and "pictures 2.9 KB (1 files)" in said
        assert f"• gpu-0 (test): busy, job(s) #{running}" in said
        assert [a.action for a in await admin_log_db.recent_actions(db)] == ["stats"]


async def test_limits_are_shown_and_set_per_server_by_an_operator_anywhere(fake, tmp_path, people):
    operator = people["operator"]
    settings = e2e_settings(fake, tmp_path, admin_user_ids=(operator.id,), trainings_per_day=2)
    async with running_bot(fake, settings, HoldingRunner()) as run:
        assert "In a DM, name the server" in await admin(fake, operator, "limits")
        assert "is not a server id" in await admin(fake, operator, "limits", {"server": "my server"})
        said = await admin(fake, operator, "limits", {"server": "4242", "name": "trainings_per_day", "value": 0})
        assert "trainings_per_day is now 0" in said and "`trainings_per_day`: 0, set for this server (default 2)" in said
        said = await admin(fake, operator, "limits", in_guild=True)
        assert f"**Limits of server `{fake.guild.id}`**" in said and "`trainings_per_day`: 2, the default" in said
        assert "Give `pictures_per_day` a value" in await admin(fake, operator, "limits",
                                                                {"name": "pictures_per_day"}, in_guild=True)
        assert "Name the limit" in await admin(fake, operator, "limits", {"reset": True}, in_guild=True)
        db = run.store.db
        assert await limits_db.guild_overrides(db, 4242) == {"trainings_per_day": 0}
        said = await admin(fake, operator, "limits", {"server": "4242", "name": "trainings_per_day", "reset": True})
        assert "back to the default" in said and "`trainings_per_day`: 2, the default" in said
        assert await limits_db.guild_overrides(db, 4242) == {}


async def test_forget_erases_a_person_after_the_operator_confirms(fake, tmp_path, people):
    operator, alice = people["operator"], people["alice"]
    runner = HoldingRunner()
    runner.capacity = 0
    async with running_bot(fake, e2e_settings(fake, tmp_path, admin_user_ids=(operator.id,)), runner) as run:
        db = run.store.db
        await ready_to_train(fake, alice, "zqalice")
        progress = await start_training(fake, alice)

        async def ask():
            interaction = await fake.invoke_command(operator, "admin forget", {"user": alice})
            prompt = await fake.wait_for(lambda: interaction.original, timeout=30)
            assert prompt.ephemeral and "can't be undone" in prompt.content
            return interaction, prompt

        interaction, prompt = await ask()
        keep = next(b["custom_id"] for b in prompt.buttons if b["label"] == "Keep")
        await fake.press_button(operator, prompt, keep)
        await fake.wait_for(lambda: "Nothing was erased" in interaction.original.content, timeout=30)
        assert await photos_db.count_photos(db, alice.id) == 5 and not progress.deleted

        interaction, prompt = await ask()
        erase = next(b["custom_id"] for b in prompt.buttons if b["label"] == "Erase everything")
        await fake.press_button(operator, prompt, erase)
        await fake.wait_for(lambda: "no longer has anything of" in interaction.original.content, timeout=30)
        assert await users_db.get_user(db, alice.id) is None and await photos_db.count_photos(db, alice.id) == 0
        assert await jobs_db.jobs_for_user(db, alice.id) == []
        assert progress.deleted  # the messages of hers are gone, as with her own /forget
        assert not run.store.files.user_dir(alice.id).exists()
        assert [(a.admin_id, a.action, a.detail) for a in await admin_log_db.recent_actions(db)] == [
            (operator.id, "forget", f"user {alice.id}")]
    assert fake.unknown_routes == []
