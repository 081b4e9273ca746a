"""Selfies by DM, and `/photos` to look at them, remove one or clear all."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.apology import sorry
from bot.consent import NOT_KEPT, consent_view, needs_consent
from bot.contact_sheet import contact_sheet
from bot.photo_intake import IntakeOutcome, accept_photo
from bot.scheduler import Refused
from photos.intake import IntakeLimits
from photos.sandbox import IntakePool
from storage import photos_db, users_db

if TYPE_CHECKING:
    from bot.app import AvatarBot

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000  # characters Discord accepts in one message


def _grouped(outcomes: list[IntakeOutcome], reason: Callable[[IntakeOutcome], str]) -> list[str]:
    """One line per distinct reason, naming every file it applies to, in the order they came: ten
    photos refused for one reason read as one reason, not ten copies of it."""
    names: dict[str, list[str]] = {}
    for outcome in outcomes:
        names.setdefault(reason(outcome), []).append(f"`{outcome.filename}`")
    return [f"• {', '.join(files)}" + (f": {why}" if why else "") for why, files in names.items()]


def summarise(outcomes: list[IntakeOutcome], total: int, cap: int, needed: int) -> str:
    """One reply per DM: what was kept (with warnings), what was refused and why, and what's next."""
    kept = [o for o in outcomes if o.error is None]
    refused = [o for o in outcomes if o.error is not None]
    lines: list[str] = []
    if kept:
        lines.append(f"**Kept {len(kept)} photo{'s' if len(kept) != 1 else ''}:**")
        lines += _grouped(kept, lambda o: " ".join(o.warnings))
    if refused:
        lines.append(f"**Refused {len(refused)}:**")
        lines += _grouped(refused, lambda o: o.error or "")
    lines.append(f"You have **{total} of {cap}** photos.")
    if total >= needed:
        lines.append("You're ready to `/train`!" if total < cap else
                     "That's the maximum; you're ready to `/train`. `/photos` lets you remove some.")
    else:
        lines.append(f"Send {needed - total} more to be able to `/train` (at least {needed}).")
    return "\n".join(lines)


