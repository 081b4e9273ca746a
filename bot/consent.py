"""Consent: before the first photo of a person is kept, they agree to CONSENT_TEXT with a button.

The answer and its time are recorded (storage.consents_db) against a digest of the text, so a
changed text asks again; `/forget` removes it. The buttons carry the digest of the text they were
shown under, so nobody agrees to a text they did not see, and work after a restart.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.replies import reply
from storage.consents_db import consent_time, record_consent, text_digest

if TYPE_CHECKING:
    from bot.app import AvatarBot

log = logging.getLogger(__name__)

NOT_KEPT = ("I didn't keep the photos you just sent. If you agree, press **I agree** below and then send them "
            "again.")
NEEDED_TO_TRAIN = ("Before I train a model of your face I need your agreement: run `/consent` and press "
                   "**I agree**, then `/train` again.")


def _short(text: str) -> str:
    """The part of the text's digest a button carries (custom ids hold at most 100 characters)."""
    return text_digest(text)[:16]


async def needs_consent(bot: AvatarBot, user_id: int) -> bool:
    """Whether the operator asks for consent and this person has not agreed to the current text."""
    settings = bot.settings
    return settings.require_consent and await consent_time(bot.store.db, user_id, settings.consent_text) is None


def consent_view(text: str) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(ConsentButton("agree", _short(text)))
    view.add_item(ConsentButton("decline", _short(text)))
    return view


def agreed_line(when: float) -> str:
    return (f"✅ You agreed on <t:{int(when)}:f>. `/forget` withdraws it and deletes everything I have of "
            "you.")


class ConsentButton(discord.ui.DynamicItem[discord.ui.Button], template=r"consent:(?P<choice>agree|decline):"
                                                                       r"(?P<digest>[0-9a-f]{16})"):
    """I agree / No, thanks under the consent text."""

    def __init__(self, choice: str, digest: str) -> None:
        label, style = (("I agree", discord.ButtonStyle.success) if choice == "agree"
                        else ("No, thanks", discord.ButtonStyle.secondary))
        super().__init__(discord.ui.Button(label=label, style=style, custom_id=f"consent:{choice}:{digest}"))
        self.choice, self.digest = choice, digest

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any],
                             match: re.Match[str]) -> ConsentButton:
        return cls(match["choice"], match["digest"])

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: AvatarBot = interaction.client  # type: ignore[assignment]
        text = bot.settings.consent_text
        if self.digest != _short(text):  # the operator changed the text since this was shown
            await interaction.response.edit_message(
                content=f"{text}\n\nThe text above changed since I first asked; please read it again.",
                view=consent_view(text))
            return
        user_id = interaction.user.id
        if self.choice == "agree":
            now = time.time()
            await record_consent(bot.store.db, user_id, text, now)
            log.info("user %d agreed to the consent text", user_id)
            await interaction.response.edit_message(
                content=f"{text}\n\n{agreed_line(now)}\nNow send me your selfies here.", view=None)
            return
        agreed = await consent_time(bot.store.db, user_id, text)
        outcome = (agreed_line(agreed) if agreed is not None else
                   "You didn't agree, so I keep no photo of yours. If you change your mind, run `/consent`.")
        await interaction.response.edit_message(content=f"{text}\n\n{outcome}", view=None)


class ConsentCog(commands.Cog):
    def __init__(self, bot: AvatarBot) -> None:
        self.bot = bot

    @app_commands.command(name="consent", description="What you agree to before I keep your photos")
    async def consent(self, interaction: discord.Interaction) -> None:
        text = self.bot.settings.consent_text
        agreed = await consent_time(self.bot.store.db, interaction.user.id, text)
        if agreed is not None:
            await reply(interaction, f"{text}\n\n{agreed_line(agreed)}")
            return
        if not self.bot.settings.require_consent:
            await reply(interaction, f"{text}\n\nThis bot does not ask for it before keeping photos.")
            return
        await interaction.response.send_message(f"{text}\n\nYou haven't agreed yet.", view=consent_view(text),
                                                ephemeral=True)


async def setup(bot: AvatarBot) -> None:
    await bot.add_cog(ConsentCog(bot))
    bot.add_dynamic_items(ConsentButton)
