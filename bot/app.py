"""The Discord client: wires settings, storage, the job scheduler and the command groups together."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import discord
import redis
from discord import app_commands
from discord.ext import commands

from bot.apology import sorry
from bot.config import Settings
from bot.endpoints import use_discord_endpoints
from bot.notifier import Notifier
from bot.replies import reply
from bot.scheduler import Refused, Scheduler
from common.logs import setup_logging
from jobs.devices import NoSuchDevice, cpu_threads_per_worker, visible_devices
from jobs.local_runner import LocalProcessRunner
from jobs.runner import JobRunner
from jobs.worker_config import WorkerConfig
from storage.store import Storage

log = logging.getLogger(__name__)


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
                     workers_on_host=len(devices))
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
            # Commands work on servers and in DMs with the bot, for a server install and for people
            # who installed the app for themselves (README: "User Install").
            allowed_contexts=app_commands.AppCommandContext(guild=True, dm_channel=True, private_channel=True),
            allowed_installs=app_commands.AppInstallationType(guild=True, user=True))
        self.settings = settings
        self.store = store
        self.notifier = Notifier(self)
        self.scheduler = Scheduler(store, runner, settings, self.notifier)

    async def setup_hook(self) -> None:
        from bot.cogs import account, imagine, selfies, training

        for module in (selfies, account, training, imagine):
            await module.setup(self)
        self.tree.error(self.on_app_command_error)
        if self.settings.dev_guild_id:
            guild = discord.Object(self.settings.dev_guild_id)
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)
        else:
            await self.tree.sync()
        await self.scheduler.start()
        await self.notifier.resume()

    async def close(self) -> None:
        await self.scheduler.stop()
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
    """Open storage, start the bot and run until it is closed."""
    store = await Storage.open(settings.data_dir)
    try:
        bot = AvatarBot(settings, store, runner or build_runner(settings), guild_ready_timeout=guild_ready_timeout)
        async with bot:
            await bot.start(settings.discord_token)
    finally:
        await store.close()


def run_bot(settings: Settings) -> int:
    """`make run`: log set-up, endpoints, then serve until Ctrl-C."""
    setup_logging(settings.log_level, secrets=[settings.discord_token, settings.job_secret])
    use_discord_endpoints(settings.discord_api_base, settings.discord_gateway_url)
    try:
        asyncio.run(serve(settings))
    except discord.LoginFailure:
        log.error("Discord refused the token. Copy a fresh one from the Bot page of your application "
                  "into DISCORD_TOKEN.")
        return 2
    except KeyboardInterrupt:
        log.info("stopped")
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
