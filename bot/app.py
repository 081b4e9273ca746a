"""The Discord client: wires settings, storage, the job scheduler and the command groups together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import discord
import redis
from discord import app_commands
from discord.ext import commands

from bot.access import AccessControl, DiscordMembers
from bot.apology import sorry
from bot.config import Settings
from bot.endpoints import use_discord_endpoints
from bot.health import HEARTBEAT_INTERVAL_S, beat
from bot.housekeeping import Housekeeping
from bot.notifier import Notifier
from bot.replies import reply
from bot.safety import Safety
from bot.scheduler import Refused, Scheduler
from common.logs import setup_logging
from jobs.devices import NoSuchDevice, cpu_threads_per_worker, visible_devices
from jobs.local_runner import LocalProcessRunner
from jobs.runner import JobRunner
from jobs.worker_config import WorkerConfig, safety_checker_to_load
from storage.store import Storage
from storage.sweep import sweep_data_dir

log = logging.getLogger(__name__)

# `docker stop` sends SIGTERM, Ctrl-C SIGINT: both stop the bot as a restart should (see AvatarBot.close).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_NOTICE_TIMEOUT_S = 10.0  # the longest a stop waits for Discord to take the "stopping" edits


def build_runner(settings: Settings) -> JobRunner:
    """The job backend named by JOB_BACKEND: `local` runs one worker process per device; `celery`
    sends jobs through Redis to `python -m trainer worker` processes on any machine."""
    if settings.job_backend == "celery":
        from jobs.celery_runner import CeleryRunner

        return CeleryRunner(settings.redis_url, settings.job_secret, settings.max_job_message_bytes)
    devices = visible_devices(settings.device, settings.workers)
    work, shared = Path(settings.data_dir) / "work", Path(settings.data_dir) / "shared"
    remove_unused_work_dirs(work, len(devices))
    return LocalProcessRunner([
        WorkerConfig(base_model=settings.base_model, device=device, work_dir=str(work / f"worker-{i}"),
                     class_cache_dir=str(shared / "class_images"), log_level=settings.log_level,
                     cpu_threads=cpu_threads_per_worker(devices), compile_generation=settings.compile_generation,
                     compile_static_shapes=settings.compile_static_shapes,
                     compile_cache_dir=str(shared / "compiled"), compile_training=settings.compile_training,
                     train_rank=settings.train_rank, start_helpers=settings.start_helpers,
                     workers_on_host=len(devices),
                     safety_checker=safety_checker_to_load(settings.safety, settings.safety_checker),
                     quantize=settings.quantize)
        for i, device in enumerate(devices)
    ])


def remove_unused_work_dirs(work: Path, workers: int) -> None:
    """Remove the scratch folders of workers this start does not have (fewer GPUs or a lower
    WORKERS than before): they may hold people's LoRAs and checkpoints, which no worker would
    clear or evict again. Each remaining worker clears its own folder when it starts."""
    for folder in work.glob("worker-*"):
        suffix = folder.name.removeprefix("worker-")
        if folder.is_dir() and suffix.isdigit() and int(suffix) >= workers:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s: no worker uses it now", folder.name)


class AvatarBot(commands.Bot):
    """The bot: slash commands, DM photo intake and persistent buttons over one scheduler."""

    def __init__(self, settings: Settings, store: Storage, runner: JobRunner, *,
                 guild_ready_timeout: float = 2.0) -> None:
        """`guild_ready_timeout`: how long discord.py waits for more guilds before on_ready (tests shorten it)."""
        intents = discord.Intents.none()
        intents.guilds = True
        intents.dm_messages = True  # photos arrive as DM attachments; DMs need no Message Content intent
        super().__init__(
            command_prefix=commands.when_mentioned, intents=intents, help_command=None,
            guild_ready_timeout=guild_ready_timeout,
            # Messages repeat what people typed (prompts); nothing the bot sends may ping anyone.
            allowed_mentions=discord.AllowedMentions.none(),
            # Commands work on servers and in DMs with the bot, for a server install and, with
            # ALLOW_USER_INSTALL, for people who installed the app for themselves (README: "User Install").
            allowed_contexts=app_commands.AppCommandContext(guild=True, dm_channel=True, private_channel=True),
            allowed_installs=app_commands.AppInstallationType(guild=True, user=settings.allow_user_install))
        self.settings = settings
        self.store = store
        self.safety = Safety(settings)
        self.notifier = Notifier(self)
        self.access = AccessControl(settings, store, DiscordMembers(self))
        self.scheduler = Scheduler(store, runner, settings, self.notifier)
        self.housekeeping = Housekeeping(store, runner, settings.picture_retention_days)
        self.set_up = False  # commands synced, scheduler and workers started
        self._shutdown: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    async def setup_hook(self) -> None:
        from bot import consent
        from bot.cogs import account, admin, imagine, selfies, settings, training

        await self.safety.load()
        for module in (selfies, account, training, imagine, settings, admin, consent):
            await module.setup(self)
        self.tree.error(self.on_app_command_error)
        if self.settings.dev_guild_id:
            guild = discord.Object(self.settings.dev_guild_id)
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)
        else:
            await self.tree.sync()
        await self.scheduler.start()
        self.housekeeping.start()
        await self.notifier.resume()
        self.set_up = True
        if self.settings.heartbeat_file is not None:
            self._heartbeat = asyncio.create_task(self._keep_heartbeat(self.settings.heartbeat_file))

    async def on_ready(self) -> None:
        log.info("connected to Discord as %s", self.user)

    async def _keep_heartbeat(self, path: Path) -> None:
        """Rewrite the heartbeat file while the gateway connection is up (bot.health reads it)."""
        await self.wait_until_ready()
        while True:
            if self.is_ready() and self.ws is not None and self.ws.open:
                try:
                    beat(path)
                except OSError as exc:
                    log.warning("could not write the heartbeat file: %s", exc)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def close(self) -> None:
        """Stop gracefully, once however often it is called: the workers stop at their next step
        (the job stays `running` in the database with its last checkpoint, and the next start
        re-queues it from there), the people whose jobs wait or run are told, then Discord is left."""
        if self._shutdown is None:
            self._shutdown = asyncio.create_task(self._shut_down(), name="shutdown")
        await self._shutdown

    async def _shut_down(self) -> None:
        try:
            await self.housekeeping.stop()
            await self.scheduler.stop()
            if self.set_up:
                await self.notifier.bot_stopping(STOP_NOTICE_TIMEOUT_S)
        finally:
            if self._heartbeat is not None:
                self._heartbeat.cancel()
            if self.settings.heartbeat_file is not None:
                self.settings.heartbeat_file.unlink(missing_ok=True)
            await super().close()

    async def on_app_command_error(self, interaction: discord.Interaction,
                                   error: app_commands.AppCommandError) -> None:
        """Every failure ends in a kind message; unexpected ones carry a reference for the logs."""
        original = getattr(error, "original", error)
        if isinstance(original, Refused):
            message = original.message
        elif isinstance(error, app_commands.CommandOnCooldown):
            message = f"Slow down a little; try again in {error.retry_after:.0f} s."
        else:
            message = sorry(log, f"command {getattr(interaction.command, 'name', '?')}", exc_info=original)
        await reply(interaction, message)


async def serve(settings: Settings, runner: JobRunner | None = None, *, guild_ready_timeout: float = 2.0) -> None:
    """Open storage, sweep what a crash left, start the bot and run until it is closed, or stopped
    by SIGTERM or SIGINT."""
    stop = asyncio.Event()
    with stop_on_signals(stop):
        store = await Storage.open(settings.data_dir)
        try:
            await sweep_data_dir(store)
            bot = AvatarBot(settings, store, runner or build_runner(settings), guild_ready_timeout=guild_ready_timeout)
            async with bot:
                await run_until_stopped(bot, settings.discord_token, stop)
        finally:
            await store.close()


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT set `stop`; a second one while stopping takes the handlers
    away, so a third stops the process at once (the operator's way out of a stop that hangs)."""
    loop = asyncio.get_running_loop()

    def received(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("%s received: stopping; trainings stop at their next step and continue after a restart",
                     sig.name)
            stop.set()
            return
        log.warning("%s received again: still stopping; one more stops at once", sig.name)
        for each in STOP_SIGNALS:
            loop.remove_signal_handler(each)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, received, sig)
    try:
        yield
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


