"""Handle and class word, status, cancel, export, forget and help."""

from __future__ import annotations

import asyncio
import io
import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot import quotas
from bot.progress import NO_WORKER_ONLINE, STAGE_LABELS
from bot.replies import reply
from bot.scheduler import Refused
from jobs.handles import NameRuleError, load_word_list, normalize_class_word, suggest_handle, validate_handle
from storage import jobs_db, limits_db, models_db, usage_db, users_db
from storage.forget import posted_messages

if TYPE_CHECKING:
    from bot.app import AvatarBot

log = logging.getLogger(__name__)

HELP_TEXT = """\
**Make pictures of yourself in four steps**
1. **Send me 5–30 selfies in this DM** (just attach them). Clear, different angles and light, one person, face visible. I tell you what I kept and why I refused anything.
2. **Pick your handle**: `/handle name:<rare word> class:<woman|man|person>`. The handle is the word that will mean *you* in prompts (use a made-up word like `zqjane`).
3. **`/train`**: I train your own model on the GPU and keep one message here up to date with its progress. You get sample pictures when it's done.
4. **`/imagine prompt:...`**: pictures of you, from your model only. Under each result: 🎲 **Reroll** (same prompt, new seeds; under a variation, another variation of the same picture) and **More like #N** (a variation of that picture: same prompt, drawn again starting from it).

Also: `/settings` (your defaults for `/imagine`), `/photos` (see/remove photos), `/status` (your jobs and what is left of today's quota), `/consent` (what you agreed to), `/cancel`, `/export` (your LoRA file), `/forget` (delete everything of yours).
Changing your handle after training keeps the old handle for the model you have; retrain to use the new one."""


