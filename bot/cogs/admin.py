"""/admin: the operators' view of the queue, the workers and the people, and the means to act on them.

Discord offers /admin in a server only to members with Manage Server (its default permissions);
in DMs those do not apply, so the bot checks every subcommand itself. The bot's operators
(ADMIN_USER_IDS) may use all of it, anywhere; a member with Manage Server may use `limits`, for
the server they use it in. Every answer is ephemeral, and every action is recorded with who did it
(storage.admin_log_db); refusals are logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.cogs.account import erase_person
from bot.progress import format_duration
from bot.replies import reply
from storage import admin_log_db, bans_db, jobs_db, limits_db, stats_db
from storage.jobs_db import CANCELLED_BY_OPERATOR, Job

if TYPE_CHECKING:
    from bot.app import AvatarBot

log = logging.getLogger(__name__)

DAY_S = 86400.0
MAX_REPLY_CHARS = 1900  # Discord's limit is 2000; room for the "and N more" line
TOP_PEOPLE = 10
KIND_LABELS = {"train": "training", "generate": "pictures"}
LIMIT_LABELS = {
    "trainings_per_day": "trainings a person may start a day",
    "pictures_per_day": "pictures a person may ask for a day",
    "train_cooldown_min": "minutes between two trainings of a person",
    "server_trainings_per_day": "trainings all people of the server together may start a day",
    "server_pictures_per_day": "pictures all people of the server together may ask for a day",
}
DISK_LABELS = {"photos": "photos", "models": "models", "generations": "pictures", "checkpoints": "checkpoints",
               "exports": "exports"}


def who(user_id: int) -> str:
    """A person as the admin sees them: a mention (it pings nobody: the bot allows no mentions) and the id."""
    return f"<@{user_id}> (`{user_id}`)"


def size_text(size: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def fit(lines: list[str]) -> str:
    """The lines that fit in one message, and how many more there were."""
    kept: list[str] = []
    used = 0
    for n, line in enumerate(lines):
        if used + len(line) + 1 > MAX_REPLY_CHARS:
            kept.append(f"… and {len(lines) - n} more lines")
            break
        kept.append(line)
        used += len(line) + 1
    return "\n".join(kept)


def loosens(name: str, value: int, default: int) -> bool:
    """Whether `value` allows more than the operator's default: the GPUs are the operator's, so only
    an operator may raise a limit; a server's managers may tighten it."""
    if name == "train_cooldown_min":  # minutes to wait: less is more
        return value < default
    return default != 0 and (value == 0 or value > default)  # 0: no limit


