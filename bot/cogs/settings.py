"""`/settings`: a person's own defaults for /imagine, changed in a private panel and saved at once.

The panel is an ephemeral message with a view that lives in memory for PANEL_TIMEOUT_S; then (or
after a restart, when its controls stop answering) the person runs /settings again. Nothing of the
panel needs to survive a restart: the values are in the database from the moment they are chosen.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.apology import sorry
from bot.personal_defaults import effective, usable
from bot.replies import reply
from bot.scheduler import Refused
from jobs.requests import ASPECTS, MAX_IMAGES, STYLES, BadRequest, GenerateRequest
from storage import user_settings_db
from storage.user_settings_db import NO_DEFAULTS, PersonalDefaults

if TYPE_CHECKING:
    from bot.app import AvatarBot

log = logging.getLogger(__name__)

PANEL_TIMEOUT_S = 600  # under the 15 minutes an interaction's token lasts, so the panel can say it closed
NO_STYLE = "none"  # the style menu's value for no style (no style is called that)
TEXT_INPUT_MAX = 4000  # the most Discord lets a modal's text field hold
NEGATIVE_SHOWN = 200  # characters of the negative prompt shown in the panel
CLOSED = "This panel has closed; run `/settings` again to change your defaults."


def panel_text(defaults: PersonalDefaults) -> str:
    """The panel's message: what /imagine uses for each option left out, and whose default it is."""
    values = effective(defaults)

    def shown(name: str, text: str) -> str:
        return text if usable(name, getattr(defaults, name)) else f"{text} (built-in)"

    negative = values["negative_prompt"]
    if negative:
        cut = negative if len(negative) <= NEGATIVE_SHOWN else negative[:NEGATIVE_SHOWN] + "…"
        negative_text = discord.utils.escape_markdown(cut)
    else:
        negative_text = "none"
    lines = [
        "**Your defaults for `/imagine`**: used when you leave an option out; an option you give wins.",
        f"• Style: {shown('style', values['style'] or 'none')}",
        f"• Shape: {shown('aspect', values['aspect'])}",
        f"• Pictures: {shown('num_images', str(values['num_images']))}",
        f"• Face pass: {shown('face_pass', 'on' if values['face_pass'] else 'off')}",
        f"• Negative prompt: {shown('negative_prompt', negative_text)}",
    ]
    return "\n".join(lines)


# The panel's menus, named: mypy infers nothing (Never) from discord.ui.select's default class.
Menu = discord.ui.Select["SettingsPanel"]