async def run_until_stopped(bot: AvatarBot, token: str, stop: asyncio.Event) -> None:
    """Run the bot until it ends on its own (an error, which is raised here) or `stop` is set; then
    close it. A bot still logging in or setting up is cut short first: its set-up has nothing to
    finish, and closing alone would let it start workers after the close."""
    running = asyncio.create_task(bot.start(token), name="discord")
    stopping = asyncio.create_task(stop.wait(), name="stop-signal")
    try:
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if running.done():
        await running
        return
    if not bot.set_up:
        running.cancel()
    await bot.close()
    [outcome] = await asyncio.gather(running, return_exceptions=True)  # ends once closed
    if isinstance(outcome, Exception):
        raise outcome


def run_bot(settings: Settings) -> int:
    """`make run`: log set-up, endpoints, then serve until SIGTERM or Ctrl-C (exit 0). A setting the
    bot cannot work with, a refused token included, exits 2: restarting will not help."""
    setup_logging(settings.log_level, secrets=[settings.discord_token, settings.job_secret])
    use_discord_endpoints(settings.discord_api_base, settings.discord_gateway_url)
    try:
        asyncio.run(serve(settings))
        log.info("stopped")
    except discord.LoginFailure:
        log.error("Discord refused the token. Copy a fresh one from the Bot page of your application "
                  "into DISCORD_TOKEN.")
        return 2
    except KeyboardInterrupt:  # a third Ctrl-C during a stop (stop_on_signals)
        log.info("stopped at once")
    except NoSuchDevice as exc:
        log.error("%s", exc)
        return 2
    except discord.Forbidden as exc:
        log.error("Discord refused a request (%s). If DEV_GUILD_ID is set, it must be a server the bot "
                  "has joined; invite the bot there or leave DEV_GUILD_ID empty.", exc.text or exc.status)
        return 1
    except redis.RedisError as exc:
        log.error("Could not use Redis (%s). With JOB_BACKEND=celery the bot needs the Redis server of "
                  "REDIS_URL: start it, or fix REDIS_URL.", exc)
        return 1
    except (discord.HTTPException, OSError) as exc:  # aiohttp's connection errors are OSErrors
        log.error("Could not reach Discord (%s). Check this machine's network (and DISCORD_API_BASE if "
                  "set), then start the bot again.", exc)
        return 1
    except Exception:  # logged here, through the filter that keeps secrets out of the log
        log.exception("the bot stopped on an unexpected error")
        return 1
    return 0
