"""Answering an interaction, for the client and its command groups (which bot.app imports, so they
cannot import it back)."""

from __future__ import annotations

import logging

import discord

log = logging.getLogger(__name__)


async def reply(interaction: discord.Interaction, message: str, *, ephemeral: bool = True) -> None:
    """Answer an interaction whether or not it was already answered or deferred."""
    try:
        if interaction.response.is_done():
            await interaction.followup.send(message, ephemeral=ephemeral)
        else:
            await interaction.response.send_message(message, ephemeral=ephemeral)
    except discord.HTTPException:
        log.warning("could not deliver a reply to an interaction", exc_info=True)

