"""`/imagine`: pictures of the person, made with their own model only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.personal_defaults import request_options
from bot.replies import reply
from bot.scheduler import Refused
from bot.views import queued_text
from jobs.requests import MAX_IMAGES, STYLES, Aspect, BadRequest, GenerateRequest
from storage import user_settings_db
from storage.user_settings_db import PersonalDefaults

if TYPE_CHECKING:
    from bot.app import AvatarBot


class ImagineCog(commands.Cog):
    def __init__(self, bot: AvatarBot) -> None:
        self.bot = bot

    @app_commands.command(name="imagine", description="Pictures of you, made with your own model")
    @app_commands.describe(prompt="What to draw; your handle is added if you leave it out",
                           negative="What to avoid", count="How many pictures (1-4)",
                           seed="Repeat a picture with its seed", aspect="Shape of the pictures",
                           style="A look to add to the prompt",
                           face_pass="Redraw faces with your model for likeness (on unless your /settings say otherwise)")
    @app_commands.choices(style=[app_commands.Choice(name=name, value=name) for name in STYLES])
    async def imagine(self, interaction: discord.Interaction, prompt: str, negative: str | None = None,
                      count: app_commands.Range[int, 1, MAX_IMAGES] | None = None,
                      seed: app_commands.Range[int, 0, 2**31 - 1] | None = None,
                      aspect: Aspect | None = None, style: str | None = None, face_pass: bool | None = None) -> None:
        # None: left out, so the person's /settings default (or the built-in one) applies.
        try:
            grant = await self.bot.access.require(interaction.user, interaction)
            given = PersonalDefaults(negative_prompt=negative, style=style, aspect=aspect, num_images=count,
                                     face_pass=face_pass)
            defaults = await user_settings_db.get_defaults(self.bot.store.db, interaction.user.id)
            request = GenerateRequest(prompt=prompt, seed=seed, **request_options(given, defaults))
            request.check_length(self.bot.settings.max_prompt_chars)
        except (Refused, BadRequest) as exc:  # refused before anything public is shown
            await reply(interaction, exc.message)
            return
        if (refusal := await self.bot.safety.refusal(request, interaction.channel)) is not None:
            await reply(interaction, refusal)
            return
        try:  # the scheduler's refusals (no model yet, quotas) too, before anything public is shown
            await self.bot.scheduler.check_generate(interaction.user.id, request, grant.guild_id)
        except Refused as exc:
            await reply(interaction, exc.message)
            return
        # Defer first: Discord wants an answer within 3 seconds, the picture takes longer.
        await interaction.response.defer(thinking=True)
        try:
            job, position = await self.bot.scheduler.enqueue_generate(
                interaction.user.id, request, allow_flagged=not self.bot.safety.applies(interaction.channel),
                guild_id=grant.guild_id)
        except Refused as exc:  # e.g. the last of the quota taken between the check and now
            await interaction.delete_original_response()
            await reply(interaction, exc.message)
            return
        self.bot.notifier.attach_interaction(job.id, interaction)
        message = await interaction.edit_original_response(
            content=queued_text(position, self.bot.scheduler.waiting_for_a_worker()))
        await self.bot.notifier.remember_answer(job.id, message)


async def setup(bot: AvatarBot) -> None:
    await bot.add_cog(ImagineCog(bot))
    from bot.views import DYNAMIC_ITEMS

    bot.add_dynamic_items(*DYNAMIC_ITEMS)