class AccountCog(commands.Cog):
    def __init__(self, bot: AvatarBot) -> None:
        self.bot = bot

    async def cog_load(self) -> None:
        # In a thread: reading the word list would hold up the event loop, and every other person.
        await asyncio.to_thread(load_word_list)

    @app_commands.command(name="help", description="How this works, in four steps")
    async def help(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(HELP_TEXT, ephemeral=True)

    @app_commands.command(name="handle", description="Set the rare word that will mean you, and your class")
    @app_commands.describe(name="3-24 lower-case letters/digits, a made-up word", class_word="woman, man, person, ...")
    @app_commands.rename(class_word="class")
    async def handle(self, interaction: discord.Interaction, name: str | None = None,
                     class_word: str = "person") -> None:
        db = self.bot.store.db
        try:
            await self.bot.access.require(interaction.user, interaction)
        except Refused as exc:
            await reply(interaction, exc.message)
            return
        await users_db.ensure_user(db, interaction.user.id)
        try:
            word = normalize_class_word(class_word)
        except NameRuleError as exc:
            await reply(interaction, exc.reason)
            return
        if name is None:
            suggestion = suggest_handle(interaction.user.name, await users_db.all_handles(db), word)
            await reply(interaction, f"How about `{suggestion}`? Set it with "
                                     f"`/handle name:{suggestion} class:{word}`.")
            return
        try:
            handle = validate_handle(name.strip(), word)
            await users_db.set_handle(db, interaction.user.id, handle, word)
        except NameRuleError as exc:
            await reply(interaction, exc.reason)
            return
        model = await models_db.get_active_model(db, interaction.user.id)
        note = ""
        if model is not None and model.metadata.get("handle") != handle:
            note = (f"\nYour current model was trained as `{model.metadata.get('handle')}` and keeps that "
                    "handle; run `/train` to retrain with the new one.")
        await reply(interaction, f"Your handle is `{handle}` ({word}).{note}")

    @app_commands.command(name="status",
                          description="Your jobs, their places in the queue and what you have left today")
    async def status(self, interaction: discord.Interaction) -> None:
        db = self.bot.store.db
        now = self.bot.scheduler.clock()
        jobs = await jobs_db.jobs_for_user(db, interaction.user.id, states=("queued", "running"))
        lines = []
        for job in jobs:
            what = "Training" if job.kind == "train" else "Picture"
            if job.state == "queued":
                position = await jobs_db.queue_position(db, job.id, now=now)
                lines.append(f"• {what} #{job.id}: queued, position {position}")
            else:
                p = job.progress
                step = f", step {p['step']}/{p['total']}" if p.get("total") else ""
                stage = STAGE_LABELS.get(p.get("stage", ""), "starting").lower()
                lines.append(f"• {what} #{job.id}: running ({stage}{step})")
        if any(job.state == "queued" for job in jobs) and self.bot.scheduler.waiting_for_a_worker():
            lines.append(NO_WORKER_ONLINE)
        model = await models_db.get_active_model(db, interaction.user.id)
        lines.append(f"Model: trained as `{model.metadata.get('handle')}`." if model else "Model: none yet.")
        text = "\n".join(lines) if jobs else "Nothing running or queued.\n" + lines[-1]
        if (quota := await self._quota_left(interaction, now)) is not None:
            text += "\n" + quota
        await reply(interaction, text)

    async def _quota_left(self, interaction: discord.Interaction, now: float) -> str | None:
        """What the person has left of the last 24 hours, under the limits of the server they are in
        (in a DM: of the server they last used me in), or None where nothing is limited."""
        db = self.bot.store.db
        guild_id = interaction.guild_id or await usage_db.last_guild(db, interaction.user.id)
        limits = await limits_db.limits_for(db, self.bot.settings.default_limits, guild_id)
        return quotas.describe(await quotas.allowance(db, limits, interaction.user.id, guild_id, now), now)

    @app_commands.command(name="cancel", description="Cancel your queued or running jobs")
    async def cancel(self, interaction: discord.Interaction) -> None:
        cancelled = await self.bot.scheduler.cancel_user_jobs(interaction.user.id)
        if not cancelled:
            await reply(interaction, "You have nothing queued or running.")
            return
        await reply(interaction, f"Cancelling {len(cancelled)} job(s): " +
                    ", ".join(f"#{j.id}" for j in cancelled) + ". Your photos are kept.")

    @app_commands.command(name="export", description="Get your model's LoRA files (diffusers and A1111/kohya)")
    async def export(self, interaction: discord.Interaction) -> None:
        model = await models_db.get_active_model(self.bot.store.db, interaction.user.id)
        if model is None:
            await reply(interaction, "You don't have a trained model yet.")
            return
        limit = interaction.filesize_limit  # what this channel accepts from the app, sent with the interaction
        handle = model.metadata.get("handle", "model")
        candidates = [(model.lora_path, "pytorch_lora_weights.safetensors")]
        if model.metadata.get("kohya_path"):
            candidates.append((model.metadata["kohya_path"], f"{handle}_kohya.safetensors"))
        files: list[tuple[bytes, str]] = []
        too_big: list[tuple[bytes, str]] = []
        for path, name in candidates:
            data = self.bot.store.files.read(path, interaction.user.id)
            (files if len(data) <= limit else too_big).append((data, name))
        if not files:
            await reply(interaction, f"Your model files are larger than this channel's upload limit "
                                     f"({limit // 2**20} MB), so I can't send them here.")
            return
        note = f"\n{', '.join(n for _, n in too_big)} did not fit the upload limit." if too_big else ""
        await interaction.response.send_message(
            f"Your model (`{handle}`, base `{model.base_model}`). Load the first with diffusers' "
            f"`pipe.load_lora_weights`, the second in A1111/ComfyUI.{note}",
            files=[discord.File(io.BytesIO(d), n) for d, n in files], ephemeral=True)

    @app_commands.command(name="forget", description="Delete all your photos, models, pictures, jobs and settings")
    async def forget(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(
            "This deletes **everything** I have of you: photos, models, pictures, jobs and settings. "
            "It can't be undone.",
            view=ConfirmForget(self.bot, interaction.user.id), ephemeral=True)


class ConfirmForget(discord.ui.View):
    def __init__(self, bot: AvatarBot, owner: int) -> None:
        super().__init__(timeout=120)
        self.bot, self.owner = bot, owner

    @discord.ui.button(label="Delete everything", style=discord.ButtonStyle.danger)
    async def confirm(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        # Deferred first: forgetting waits for any photo of theirs being stored right now.
        await interaction.response.defer()
        left = await erase_person(self.bot, self.owner)
        text = "Done. I no longer have anything of yours."
        if left:
            text += (f"\n{left} of the messages I sent you with pictures could not be deleted (I can no "
                     "longer reach where they were posted).")
        await interaction.edit_original_response(content=text, view=None)

    @discord.ui.button(label="Keep my data", style=discord.ButtonStyle.secondary)
    async def keep(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.edit_message(content="Nothing was deleted.", view=None)


async def erase_person(bot: AvatarBot, user_id: int) -> int:
    """Forget the person (/forget, or an operator's /admin forget at their request): their jobs
    stopped, their data deleted, and the messages with their pictures; return how many of those
    could not be deleted."""
    posted = await posted_messages(bot.store, user_id)
    await bot.scheduler.forget(user_id)
    return await delete_messages(bot, posted)


async def delete_messages(bot: AvatarBot, posted: list[tuple[int, int]]) -> int:
    """Delete the bot's own messages (channel id, message id); return how many could not be.

    One already gone counts as deleted; one in a channel the bot cannot reach any more (it left
    the server, or answered there only as a user-installed app) cannot be deleted by it."""
    left = 0
    for channel_id, message_id in posted:
        try:
            await bot.get_partial_messageable(channel_id).get_partial_message(message_id).delete()
        except discord.NotFound:
            pass
        except discord.HTTPException:
            log.info("could not delete message %d of a forgotten user", message_id, exc_info=True)
            left += 1
    return left


async def setup(bot: AvatarBot) -> None:
    await bot.add_cog(AccountCog(bot))
