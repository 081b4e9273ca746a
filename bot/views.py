"""Buttons. Their custom ids carry the ids they act on, and their parameters come from the
database, so a button under an old message keeps working after the bot restarts."""

from __future__ import annotations

import logging
import random
import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import discord

from bot.apology import sorry
from bot.progress import NO_WORKER_ONLINE
from bot.scheduler import Refused
from jobs.payloads import GenerateParams, VariationOf, from_stored

if TYPE_CHECKING:
    from bot.app import AvatarBot

log = logging.getLogger(__name__)

VARIATION_STRENGTH = 0.6  # how far "more like #N" may move away from the chosen image
UPSCALE_STRENGTH = 0.3  # how much "U#N" redraws the enlarged picture (see trainer.upscale)


async def _answer_privately(interaction: discord.Interaction, message: str) -> None:
    """Tell only the person who pressed, before or after the press was deferred."""
    if not interaction.response.is_done():
        await interaction.response.send_message(message, ephemeral=True)
        return
    # The first followup would take over the public "thinking" message, whatever its own flags
    # say: remove that first, so the answer reaches only the person who pressed (as /imagine).
    await interaction.delete_original_response()
    await interaction.followup.send(message, ephemeral=True)


async def _queue_generation(interaction: discord.Interaction, generation_id: int,
                            index: int | None, *, upscale: bool = False) -> None:
    """Reroll (index None), vary image `index` or (`upscale`) upscale it. discord.py only logs a failing
    button callback and leaves the person on "thinking…", so an unexpected failure is answered here,
    with a reference."""
    try:
        await _enqueue_from_button(interaction, generation_id, index, upscale=upscale)
    except Exception:
        button = ("Reroll" if index is None else f"U#{index + 1}" if upscale else f"More like #{index + 1}")
        message = sorry(log, f"button {button} of generation {generation_id}")
        try:
            await _answer_privately(interaction, message)
        except discord.HTTPException:
            log.warning("could not answer a button press (%s)", message, exc_info=True)


async def _enqueue_from_button(interaction: discord.Interaction, generation_id: int,
                               index: int | None, *, upscale: bool = False) -> None:
    """Reroll (index None: same request, new seeds; under a variation, new variations of the same
    picture), vary image `index` with img2img, or (`upscale`) upscale it 2x: a job of its own, one
    picture for the quotas, redrawn from that picture's seed so that it keeps its look."""
    from storage import generations_db

    bot: AvatarBot = interaction.client  # type: ignore[assignment]
    generation = await generations_db.get_generation(bot.store.db, generation_id)
    if generation is None:
        await _answer_privately(interaction, "Those pictures were deleted, so I can't make more like them.")
        return
    if generation.owner != interaction.user.id:
        await _answer_privately(interaction, "These buttons belong to the person who made these pictures. "
                                               "Use `/imagine` to make your own.")
        return
    try:
        grant = await bot.access.require(interaction.user, interaction)
    except Refused as exc:
        await _answer_privately(interaction, exc.message)
        return
    stored = from_stored("generate", generation.params)
    assert isinstance(stored, GenerateParams)
    request = replace(stored.request, seed=random.randrange(2**31))
    variation = stored.variation_of  # a Reroll varies the same picture again
    upscale_of = None
    if upscale and index is not None:
        if index >= len(generation.seeds):
            await _answer_privately(interaction, "That picture is no longer stored, so I can't upscale it.")
            return
        request = replace(request, num_images=1, seed=generation.seeds[index], strength=UPSCALE_STRENGTH)
        variation, upscale_of = None, VariationOf(generation_id, index)
    elif index is not None:
        request = replace(request, num_images=1, strength=VARIATION_STRENGTH)
        variation = VariationOf(generation_id, index)
    if (refusal := await bot.safety.refusal(request, interaction.channel)) is not None:
        await _answer_privately(interaction, refusal)  # the filter may apply here and not where they were made
        return
    try:  # quotas and the queue's limits, before the public "thinking…"
        await bot.scheduler.check_generate(interaction.user.id, request, grant.guild_id)
    except Refused as exc:
        await _answer_privately(interaction, exc.message)
        return
    await interaction.response.defer(thinking=True)
    try:
        job, position = await bot.scheduler.enqueue_generate(
            interaction.user.id, request, variation_of=variation, upscale_of=upscale_of,
            allow_flagged=not bot.safety.applies(interaction.channel), guild_id=grant.guild_id)
    except Refused as exc:
        await _answer_privately(interaction, exc.message)
        return
    bot.notifier.attach_interaction(job.id, interaction)
    message = await interaction.edit_original_response(
        content=queued_text(position, bot.scheduler.waiting_for_a_worker()))
    await bot.notifier.remember_answer(job.id, message)


def queued_text(position: int | None, no_worker: bool = False) -> str:
    """The first answer to a picture request; `no_worker`: none is online to take it."""
    if not position:
        return "Starting…"
    return f"Queued (position {position}). {NO_WORKER_ONLINE}" if no_worker else f"Queued (position {position})."


class RerollButton(discord.ui.DynamicItem[discord.ui.Button], template=r"gen:(?P<gen>\d+):reroll"):
    """Same prompt and settings, new seeds (for a variation: of the same picture)."""

    def __init__(self, generation_id: int) -> None:
        super().__init__(discord.ui.Button(label="Reroll", emoji="🎲", style=discord.ButtonStyle.primary,
                                           custom_id=f"gen:{generation_id}:reroll"))
        self.generation_id = generation_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any],
                             match: re.Match[str]) -> RerollButton:
        return cls(int(match["gen"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await _queue_generation(interaction, self.generation_id, None)


class MoreLikeButton(discord.ui.DynamicItem[discord.ui.Button], template=r"gen:(?P<gen>\d+):more:(?P<idx>\d)"):
    """An img2img variation of one image of the set."""

    def __init__(self, generation_id: int, index: int) -> None:
        super().__init__(discord.ui.Button(label=f"More like #{index + 1}", style=discord.ButtonStyle.secondary,
                                           custom_id=f"gen:{generation_id}:more:{index}"))
        self.generation_id, self.index = generation_id, index

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any],
                             match: re.Match[str]) -> MoreLikeButton:
        return cls(int(match["gen"]), int(match["idx"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await _queue_generation(interaction, self.generation_id, self.index)


class UpscaleButton(discord.ui.DynamicItem[discord.ui.Button], template=r"gen:(?P<gen>\d+):up:(?P<idx>\d)"):
    """One image of the set at twice its width and height, answered as a new message."""

    def __init__(self, generation_id: int, index: int) -> None:
        # A row of their own, under Reroll and the "More like" buttons (at most 5 a row; 4 pictures
        # make 1 + 4 there and 4 here).
        super().__init__(discord.ui.Button(label=f"U#{index + 1}", style=discord.ButtonStyle.secondary,
                                           custom_id=f"gen:{generation_id}:up:{index}"), row=1)
        self.generation_id, self.index = generation_id, index

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any],
                             match: re.Match[str]) -> UpscaleButton:
        return cls(int(match["gen"]), int(match["idx"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await _queue_generation(interaction, self.generation_id, self.index, upscale=True)


def imagine_view(generation_id: int, count: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(RerollButton(generation_id))
    for index in range(count):
        view.add_item(MoreLikeButton(generation_id, index))
    for index in range(count):
        view.add_item(UpscaleButton(generation_id, index))
    return view


DYNAMIC_ITEMS = (RerollButton, MoreLikeButton, UpscaleButton)
