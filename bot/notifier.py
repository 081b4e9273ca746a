"""Tells people how their jobs are going: one progress message per job, then the result.

Training progress lives in an ordinary DM message edited with the bot token (it outlives the
15-minute interaction token and a restart: its ids are stored on the job). Generation answers the
interaction that asked for it while its token works; after that, or after a restart, the bot edits
the same message with its own token (its ids are stored on the job too), and only where it cannot
reach that channel does the result go to the person's DMs, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import discord

from bot.progress import ThrottledEditor, render_progress
from bot.safety import withheld_note
from bot.upload_fit import Fitted, converted_note, fit_picture, picture_size, upload_limit
from bot.views import imagine_view
from jobs.events import Event, Preview, Requeued
from jobs.payloads import GenerateParams, Picture, from_stored
from storage import generations_db, jobs_db, usage_db
from storage.jobs_db import Job

if TYPE_CHECKING:
    from bot.app import AvatarBot

log = logging.getLogger(__name__)


def png_file(data: bytes, name: str) -> discord.File:
    return discord.File(io.BytesIO(data), filename=name)


def title_of(job: Job) -> str:
    return f"Training your model (job #{job.id})" if job.kind == "train" else f"Drawing (job #{job.id})"


_WHY_REQUEUED = {
    "bot_restarted": "The bot restarted",
    "worker_lost": "The GPU worker running it stopped unexpectedly",
    "worker_stopped": "The GPU worker running it was shut down",
}


def requeued_note(job: Job, event: Requeued) -> str:
    """What happened and what comes next: a training resumes from its last checkpoint on the next
    free worker; a generation keeps none, so its pictures are drawn again from the start."""
    if job.kind == "train":
        return f"{_WHY_REQUEUED[event.why]}; your job continues from its last checkpoint on the next free worker."
    return f"{_WHY_REQUEUED[event.why]}; your pictures are back in the queue and will be drawn again."


def stopping_note(job: Job) -> str:
    """What happens to a job while the bot is stopped (`docker stop`, Ctrl-C, a restart): nothing runs,
    and the next start re-queues it; a training goes on from its last stored checkpoint."""
    if job.kind == "generate":
        return "The bot is stopping for a restart; your pictures will be drawn once it is back."
    if job.state == "queued":
        return "The bot is stopping for a restart; your training keeps its place in the queue."
    if job.checkpoint_path:
        return ("The bot stopped your training for a restart; it continues from its last checkpoint "
                "once the bot is back.")
    return "The bot stopped your training for a restart; it starts again once the bot is back."


def generate_params(job: Job) -> GenerateParams:
    """A picture request's stored parameters."""
    params = from_stored("generate", job.params)
    assert isinstance(params, GenerateParams)
    return params


def prompt_of(job: Job) -> str:
    """The prompt a picture request was made with, as the person typed it."""
    return generate_params(job).request.prompt


async def fitted_pictures(images: list[Picture], limit: int) -> list[Fitted | None]:
    """Each picture as it can be uploaded under `limit` (bot.upload_fit); converting runs in a thread."""
    if all(len(im.png) <= limit for im in images):
        return [Fitted(im.png, "png") for im in images]
    return await asyncio.to_thread(lambda: [fit_picture(im.png, limit) for im in images])


def quoted_prompt(prompt: str) -> str:
    """A person's prompt as it can be shown in a public message: its Markdown cannot break the
    message's formatting, and a mention in it pings nobody (the client allows no mentions either)."""
    return discord.utils.escape_markdown(discord.utils.escape_mentions(prompt))


def by_whom(job: Job) -> str:
    """` <who cancelled it>` for a job someone other than its owner cancelled, else nothing."""
    return f" {job.error}" if job.error == jobs_db.CANCELLED_BY_OPERATOR else ""


