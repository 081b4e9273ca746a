"""What the bot may draw, and where: the prompt filter and the image checker's verdicts, by place.

SAFETY sets what DMs get: `off` no filter, `prompts` the prompt filter, `images` the prompt filter and
the image checker the workers run on every picture (trainer.safety_checker). A server channel always
gets both, whatever SAFETY says (the image checker where the workers loaded one), except a channel
Discord marks age-restricted when the operator allowed it (NSFW_IN_AGE_RESTRICTED): that one gets
none. `filter_applies` is that rule; everything that refuses a prompt or withholds a picture asks it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Literal, TypeVar

import discord

from bot.config import Settings
from bot.prompt_filter import PromptFilter
from jobs.payloads import Picture
from jobs.requests import GenerateRequest

log = logging.getLogger(__name__)

Place = Literal["dm", "server", "age_restricted"]
P = TypeVar("P", bound=Picture)

PROMPT_REFUSED = ("Sorry, I can't draw that here: your prompt contains something this server doesn't allow. "
                  "Please reword it and try again.")


def place_of(channel: object) -> Place:
    """Where a message goes: the person's DM with the bot, an age-restricted server channel, or any
    other channel (a group DM and a channel the bot cannot see count as server channels: filtered)."""
    if isinstance(channel, discord.DMChannel):
        return "dm"
    is_nsfw = getattr(channel, "is_nsfw", None)
    return "age_restricted" if callable(is_nsfw) and is_nsfw() else "server"


def filter_applies(settings: Settings, place: Place) -> bool:
    """Whether the prompt filter and the image checker's verdicts apply to what goes to `place`."""
    if place == "dm":
        return settings.safety != "off"
    return not (place == "age_restricted" and settings.nsfw_in_age_restricted)


def withheld_note(count: int) -> str:
    """What a person reads where pictures were held back."""
    if count == 1:
        return "1 picture was withheld by this server's safety filter."
    return f"{count} pictures were withheld by this server's safety filter."


class Safety:
    """The rule above with the prompt filter, which `load` reads once at start."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.prompts = PromptFilter([])

    async def load(self) -> None:
        # In a thread: reading and compiling the lists would hold up the event loop.
        self.prompts = await asyncio.to_thread(PromptFilter.load, self.settings.blocked_words_file)
        log.info("safety: SAFETY=%s, %d blocked words and phrases, age-restricted channels %s",
                 self.settings.safety, self.prompts.size,
                 "unfiltered" if self.settings.nsfw_in_age_restricted else "filtered")

    def applies(self, channel: object) -> bool:
        return filter_applies(self.settings, place_of(channel))

    async def refusal(self, request: GenerateRequest, channel: object) -> str | None:
        """Why `request` may not be drawn for `channel`, or None. The negative prompt is not read:
        people write there what they want kept out of the picture. In a thread: an operator's long
        list takes milliseconds to search, which the event loop owes everyone else."""
        if self.applies(channel) and await asyncio.to_thread(self.prompts.blocks, request.prompt, request.style):
            return PROMPT_REFUSED
        return None

    def shown(self, pictures: Sequence[P], channel: object) -> tuple[list[P], int]:
        """The pictures that may go to `channel`, and how many of the others the checker flagged."""
        if not self.applies(channel):
            return list(pictures), 0
        kept = [p for p in pictures if not p.flagged]
        return kept, len(pictures) - len(kept)