class AdminCog(commands.Cog):
    """The /admin group; each subcommand starts with `allowed`."""

    admin = app_commands.Group(name="admin", description="For the bot's operators: queue, stats, limits, bans",
                               default_permissions=discord.Permissions(manage_guild=True))

    def __init__(self, bot: AvatarBot) -> None:
        self.bot = bot

    # ----- who may ------------------------------------------------------------------------------
    def is_operator(self, user_id: int) -> bool:
        return user_id in self.bot.settings.admin_user_ids

    async def allowed(self, interaction: discord.Interaction, subcommand: str) -> bool:
        """Whether the person may use this subcommand here; if not, they are told so (kindly, once)."""
        if self.is_operator(interaction.user.id):
            return True
        manager = interaction.guild_id is not None and interaction.permissions.manage_guild
        if subcommand == "limits" and manager:
            return True
        log.info("refused /admin %s to user %d (server %s)", subcommand, interaction.user.id, interaction.guild_id)
        if manager:
            text = (f"Only this bot's operators can use `/admin {subcommand}`; with Manage Server you can use "
                    "`/admin limits` for this server.")
        else:
            text = ("`/admin` is for this bot's operators, and `/admin limits` for people with Manage Server on "
                    "their server; ask the bot's operator if something needs changing.")
        await reply(interaction, text)
        return False

    async def record(self, interaction: discord.Interaction, action: str, detail: str = "") -> None:
        await admin_log_db.record_action(self.bot.store.db, interaction.user.id, interaction.guild_id, action, detail)

    # ----- queue and cancel ---------------------------------------------------------------------
    @admin.command(name="queue", description="What runs and waits, for everyone, and on which worker")
    async def queue(self, interaction: discord.Interaction) -> None:
        if not await self.allowed(interaction, "queue"):
            return
        jobs = await jobs_db.jobs_in_states(self.bot.store.db, ("running", "queued"))  # in claim order
        await self.record(interaction, "queue")
        worker_of = {job_id: w.name for w in self.bot.scheduler.runner.worker_states() for job_id in w.jobs}
        now = time.time()
        running = [job for job in jobs if job.state == "running"]
        waiting = [job for job in jobs if job.state == "queued"]
        lines = [f"**Running ({len(running)})**"]
        lines += [self._running_line(job, worker_of.get(job.id), now) for job in running] or ["Nothing."]
        lines.append(f"**Waiting ({len(waiting)})**")
        lines += [f"{n}. #{job.id} {KIND_LABELS[job.kind]} of {who(job.owner)}, waiting "
                  f"{format_duration(now - job.created_at)}" for n, job in enumerate(waiting, 1)] or ["Nothing."]
        if waiting and self.bot.scheduler.waiting_for_a_worker():
            lines.append("No worker is online: the waiting jobs start when one is.")
        await reply(interaction, fit(lines))

    @staticmethod
    def _running_line(job: Job, worker: str | None, now: float) -> str:
        progress = job.progress
        step = f", step {progress['step']}/{progress['total']}" if progress.get("total") else ""
        where = f" on {worker}" if worker else ", not taken by a worker yet"  # Celery: still in the shared queue
        stopping = " (cancel asked)" if job.cancel_requested else ""
        return (f"• #{job.id} {KIND_LABELS[job.kind]} of {who(job.owner)}, running "
                f"{format_duration(now - (job.started_at or job.created_at))}{where}{step}{stopping}")

    @admin.command(name="cancel", description="Cancel anyone's queued or running job")
    @app_commands.describe(job="the job's number, as /admin queue shows it")
    async def cancel(self, interaction: discord.Interaction, job: app_commands.Range[int, 1]) -> None:
        if not await self.allowed(interaction, "cancel"):
            return
        cancelled = await self.bot.scheduler.cancel_job(job, reason=CANCELLED_BY_OPERATOR)
        if cancelled is None:
            await reply(interaction, f"Job #{job} is not queued or running; `/admin queue` shows those that are.")
            return
        await self.record(interaction, "cancel", f"job {job} of user {cancelled.owner}")
        await reply(interaction, f"Cancelling #{job} ({KIND_LABELS[cancelled.kind]} of {who(cancelled.owner)}); "
                                 "its owner is told that an operator cancelled it.")

    # ----- stats --------------------------------------------------------------------------------
    @admin.command(name="stats", description="People, trainings, pictures, GPU time, disk and workers")
    async def stats(self, interaction: discord.Interaction) -> None:
        if not await self.allowed(interaction, "stats"):
            return
        await interaction.response.defer(ephemeral=True, thinking=True)  # the disk is walked below
        db, now = self.bot.store.db, time.time()
        totals = await stats_db.totals(db)
        day, week = await stats_db.window(db, now - DAY_S), await stats_db.window(db, now - 7 * DAY_S)
        gpu = await stats_db.gpu_seconds_by_person(db, now - 7 * DAY_S, TOP_PEOPLE, now=now)
        disk = await asyncio.to_thread(self.bot.store.files.category_usage)
        workers = self.bot.scheduler.runner.worker_states()
        await self.record(interaction, "stats")
        lines = [
            f"**People**: {totals.people} known, {totals.with_model} with a model, {totals.banned} banned",
            "**Last 24 h / 7 days**",
            f"• people active: {day.active_people} / {week.active_people}",
            f"• trainings done: {day.trainings} / {week.trainings}",
            f"• pictures made: {day.pictures} / {week.pictures}",
            f"• pictures withheld by the filter: {day.flagged} / {week.flagged}",
            "**GPU time, last 7 days**",
            *([f"{n}. {who(owner)}: {format_duration(seconds)}" for n, (owner, seconds) in enumerate(gpu, 1)]
              or ["Nobody used a worker."]),
            "**Disk**: " + ", ".join(f"{DISK_LABELS[kind]} {size_text(size)} ({files} files)"
                                     for kind, (files, size) in disk.items()),
            f"**Workers ({len(workers)})**",
            *([f"• {w.name} ({w.where}): {w.state}" + (f", job(s) {', '.join(f'#{j}' for j in w.jobs)}"
                                                       if w.jobs else "") for w in workers]
              or ["None online."]),
        ]
        await reply(interaction, fit(lines))

    # ----- limits -------------------------------------------------------------------------------
    @admin.command(name="limits", description="Show or set a server's quotas")
    @app_commands.describe(name="the limit to set (leave it out to see them all)", value="its new value; 0: no limit",
                           reset="go back to the bot's default for this limit",
                           server="a server's id (for operators in a DM)")
    @app_commands.choices(name=[app_commands.Choice(name=n, value=n) for n in limits_db.LIMIT_NAMES])
    async def limits(self, interaction: discord.Interaction, name: str | None = None,
                     value: app_commands.Range[int, 0, 1_000_000] | None = None, reset: bool = False,
                     server: str | None = None) -> None:
        if not await self.allowed(interaction, "limits"):
            return
        guild_id = await self._limits_server(interaction, server)
        if guild_id is None:
            return
        db = self.bot.store.db
        defaults = limits_db.as_dict(self.bot.settings.default_limits)
        note = ""
        if name is not None:
            if not reset and (value is None or value < 0):
                await reply(interaction, f"Give `{name}` a value (0 means no limit), or `reset:True` to go back "
                                         "to the bot's default.")
                return
            if not reset and value is not None and not self.is_operator(interaction.user.id) \
                    and loosens(name, value, defaults[name]):
                await reply(interaction, f"A server can only tighten `{name}` (the bot's default is "
                                         f"{defaults[name]}); ask the bot's operator to allow more.")
                return
            await limits_db.set_guild_limit(db, guild_id, name, None if reset else value, interaction.user.id)
            await self.record(interaction, "limits set", f"server {guild_id}: {name}="
                                                         f"{'default' if reset else value}")
            note = f"{name} {'is back to the default' if reset else f'is now {value}'}.\n"
        elif value is not None or reset:
            await reply(interaction, "Name the limit to change with the `name` option.")
            return
        else:
            await self.record(interaction, "limits", f"server {guild_id}")
        overrides = await limits_db.guild_overrides(db, guild_id)
        lines = [f"{note}**Limits of server `{guild_id}`** (0: no limit)"]
        for limit, default in defaults.items():
            if limit in overrides:
                lines.append(f"• `{limit}`: {overrides[limit]}, set for this server (default {default}): "
                             f"{LIMIT_LABELS[limit]}")
            else:
                lines.append(f"• `{limit}`: {default}, the default: {LIMIT_LABELS[limit]}")
        await reply(interaction, "\n".join(lines))

    async def _limits_server(self, interaction: discord.Interaction, server: str | None) -> int | None:
        """The server whose limits are meant, or None after telling the person why there is none."""
        if server is None:
            if interaction.guild_id is None:
                await reply(interaction, "In a DM, name the server: `/admin limits server:<server id>` (Developer "
                                         "Mode, right-click the server, Copy Server ID).")
            return interaction.guild_id
        if not server.strip().isdigit():
            await reply(interaction, f"`{server}` is not a server id; copy one with Developer Mode, right-click the "
                                     "server, Copy Server ID.")
            return None
        guild_id = int(server.strip())
        if guild_id != interaction.guild_id and not self.is_operator(interaction.user.id):
            await reply(interaction, "You can see and set the limits of this server only; leave `server` out.")
            return None
        return guild_id

    # ----- people -------------------------------------------------------------------------------
    @admin.command(name="ban", description="Stop a person from using the bot; their jobs are cancelled")
    @app_commands.describe(user="the person to ban", reason="why (kept with the ban, seen by operators)")
    async def ban(self, interaction: discord.Interaction, user: discord.User,
                  reason: app_commands.Range[str, 0, 200] = "") -> None:
        if not await self.allowed(interaction, "ban"):
            return
        if self.is_operator(user.id):
            await reply(interaction, f"{who(user.id)} is one of this bot's operators; take them out of "
                                     "ADMIN_USER_IDS first if they should be banned.")
            return
        db = self.bot.store.db
        new = await bans_db.ban(db, user.id, interaction.user.id, reason)
        cancelled = await self.bot.scheduler.cancel_user_jobs(user.id, reason=CANCELLED_BY_OPERATOR)
        await self.record(interaction, "ban", f"user {user.id}" + (f": {reason}" if reason else ""))
        said = "Banned" if new else "Already banned:"
        await reply(interaction, f"{said} {who(user.id)}. Cancelled {len(cancelled)} job(s) of theirs"
                                 + (f": {', '.join(f'#{j.id}' for j in cancelled)}." if cancelled else "."))

    @admin.command(name="unban", description="Let a banned person use the bot again")
    @app_commands.describe(user="the person to unban")
    async def unban(self, interaction: discord.Interaction, user: discord.User) -> None:
        if not await self.allowed(interaction, "unban"):
            return
        if not await bans_db.unban(self.bot.store.db, user.id):
            await reply(interaction, f"{who(user.id)} is not banned.")
            return
        await self.record(interaction, "unban", f"user {user.id}")
        await reply(interaction, f"{who(user.id)} may use the bot again.")

    @admin.command(name="forget", description="Erase everything of a person, at their request")
    @app_commands.describe(user="the person who asked to be forgotten")
    async def forget(self, interaction: discord.Interaction, user: discord.User) -> None:
        if not await self.allowed(interaction, "forget"):
            return
        await interaction.response.send_message(
            f"This erases **everything** the bot has of {who(user.id)}: photos, models, pictures, jobs and the "
            "messages with their pictures. It can't be undone. A ban, if any, stays.",
            view=ConfirmErase(self, user.id), ephemeral=True)


class ConfirmErase(discord.ui.View):
    """The operator's second thought before /admin forget erases a person."""

    def __init__(self, cog: AdminCog, user_id: int) -> None:
        super().__init__(timeout=120)
        self.cog, self.user_id = cog, user_id

    @discord.ui.button(label="Erase everything", style=discord.ButtonStyle.danger)
    async def confirm(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        # Deferred first: forgetting waits for any photo of theirs being stored right now.
        await interaction.response.defer()
        await self.cog.record(interaction, "forget", f"user {self.user_id}")
        left = await erase_person(self.cog.bot, self.user_id)
        text = f"Done: the bot no longer has anything of {who(self.user_id)}."
        if left:
            text += f"\n{left} message(s) with their pictures could not be deleted (out of the bot's reach now)."
        await interaction.edit_original_response(content=text, view=None)

    @discord.ui.button(label="Keep", style=discord.ButtonStyle.secondary)
    async def keep(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.edit_message(content="Nothing was erased.", view=None)


async def setup(bot: AvatarBot) -> None:
    await bot.add_cog(AdminCog(bot))