class Notifier:
    """The scheduler's observer: progress edits and final messages for each job."""

    def __init__(self, bot: AvatarBot) -> None:
        self.bot = bot
        self._editors: dict[int, ThrottledEditor] = {}
        self._interactions: dict[int, discord.Interaction] = {}
        self._messages: dict[int, tuple[int, int]] = {}  # job id -> (channel id, message id)
        self._shown: dict[int, str] = {}  # job id -> its latest progress text, without notes

    def attach_interaction(self, job_id: int, interaction: discord.Interaction) -> None:
        """Generation results go back through this (already deferred) interaction."""
        self._interactions[job_id] = interaction

    async def remember_answer(self, job_id: int, message: discord.Message) -> None:
        """Keep where a picture request is answered: once the interaction's token has expired (15
        minutes, a long queue or a worker's first start) or the bot has restarted, the bot edits that
        message with its own token, instead of leaving it on "Drawing…" and answering by DM."""
        self._messages[job_id] = (message.channel.id, message.id)
        await jobs_db.set_job_message(self.bot.store.db, job_id, message.channel.id, message.id)

    async def resume(self) -> None:
        """After a restart, show that queued jobs are waiting again in their old messages."""
        for job in await jobs_db.jobs_in_states(self.bot.store.db, ("queued",)):
            if job.message_id:
                await self.job_updated(job, Requeued())

    def _message(self, job: Job) -> discord.PartialMessage | None:
        """The job's own message, edited with the bot's token."""
        ids = self._messages.get(job.id) or (job.channel_id, job.message_id)
        if not (ids[0] and ids[1]):
            return None
        return self.bot.get_partial_messageable(ids[0]).get_partial_message(ids[1])

    def _interaction(self, job_id: int) -> discord.Interaction | None:
        """The job's interaction while its token still works."""
        interaction = self._interactions.get(job_id)
        return interaction if interaction is not None and not interaction.is_expired() else None

    def _editor(self, job: Job) -> ThrottledEditor | None:
        if job.id in self._editors:
            return self._editors[job.id]
        if job.id not in self._interactions and self._message(job) is None:
            return None

        async def edit(text: str, image: bytes | None) -> None:
            interaction = self._interaction(job.id)
            if interaction is not None:
                await interaction.edit_original_response(content=text)
            elif (message := self._message(job)) is not None:
                attachments = [png_file(image, "preview.png")] if image else discord.utils.MISSING
                await message.edit(content=text, attachments=attachments)
        editor = ThrottledEditor(edit, self.bot.settings.progress_interval_s)
        self._editors[job.id] = editor
        return editor

    async def job_updated(self, job: Job, event: Event) -> None:
        editor = self._editor(job)
        if editor is None:
            return
        position = await jobs_db.queue_position(self.bot.store.db, job.id) if job.state == "queued" else None
        text = render_progress(title_of(job), job.progress, position,
                               no_worker=self.bot.scheduler.waiting_for_a_worker())
        self._shown[job.id] = text
        if isinstance(event, Requeued):
            text += "\n" + requeued_note(job, event)
        editor.update(text, await self._preview_image(job, event))

    async def _preview_image(self, job: Job, event: Event) -> bytes | None:
        """The picture of a preview event, unless the filter holds it back where the job's message is."""
        if not isinstance(event, Preview):
            return None
        if event.flagged and self.bot.safety.applies(self._channel(job)):
            await usage_db.record_usage(self.bot.store.db, job.owner, job.guild_id, "flagged")
            return None
        return event.png

    def _channel(self, job: Job) -> object:
        """The channel of the job's own message, as the bot knows it (None when it does not)."""
        channel_id = (self._messages.get(job.id) or (job.channel_id, job.message_id))[0]
        return self.bot.get_channel(channel_id) if channel_id else None

    async def bot_stopping(self, timeout: float) -> None:
        """The bot is stopping (its workers already have): each job still waiting or running says so
        in its message, on top of the last progress shown (the stored one may be a step behind).
        Waits at most `timeout` seconds for the edits: a stop must not hang on Discord."""
        for job in await jobs_db.jobs_in_states(self.bot.store.db, ("queued", "running")):
            if (editor := self._editor(job)) is None:
                continue
            position = await jobs_db.queue_position(self.bot.store.db, job.id) if job.state == "queued" else None
            shown = self._shown.get(job.id) or render_progress(title_of(job), job.progress, position)
            editor.update(f"{shown}\n{stopping_note(job)}")
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(editor.flush() for editor in self._editors.values()))
        except TimeoutError:
            log.warning("stopping without telling everyone: Discord did not take the edits in %.0f s", timeout)

    async def job_finished(self, job: Job, outcome: dict[str, Any]) -> None:
        editor = self._editors.pop(job.id, None)
        self._shown.pop(job.id, None)
        if editor is not None:
            await editor.flush()
        interaction = self._interaction(job.id)
        self._interactions.pop(job.id, None)
        try:
            if job.kind == "train":
                await self._training_finished(job, outcome)
            else:
                await self._generation_finished(job, outcome, interaction)
        except discord.HTTPException:
            log.warning("could not tell user about job %d", job.id, exc_info=True)
        finally:
            self._messages.pop(job.id, None)

    async def _dm(self, user_id: int) -> discord.abc.Messageable:
        user = self.bot.get_user(user_id) or await self.bot.fetch_user(user_id)
        return user.dm_channel or await user.create_dm()

    async def _edit_progress_message(self, job: Job, text: str) -> None:
        if (message := self._message(job)) is not None:
            await message.edit(content=text, attachments=[])

    async def _training_finished(self, job: Job, outcome: dict[str, Any]) -> None:
        if job.state == "succeeded":
            await self._edit_progress_message(job, f"**{title_of(job)}**\nDone! Your model is ready.")
            handle = job.params["handle"]
            hints = "\n".join(f"• `/imagine prompt:{hint}`" for hint in outcome.get("hints", []))
            channel = await self._dm(job.owner)
            samples, held = self.bot.safety.shown(outcome.get("samples", []), channel)
            files = [png_file(s.png, f"sample-{i + 1}.png") for i, s in enumerate(samples)]
            if files:
                seen = f"Here is **{handle}** as the model sees you." + (f" {withheld_note(held)}" if held else "")
            elif held:
                seen = f"{withheld_note(held)} `/imagine` shows you **{handle}**."
            else:
                seen = f"I couldn't draw its sample pictures this time; `/imagine` shows you **{handle}**."
            if held:
                await usage_db.record_usage(self.bot.store.db, job.owner, job.guild_id, "flagged", held)
            sent = await channel.send(f"Your model is trained. {seen}\nTry these:\n{hints}", files=files)
            await jobs_db.set_result_message(self.bot.store.db, job.id, sent.channel.id, sent.id)
        elif job.state == "cancelled":
            await self._edit_progress_message(
                job, f"**{title_of(job)}**\nCancelled.{by_whom(job)} Your photos are kept.")
        else:
            await self._edit_progress_message(
                job, f"**{title_of(job)}**\nIt did not work: {job.error}\nYour photos are kept; "
                     "you can run `/train` again.")

    async def _generation_finished(self, job: Job, outcome: dict[str, Any],
                                   interaction: discord.Interaction | None) -> None:
        """`interaction`: the request's, while its token still works."""
        images: list[Picture] = outcome.get("images", [])
        stored_withheld = outcome.get("withheld", 0)  # flagged and never stored (the scheduler counted them)
        upscale_of = generate_params(job).upscale_of if job.state == "succeeded" else None
        fits: dict[int, list[Fitted | None]] = {}

        async def answer(channel: object, limit: int) -> tuple[dict[str, Any], int]:
            """The answer for `channel`, with fresh files (a sent File is consumed), and how many more
            pictures the filter holds back there: flagged ones that the request's channel allowed."""
            if job.state != "succeeded":
                # The prompt is repeated: the answer replaces the message that showed it.
                text = (f"Your pictures were cancelled.{by_whom(job)}" if job.state == "cancelled"
                        else f"Sorry, no pictures this time: {job.error}\nYour prompt was: "
                             f"**{quoted_prompt(prompt_of(job))}**")
                return {"content": text, "attachments": []}, 0
            hide = self.bot.safety.applies(channel)
            shown = [(n, im) for n, im in enumerate(images) if not (hide and im.flagged)]
            if limit not in fits:
                fits[limit] = await fitted_pictures(images, limit)
            sent = [(n, im, fit) for n, im in shown if (fit := fits[limit][n]) is not None]
            lines = [f"**{quoted_prompt(prompt_of(job))}**"]
            if upscale_of is not None and sent:
                width, height = picture_size(sent[0][1].png)
                lines.append(f"Picture #{upscale_of.index + 1} upscaled to {width}×{height} (seed {sent[0][1].seed}).")
            elif shown:
                lines.append("Seeds " + ", ".join(f"#{n + 1}: {im.seed}" for n, im in shown))
            if any(fit.converted for _, _, fit in sent):
                lines.append(converted_note(limit))
            if len(sent) < len(shown):
                lines.append("A picture was too large for this channel's upload limit even as a JPEG.")
            if held := stored_withheld + len(images) - len(shown):
                lines.append(withheld_note(held) + ("" if shown else " 🎲 Reroll or another prompt may draw "
                                                                        "pictures that pass it."))
            # "More like #N" only where every stored picture is shown, so that N is the picture seen. An
            # upscale has no buttons: its picture is the final one (upscaling it again would pass any upload
            # limit, and rerolling or varying it is what the original's buttons do).
            view = (None if upscale_of is not None else
                    imagine_view(outcome["generation_id"], len(images) if len(sent) == len(images) else 0))
            files = [png_file(fit.data, f"image-{n + 1}.{fit.extension}") for n, _, fit in sent]
            return {"content": "\n".join(lines), "view": view, "attachments": files}, len(images) - len(shown)

        # Where the request was answered, through its interaction while the token works, else with
        # the bot's token; by DM when neither can (a channel the bot cannot reach, as a user-installed app).
        routes: list[tuple[str, Callable[..., Awaitable[discord.Message]], object]] = []
        if interaction is not None:
            routes.append(("its interaction", interaction.edit_original_response, interaction.channel))
        if (stored := self._message(job)) is not None:
            routes.append(("its message", stored.edit, self._channel(job)))
        for route, edit, where in routes:
            kwargs, held_here = await answer(where, upload_limit(where, interaction if route == "its interaction"
                                                                 else None))
            try:
                message = await edit(**kwargs)
            except discord.HTTPException:
                log.info("could not answer job %d through %s", job.id, route, exc_info=True)
                continue
            await self._delivered(job, outcome, message, held_here)
            return
        channel = await self._dm(job.owner)
        kwargs, held_here = await answer(channel, upload_limit(channel))
        files = kwargs.pop("attachments")
        message = await channel.send(kwargs.pop("content"), files=files, **kwargs)
        await self._delivered(job, outcome, message, held_here)

    async def _delivered(self, job: Job, outcome: dict[str, Any], message: discord.Message, held: int) -> None:
        """Keep where the pictures went, and count those held back there."""
        if held:
            await usage_db.record_usage(self.bot.store.db, job.owner, job.guild_id, "flagged", held)
        await self._remember_message(outcome, message)

    async def _remember_message(self, outcome: dict[str, Any], message: discord.Message) -> None:
        if "generation_id" in outcome:
            await generations_db.set_generation_message(self.bot.store.db, outcome["generation_id"],
                                                        message.channel.id, message.id)