class SettingsPanel(discord.ui.View):
    """The controls under the panel; each change is saved, then the panel shows the new values."""

    def __init__(self, bot: AvatarBot, opened: discord.Interaction, defaults: PersonalDefaults) -> None:
        """`opened`: the /settings interaction, whose token lets the panel say when it has closed."""
        super().__init__(timeout=PANEL_TIMEOUT_S)
        self.bot, self.opened, self.owner = bot, opened, opened.user.id
        self.show(defaults)

    def show(self, defaults: PersonalDefaults) -> None:
        """Mark the values in effect in the menus and on the face pass button."""
        self.defaults = defaults
        values = effective(defaults)
        self.style.options = [discord.SelectOption(label="No style", value=NO_STYLE,
                                                   default=values["style"] is None)]
        self.style.options += [discord.SelectOption(label=name.title(), value=name, default=values["style"] == name)
                               for name in STYLES]
        self.aspect.options = [discord.SelectOption(label=name.title(), value=name, default=values["aspect"] == name)
                               for name in ASPECTS]
        self.count.options = [discord.SelectOption(label=f"{n} picture{'s' if n > 1 else ''}", value=str(n),
                                                   default=values["num_images"] == n)
                              for n in range(1, MAX_IMAGES + 1)]
        on = values["face_pass"]
        self.face_pass.label = f"Face pass: {'on' if on else 'off'}"
        self.face_pass.style = discord.ButtonStyle.success if on else discord.ButtonStyle.secondary

    async def save(self, interaction: discord.Interaction, **changes: Any) -> None:
        defaults = await user_settings_db.set_defaults(self.bot.store.db, self.owner, **changes)
        self.show(defaults)
        if self.is_finished():  # a form sent after the panel closed: saved, but its controls stay gone
            await interaction.response.edit_message(content=f"{panel_text(defaults)}\n{CLOSED}", view=None)
            return
        await interaction.response.edit_message(content=panel_text(defaults), view=self)

    @discord.ui.select(cls=Menu, placeholder="Style", row=0)
    async def style(self, interaction: discord.Interaction, select: Menu) -> None:
        value = select.values[0]
        await self.save(interaction, style=None if value == NO_STYLE else value)

    @discord.ui.select(cls=Menu, placeholder="Shape", row=1)
    async def aspect(self, interaction: discord.Interaction, select: Menu) -> None:
        await self.save(interaction, aspect=select.values[0])

    @discord.ui.select(cls=Menu, placeholder="How many pictures", row=2)
    async def count(self, interaction: discord.Interaction, select: Menu) -> None:
        await self.save(interaction, num_images=int(select.values[0]))

    @discord.ui.button(label="Face pass", row=3)
    async def face_pass(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await self.save(interaction, face_pass=not effective(self.defaults)["face_pass"])

    @discord.ui.button(label="Negative prompt…", style=discord.ButtonStyle.primary, row=3)
    async def negative(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.send_modal(NegativePromptModal(self))

    @discord.ui.button(label="Reset", style=discord.ButtonStyle.danger, row=3)
    async def reset(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await user_settings_db.clear_defaults(self.bot.store.db, self.owner)
        self.show(NO_DEFAULTS)
        await interaction.response.edit_message(content=panel_text(NO_DEFAULTS), view=self)

    async def on_timeout(self) -> None:
        try:
            await self.opened.edit_original_response(content=f"{panel_text(self.defaults)}\n{CLOSED}", view=None)
        except discord.HTTPException:  # the message was dismissed, or its token has run out
            log.debug("could not mark a settings panel closed", exc_info=True)

    async def on_error(self, interaction: discord.Interaction, error: Exception, item: discord.ui.Item[Any]) -> None:
        # discord.py would only log it and leave the person with "This interaction failed".
        await reply(interaction, sorry(log, "changing a default in /settings", exc_info=error))


class NegativePromptModal(discord.ui.Modal, title="Default negative prompt"):
    """The text field for the default negative prompt; left empty, the default is removed."""

    def __init__(self, panel: SettingsPanel) -> None:
        super().__init__(timeout=PANEL_TIMEOUT_S)  # a form never sent is not kept for ever
        self.panel = panel
        limit = panel.bot.settings.max_prompt_chars
        self.text: discord.ui.TextInput[NegativePromptModal] = discord.ui.TextInput(
            label="What to avoid in every picture", style=discord.TextStyle.paragraph, required=False,
            default=panel.defaults.negative_prompt, max_length=min(limit, TEXT_INPUT_MAX))
        self.add_item(self.text)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        text = self.text.value.strip()
        try:  # the same check /imagine makes (the prompt filter does not read negative prompts)
            GenerateRequest(prompt="", negative_prompt=text).check_length(self.panel.bot.settings.max_prompt_chars)
        except BadRequest as exc:
            await reply(interaction, exc.message)
            return
        await self.panel.save(interaction, negative_prompt=text or None)

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:  # type: ignore[override]
        await reply(interaction, sorry(log, "setting a default negative prompt", exc_info=error))


class SettingsCog(commands.Cog):
    def __init__(self, bot: AvatarBot) -> None:
        self.bot = bot

    @app_commands.command(name="settings",
                          description="Your defaults for /imagine: style, shape, pictures, face pass, negative prompt")
    async def settings(self, interaction: discord.Interaction) -> None:
        try:
            await self.bot.access.require(interaction.user, interaction)
        except Refused as exc:
            await reply(interaction, exc.message)
            return
        defaults = await user_settings_db.get_defaults(self.bot.store.db, interaction.user.id)
        await interaction.response.send_message(panel_text(defaults), view=SettingsPanel(self.bot, interaction, defaults),
                                                ephemeral=True)


async def setup(bot: AvatarBot) -> None:
    await bot.add_cog(SettingsCog(bot))