def message_chunks(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """`text` in messages Discord accepts, split between lines (inside a line only if it alone is
    longer than `limit`), so a long summary arrives whole instead of being rejected."""
    chunks: list[str] = []
    for line in text.split("\n"):
        while len(line) > limit:
            chunks.append(line[:limit])
            line = line[limit:]
        if chunks and len(chunks[-1]) + 1 + len(line) <= limit:
            chunks[-1] += "\n" + line
        else:
            chunks.append(line)
    return chunks


class PhotosCog(commands.Cog):
    def __init__(self, bot: AvatarBot) -> None:
        self.bot = bot
        self.pool: IntakePool | None = None  # the processes that decode photos, from cog_load to cog_unload

    async def cog_load(self) -> None:
        self.pool = IntakePool(self.bot.settings.intake_processes)
        self.pool.start()  # they load Pillow and OpenCV while the bot connects

    async def cog_unload(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    @property
    def limits(self) -> IntakeLimits:
        return IntakeLimits(max_bytes=self.bot.settings.max_photo_bytes)

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or message.guild is not None:
            return
        try:  # before anything is downloaded: nothing of a person who may not use the bot is kept
            await self.bot.access.require(message.author)
        except Refused as exc:
            await self._answer(message, exc.message + (" I didn't keep your photos." if message.attachments else ""))
            return
        except Exception:
            await self._answer(message, sorry(log, "checking who may use the bot",
                                              while_="checking who may use me"))
            return
        if not message.attachments:
            await message.channel.send("Send me your selfies as attachments here (up to 10 per message). "
                                       "`/help` explains the rest.")
            return
        # One person's messages are handled in order, so counts and duplicate checks stay exact, and
        # /forget waits for the photos being stored (the scheduler's lock for this person).
        try:
            async with self.bot.scheduler.user_lock(message.author.id):
                if await needs_consent(self.bot, message.author.id):
                    await self._ask_consent(message)
                    return
                reply = await self.take_photos(message.author.id, message.attachments)
        except Exception:
            reply = sorry(log, "taking photos", "`/photos` shows the ones I kept; please send the others again later.",
                          while_="while storing these photos")
        await self._answer(message, reply)

    async def _ask_consent(self, message: discord.Message) -> None:
        """The consent text with its buttons, instead of keeping the photos."""
        text = self.bot.settings.consent_text
        try:
            await message.reply(f"{text}\n\n{NOT_KEPT}", view=consent_view(text), mention_author=False)
        except discord.HTTPException:
            log.warning("could not ask for consent", exc_info=True)

    async def _answer(self, message: discord.Message, reply: str) -> None:
        """Reply to a DM, in as many messages as the text needs."""
        try:
            first, *rest = message_chunks(reply)
            await message.reply(first, mention_author=False)
            for chunk in rest:
                await message.channel.send(chunk)
        except discord.HTTPException:
            log.warning("could not send the photo summary", exc_info=True)

    async def take_photos(self, user_id: int, attachments: list[discord.Attachment]) -> str:
        settings = self.bot.settings
        await users_db.ensure_user(self.bot.store.db, user_id)
        outcomes: list[IntakeOutcome] = []
        for attachment in attachments:
            name = attachment.filename
            if attachment.size > self.limits.max_bytes:
                outcomes.append(IntakeOutcome(name, error=f"it is {attachment.size / 2**20:.1f} MB; the limit is "
                                                          f"{settings.max_photo_mb} MB. Please send a smaller copy."))
                continue
            try:
                data = await attachment.read()
            except discord.HTTPException:
                outcomes.append(IntakeOutcome(name, error="I couldn't download it; please send it again."))
                continue
            outcomes.append(await accept_photo(self.bot.store, user_id, data, name, self.limits,
                                               max_photos=settings.max_photos, pool=self.pool))
        total = await photos_db.count_photos(self.bot.store.db, user_id)
        return summarise(outcomes, total, settings.max_photos, settings.min_photos)

    @app_commands.command(name="photos", description="See the photos I kept, remove one or clear them all")
    async def photos(self, interaction: discord.Interaction) -> None:
        photos = await photos_db.list_photos(self.bot.store.db, interaction.user.id)
        if not photos:
            await interaction.response.send_message("You have no photos yet. Send me selfies in a DM.",
                                                    ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        pngs = [self.bot.store.files.read(p.path, interaction.user.id) for p in photos]
        sheet = await asyncio.to_thread(contact_sheet, pngs)
        flagged = [f"#{i}: {', '.join(p.quality_flags)}" for i, p in enumerate(photos, 1) if p.quality_flags]
        text = f"You have **{len(photos)} of {self.bot.settings.max_photos}** photos."
        if flagged:
            text += "\nFlagged: " + "; ".join(flagged)
        await interaction.followup.send(text, file=discord.File(io.BytesIO(sheet), "photos.png"),
                                        view=PhotosView(self.bot, interaction.user.id, [p.id for p in photos]),
                                        ephemeral=True)


class RemoveModal(discord.ui.Modal, title="Remove a photo"):
    number: discord.ui.TextInput = discord.ui.TextInput(label="Photo number (from the contact sheet)",
                                                        max_length=3)

    def __init__(self, bot: AvatarBot, owner: int, sheet: list[int]) -> None:
        super().__init__()
        self.bot, self.owner, self.sheet = bot, owner, sheet

    async def on_submit(self, interaction: discord.Interaction) -> None:
        """Remove the photo the contact sheet shows under that number: the sheet is not redrawn
        after a removal, so its numbers, not the current order, say which photo is meant."""
        number = self.number.value.strip()
        if not number.isdigit() or not 1 <= int(number) <= len(self.sheet):
            await interaction.response.send_message(
                f"There is no photo number {self.number.value!r}; pick 1 to {len(self.sheet)}.", ephemeral=True)
            return
        removed = await photos_db.delete_photo(self.bot.store, self.owner, self.sheet[int(number) - 1])
        left = await photos_db.count_photos(self.bot.store.db, self.owner)
        done = f"Removed photo #{number}." if removed else f"Photo #{number} was already removed."
        await interaction.response.send_message(f"{done} You have {left} left.", ephemeral=True)


class PhotosView(discord.ui.View):
    def __init__(self, bot: AvatarBot, owner: int, sheet: list[int]) -> None:
        """`sheet`: the ids of the photos on the contact sheet, in its numbering."""
        super().__init__(timeout=600)
        self.bot, self.owner, self.sheet = bot, owner, sheet

    @discord.ui.button(label="Remove a photo", style=discord.ButtonStyle.secondary)
    async def remove(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.send_modal(RemoveModal(self.bot, self.owner, self.sheet))

    @discord.ui.button(label="Clear all", style=discord.ButtonStyle.danger)
    async def clear(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.send_message("Delete **all** your photos? Your trained model is kept.",
                                                view=ConfirmClear(self.bot, self.owner), ephemeral=True)


class ConfirmClear(discord.ui.View):
    def __init__(self, bot: AvatarBot, owner: int) -> None:
        super().__init__(timeout=120)
        self.bot, self.owner = bot, owner

    @discord.ui.button(label="Yes, delete them", style=discord.ButtonStyle.danger)
    async def confirm(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        removed = 0
        for photo in await photos_db.list_photos(self.bot.store.db, self.owner):
            removed += await photos_db.delete_photo(self.bot.store, self.owner, photo.id)
        await interaction.response.edit_message(content=f"Deleted {removed} photo{'s' if removed != 1 else ''}.",
                                                view=None)

    @discord.ui.button(label="Keep them", style=discord.ButtonStyle.secondary)
    async def keep(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.edit_message(content="Nothing was deleted.", view=None)


async def setup(bot: AvatarBot) -> None:
    await bot.add_cog(PhotosCog(bot))
