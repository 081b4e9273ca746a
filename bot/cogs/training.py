"""`/train`: queue a training and keep one DM message up to date with its progress."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.consent import NEEDED_TO_TRAIN, needs_consent
from bot.progress import NO_WORKER_ONLINE, render_progress
from bot.replies import reply
from bot.scheduler import Refused
from jobs.requests import MAX_TRAIN_STEPS, MIN_TRAIN_STEPS
from storage import jobs_db

if TYPE_CHECKING:
    from bot.app import AvatarBot

log = logging.getLogger(__name__)

DMS_NEEDED = ("I couldn't send you a direct message, and that is where I show a training's progress and "
              "its results, so I didn't start it. Please allow direct messages from me (this server's "
              "Privacy Settings, or Discord's), then run `/train` again. Your photos are kept.")


class TrainingCog(commands.Cog):
    def __init__(self, bot: AvatarBot) -> None:
        self.bot = bot

    @app_commands.command(name="train", description="Train your personal model on the photos you sent")
    @app_commands.describe(steps="Training steps (default set by the server; more is slower, not always better)")
    async def train(self, interaction: discord.Interaction,
                    steps: app_commands.Range[int, MIN_TRAIN_STEPS, MAX_TRAIN_STEPS] | None = None) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            grant = await self.bot.access.require(interaction.user, interaction)
            if await needs_consent(self.bot, interaction.user.id):  # photos kept before consent was asked for
                raise Refused(NEEDED_TO_TRAIN)
            job, position = await self.bot.scheduler.enqueue_train(interaction.user.id, steps,
                                                                   guild_id=grant.guild_id)
        except Refused as exc:
            await reply(interaction, exc.message)
            return
        # Progress goes to a DM message edited with the bot token: it outlives the interaction.
        no_worker = self.bot.scheduler.waiting_for_a_worker()
        try:
            dm = interaction.user.dm_channel or await interaction.user.create_dm()
            message = await dm.send(render_progress(f"Training your model (job #{job.id})", {}, position,
                                                    no_worker=no_worker))
        except discord.HTTPException:  # DMs closed to the bot, or Discord failing: no training unseen
            log.warning("could not open the progress DM of job %d; cancelling it", job.id, exc_info=True)
            await self.bot.scheduler.cancel_user_jobs(interaction.user.id, kind="train")
            await reply(interaction, DMS_NEEDED)
            return
        await jobs_db.set_job_message(self.bot.store.db, job.id, dm.id, message.id)
        where = "in our DMs" if interaction.guild else "below"
        await reply(interaction, f"Training queued (position {position or 1}). I'll keep a progress "
                                 f"message up to date {where}." + (f"\n{NO_WORKER_ONLINE}" if no_worker else ""))


async def setup(bot: AvatarBot) -> None:
    await bot.add_cog(TrainingCog(bot))
