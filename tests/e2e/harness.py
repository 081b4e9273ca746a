"""End-to-end harness: the real bot (discord.py, storage, scheduler, worker processes) against FakeDiscord.

The bot runs on the `tiny` random model on the CPU, with settings small enough that a whole training
takes seconds. `BotProcess` starts and stops the bot inside the test's event loop the way `make run`
does (login, command sync, gateway connect), so a test can stop it and start a new one over the same
data folder to see what survives a restart. `BotSubprocess` runs `python -m bot` itself, for what
only a process of its own shows: how it answers signals, its exit status and its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bot.app import AvatarBot, build_runner
from bot.config import ENV_NAMES, Settings
from bot.endpoints import use_discord_endpoints
from jobs.runner import JobRunner
from storage.store import DB_NAME, Storage
from tests.fakediscord import FakeDiscord
from tests.photos_factory import selfie
from tests.polling import wait_until
from tests.work_items import JOB_SECRET

# Long enough for several progress edits and a checkpoint, short enough for two CPU cores.
TRAIN_STEPS = 24


def e2e_settings(fake: FakeDiscord, data_dir: Path, **overrides: object) -> Settings:
    """Settings as an operator of a CPU demo would write them, pointed at the fake Discord."""
    base = Settings(
        discord_token=fake.bot_token,
        job_secret=JOB_SECRET,
        data_dir=data_dir,
        base_model="tiny",
        device="cpu",
        workers=1,
        discord_api_base=fake.api_base,
        discord_gateway_url=fake.gateway_url,
        min_photos=5,
        max_photos=12,
        max_photo_mb=1,
        train_steps=TRAIN_STEPS,
        train_resolution=64,
        train_rank=4,
        train_learning_rate=1e-3,
        class_images=4,
        train_checkpoint_every=4,
        train_preview_every=8,
        progress_interval_s=0.3,
        # A server of one trusted person: the tests of consent and quotas turn these on themselves.
        require_consent=False,
        trainings_per_day=0,
        pictures_per_day=0,
        train_cooldown_min=0,
        server_trainings_per_day=0,
        server_pictures_per_day=0,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


@dataclass
class LoopLag:
    """Measures how late the event loop wakes a task that sleeps `interval` seconds, over and over.

    The largest lateness is the longest time something blocked the loop (a handler that computed
    instead of awaiting), within the resolution of `interval`.
    """

    interval: float = 0.01
    worst: float = 0.0
    samples: int = 0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.worst = max(self.worst, time.perf_counter() - started - self.interval)
            self.samples += 1

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class BotProcess:
    """One run of the bot: storage opened, commands synced, gateway connected; `stop` closes it all."""

    def __init__(self, fake: FakeDiscord, settings: Settings, runner: JobRunner | None = None) -> None:
        self.fake = fake
        self.settings = settings
        self.runner = runner
        self.bot: AvatarBot | None = None
        self.store: Storage | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> AvatarBot:
        use_discord_endpoints(self.settings.discord_api_base, self.settings.discord_gateway_url)
        identified = self.fake.identify_count
        self.store = await Storage.open(self.settings.data_dir)
        self.runner = self.runner or build_runner(self.settings)
        self.bot = AvatarBot(self.settings, self.store, self.runner, guild_ready_timeout=0.05)
        await self.bot.login(self.settings.discord_token)
        self._task = asyncio.create_task(self.bot.connect())
        await self.fake.wait_connected(identify_count=identified + 1, timeout=30)
        await asyncio.wait_for(self.bot.wait_until_ready(), 30)
        return self.bot

    async def stop(self) -> None:
        if self.bot is not None:
            async with asyncio.timeout(60):  # a shutdown that hangs fails the test instead of stalling it
                await self.bot.close()
        if self._task is not None:
            await asyncio.wait_for(self._task, 30)
        if self.store is not None:
            await self.store.close()
        self.bot = self.store = self._task = None
        use_discord_endpoints(None, None)  # discord.py's endpoints are process-wide


def settings_environment(settings: Settings) -> dict[str, str]:
    """`settings` as the environment variables `python -m bot` reads them from."""
    env = {}
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if isinstance(value, tuple):  # id and role lists: comma-separated, as an operator writes them
            env[ENV_NAMES[f.name]] = ",".join(map(str, value))
        elif value is not None:
            env[ENV_NAMES[f.name]] = str(int(value)) if isinstance(value, bool) else str(value)
    return env


class BotSubprocess:
    """`python -m bot` in a process of its own, as an operator runs it, against the fake Discord.

    Its settings come from the environment (none from the test's: only `settings`), its working
    folder has no `.env`, and everything it logs goes to `log_path`.
    """

    def __init__(self, fake: FakeDiscord, settings: Settings, log_path: Path) -> None:
        self.fake, self.settings, self.log_path = fake, settings, log_path
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        """Start it and wait until it is connected and ready (its on_ready log line)."""
        identified = self.fake.identify_count
        env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES.values()}
        env.update(settings_environment(self.settings), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        cwd = self.log_path.parent / f"cwd-{self.log_path.stem}"
        cwd.mkdir(exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "bot"], env=env, cwd=cwd,
                                            stdout=log, stderr=subprocess.STDOUT)
        await self.fake.wait_connected(identify_count=identified + 1, timeout=60)
        ready = await wait_until(lambda: "connected to Discord as" in self.log() or self.process.poll() is not None)
        assert ready and self.process.poll() is None, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def send_signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def exit_status(self, timeout: float = 120) -> int | None:
        """Its exit status once it has ended, None if it is still running after `timeout` seconds."""
        assert self.process is not None
        await wait_until(lambda: self.process.poll() is not None, timeout=timeout)
        return self.process.poll()

    def kill(self) -> None:
        """Whatever a failed test left running (the worker children end with their pipes)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def stored_rows(data_dir: Path, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Rows of the database of a bot running in another process, read without writing to it."""
    db = sqlite3.connect(f"file:{data_dir / DB_NAME}?mode=ro", uri=True, timeout=10)
    try:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(sql, params)]
    finally:
        db.close()


@contextlib.asynccontextmanager
async def running_bot(fake: FakeDiscord, settings: Settings,
                      runner: JobRunner | None = None) -> AsyncIterator[BotProcess]:
    process = BotProcess(fake, settings, runner)
    await process.start()
    try:
        yield process
    finally:
        await process.stop()


# --- what a test does and reads as a person ---------------------------------------------------------


def last_text(interaction) -> str:
    """The text a person finally sees for an interaction: the last message the bot wrote for it."""
    messages = [r.message for r in interaction.responses if r.message is not None]
    return messages[-1].content if messages else ""


async def ready_to_train(fake: FakeDiscord, user, handle: str) -> None:
    """Five selfies by DM and a handle, as a person would do it."""
    await fake.send_dm(user, attachments=[(f"s{i}.jpg", selfie(i + 3 * len(handle)), "image/jpeg")
                                          for i in range(5)])
    await fake.wait_for_message(fake.dm_channel_of(user), lambda m: "ready to `/train`" in m.content, timeout=60)
    named = await fake.invoke_command(user, "handle", {"name": handle, "class": "person"})
    await fake.wait_for(lambda: "Your handle is" in last_text(named), timeout=10)


async def start_training(fake: FakeDiscord, user):
    """`/train`, and the DM progress message it starts."""
    train = await fake.invoke_command(user, "train")
    await fake.wait_for(lambda: "Training queued" in last_text(train), timeout=30)
    return await fake.wait_for_message(fake.dm_channel_of(user),
                                       lambda m: m.from_bot and "Training your model" in m.content)


def samples_message(fake: FakeDiscord, user):
    """The DM with sample pictures that ends a training, once there is one."""
    return next((m for m in fake.bot_messages_to(user) if m.attachments and "Here is" in m.content), None)


async def finished_job(store: Storage, job_id: int):
    """The job once it has ended, else None."""
    from storage import jobs_db

    job = await jobs_db.get_job(store.db, job_id)
    return job if job.state in ("succeeded", "failed", "cancelled") else None
