"""The /imagine path's messages and buttons, with stand-ins for Discord's objects."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import AsyncMock

import discord
import pytest

from bot.access import Grant
from bot.config import Settings, load_settings
from bot.safety import Safety
from jobs import events
from jobs.payloads import GenerateParams, Picture, VariationOf, to_stored
from jobs.requests import GenerateRequest
from storage import generations_db, user_settings_db
from storage.user_settings_db import NO_DEFAULTS, PersonalDefaults

SAFETY = Safety(Settings())  # with no word list loaded: these tests are about the messages
PROMPT = "<@123456789012345678> and <@&223456789012345678> with @everyone in **paris**"
# A person the access check lets in, their use counted against server 55.
LET_IN = SimpleNamespace(require=AsyncMock(return_value=Grant(55)))


def _defaults(monkeypatch, defaults: PersonalDefaults = NO_DEFAULTS) -> SimpleNamespace:
    """The person's /settings defaults as the cog reads them, and a store for it to read them from."""
    monkeypatch.setattr(user_settings_db, "get_defaults", AsyncMock(return_value=defaults))
    return SimpleNamespace(db=None)


def _settings(tmp_path: Path):
    return load_settings({"DISCORD_TOKEN": "t" * 30, "DATA_DIR": str(tmp_path)}, env_file=None)


async def test_the_bot_sends_no_mentions(tmp_path):
    from bot.app import AvatarBot

    bot = AvatarBot(_settings(tmp_path), SimpleNamespace(), SimpleNamespace())
    assert bot.allowed_mentions is not None and bot.allowed_mentions.to_dict() == {"parse": []}


async def test_a_prompt_is_echoed_with_its_markdown_and_mentions_made_harmless(monkeypatch):
    from bot.notifier import Notifier

    monkeypatch.setattr(generations_db, "set_generation_message", AsyncMock())
    notifier = Notifier(SimpleNamespace(store=SimpleNamespace(db=None), safety=SAFETY))
    message = SimpleNamespace(channel=SimpleNamespace(id=1), id=2)
    interaction = SimpleNamespace(edit_original_response=AsyncMock(return_value=message), is_expired=lambda: False,
                                  channel=None)
    notifier.attach_interaction(3, interaction)
    job = SimpleNamespace(id=3, kind="generate", state="succeeded", owner=5, channel_id=None, message_id=None,
                          params={"request": {"prompt": PROMPT}})
    await notifier.job_finished(job, {"generation_id": 9, "images": [Picture(b"I", 42)]})
    first_line = interaction.edit_original_response.await_args.kwargs["content"].split("\n")[0]
    for mention in ("<@123456789012345678>", "<@&223456789012345678>", "@everyone"):
        assert mention not in first_line
    assert first_line.startswith("**<@\u200b123456789012345678>")
    assert first_line.endswith(r"in \*\*paris\*\***")  # only the outer pair makes it bold


class Press:
    """A button press as the views see it: records what the person is shown, in order."""

    def __init__(self, user_id: int, client: object) -> None:
        self.user, self.client, self.shown = SimpleNamespace(id=user_id), client, []
        self.channel = None
        self._deferred = False

        async def defer(**kwargs):
            self._deferred = True
            self.shown.append(("thinking", kwargs))

        async def send_message(content, **kwargs):
            self.shown.append(("response", content, kwargs))

        async def followup_send(content, **kwargs):
            self.shown.append(("followup", content, kwargs))

        self.response = SimpleNamespace(defer=defer, send_message=send_message, is_done=lambda: self._deferred)
        self.followup = SimpleNamespace(send=followup_send)

    async def delete_original_response(self) -> None:
        self.shown.append(("deleted",))


async def test_a_button_that_fails_after_thinking_answers_privately_with_a_reference(monkeypatch, caplog):
    from bot.views import _queue_generation

    generation = SimpleNamespace(owner=7, params={"request": {"prompt": "x"}, "variation_of": None})
    monkeypatch.setattr(generations_db, "get_generation", AsyncMock(return_value=generation))
    scheduler = SimpleNamespace(enqueue_generate=AsyncMock(side_effect=RuntimeError("database is locked")),
                                check_generate=AsyncMock())
    press = Press(7, SimpleNamespace(store=SimpleNamespace(db=None), scheduler=scheduler, safety=SAFETY,
                                     access=LET_IN))
    await _queue_generation(press, 1, None)
    assert [entry[0] for entry in press.shown] == ["thinking", "deleted", "followup"]
    _, text, kwargs = press.shown[-1]
    assert kwargs == {"ephemeral": True} and text.startswith("Sorry, something went wrong on my side")
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    reference = record.getMessage().split("reference ")[1].rstrip(")")
    assert f"`{reference}`" in text and "Reroll" in record.getMessage()
    assert record.exc_info[1].args == ("database is locked",)


async def test_a_button_that_fails_before_thinking_answers_privately_with_a_reference(monkeypatch, caplog):
    from bot.views import _queue_generation

    monkeypatch.setattr(generations_db, "get_generation", AsyncMock(side_effect=OSError("disk gone")))
    press = Press(7, SimpleNamespace(store=SimpleNamespace(db=None)))
    await _queue_generation(press, 1, 2)
    [(where, text, kwargs)] = press.shown
    assert where == "response" and kwargs == {"ephemeral": True}
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "More like #3" in record.getMessage()
    assert record.getMessage().split("reference ")[1].rstrip(")") in text


@pytest.mark.parametrize(("kind", "note"), [
    ("generate", "The bot restarted; your pictures are back in the queue and will be drawn again"),
    ("train", "The bot restarted; your job continues from its last checkpoint"),
])
async def test_a_requeued_job_says_what_happens_to_it(monkeypatch, kind, note):
    """Only a training has checkpoints to continue from. Told after a restart (`resume`) as after a lost worker."""
    from bot.notifier import Notifier
    from storage import jobs_db

    job = SimpleNamespace(id=3, kind=kind, state="queued", progress={}, channel_id=1, message_id=2)
    monkeypatch.setattr(jobs_db, "queue_position", AsyncMock(return_value=1))
    monkeypatch.setattr(jobs_db, "jobs_in_states", AsyncMock(return_value=[job]))
    notifier = Notifier(SimpleNamespace(store=SimpleNamespace(db=None), settings=SimpleNamespace(progress_interval_s=0),
                                        scheduler=SimpleNamespace(waiting_for_a_worker=lambda: False)))
    interaction = SimpleNamespace(edit_original_response=AsyncMock(), is_expired=lambda: False)
    notifier.attach_interaction(3, interaction)
    await notifier.resume()
    await notifier._editors[3].flush()
    text = interaction.edit_original_response.await_args.kwargs["content"]
    assert note in text and ("checkpoint" in text) == (kind == "train")


@pytest.mark.parametrize(("why", "said"), [
    ("worker_lost", "The GPU worker running it stopped unexpectedly; your job continues from its last checkpoint"),
    ("worker_stopped", "The GPU worker running it was shut down; your job continues from its last checkpoint"),
])
def test_a_requeued_training_says_what_happened_to_its_worker(why, said):
    """With several workers the job goes to the next free one: no "the worker restarted"."""
    from bot.notifier import requeued_note
    from jobs.events import Requeued

    job = SimpleNamespace(kind="train")
    assert requeued_note(job, Requeued(why)).startswith(said)


async def test_a_button_pressed_by_someone_no_longer_let_in_is_refused_privately(monkeypatch):
    from bot.scheduler import Refused
    from bot.views import _queue_generation

    generation = SimpleNamespace(owner=7, params={"request": {"prompt": "x"}, "variation_of": None})
    monkeypatch.setattr(generations_db, "get_generation", AsyncMock(return_value=generation))
    scheduler = SimpleNamespace(enqueue_generate=AsyncMock())
    refused = SimpleNamespace(require=AsyncMock(side_effect=Refused("Sorry, I'm only open to members of X.")))
    press = Press(7, SimpleNamespace(store=SimpleNamespace(db=None), scheduler=scheduler, access=refused))
    await _queue_generation(press, 1, 0)
    assert press.shown == [("response", "Sorry, I'm only open to members of X.", {"ephemeral": True})]
    scheduler.enqueue_generate.assert_not_awaited()


@pytest.mark.parametrize("face_pass", [True, False])
@pytest.mark.parametrize("variation_of", [None, VariationOf(4, 1)])
async def test_reroll_repeats_the_request_and_under_a_variation_varies_the_same_picture(monkeypatch, variation_of,
                                                                                          face_pass):
    from bot.views import VARIATION_STRENGTH, _queue_generation

    request = {"prompt": "x", "seed": 11, "num_images": 1 if variation_of else 3, "face_pass": face_pass}
    if variation_of:
        request["strength"] = VARIATION_STRENGTH
    stored = to_stored(GenerateParams(GenerateRequest(**request), variation_of=variation_of))
    generation = SimpleNamespace(owner=7, params=stored)
    monkeypatch.setattr(generations_db, "get_generation", AsyncMock(return_value=generation))
    scheduler = SimpleNamespace(enqueue_generate=AsyncMock(return_value=(SimpleNamespace(id=5), 1)), check_generate=AsyncMock(),
                                waiting_for_a_worker=lambda: False)
    notifier = SimpleNamespace(attach_interaction=lambda job_id, interaction: None)
    press = Press(7, SimpleNamespace(store=SimpleNamespace(db=None), scheduler=scheduler, notifier=notifier,
                                     safety=SAFETY, access=LET_IN))
    press.edit_original_response = AsyncMock()
    await _queue_generation(press, 9, None)
    (user_id, queued), kwargs = scheduler.enqueue_generate.await_args
    assert user_id == 7 and kwargs == {"variation_of": variation_of, "upscale_of": None, "allow_flagged": False,
                                       "guild_id": 55}
    assert queued.seed != 11 and replace(queued, seed=11) == GenerateRequest(**request)


class Posted:
    """The bot's own message, as get_partial_messageable(...).get_partial_message(...) gives it."""

    def __init__(self, fails: bool = False) -> None:
        self.edits: list[dict] = []
        self.fails = fails

    async def edit(self, **kwargs):
        if self.fails:
            import discord

            raise discord.Forbidden(SimpleNamespace(status=403, reason="Forbidden"), "Missing Access")
        self.edits.append(kwargs)
        return SimpleNamespace(channel=SimpleNamespace(id=70), id=71)


def _bot_with(posted: Posted):
    channels: dict[int, SimpleNamespace] = {}

    def messageable(channel_id: int):
        return channels.setdefault(channel_id, SimpleNamespace(
            get_partial_message=lambda message_id: posted if (channel_id, message_id) == (70, 71) else None))

    return SimpleNamespace(store=SimpleNamespace(db=None), get_partial_messageable=messageable,
                           get_channel=lambda channel_id: None, safety=SAFETY,
                           settings=SimpleNamespace(progress_interval_s=0),
                           scheduler=SimpleNamespace(waiting_for_a_worker=lambda: False))


@pytest.mark.parametrize("restarted", [False, True], ids=["token expired", "bot restarted"])
async def test_a_picture_answer_outliving_its_interaction_edits_the_same_message(monkeypatch, restarted):
    """A long queue (or a worker's first start) outlasts the 15-minute token, or the bot restarts: the
    progress and the pictures still land in the message that said "Queued", not in a DM beside it."""
    from bot.notifier import Notifier
    from storage import jobs_db

    monkeypatch.setattr(jobs_db, "set_job_message", AsyncMock())
    monkeypatch.setattr(jobs_db, "queue_position", AsyncMock(return_value=2))
    monkeypatch.setattr(generations_db, "set_generation_message", AsyncMock())
    posted = Posted()
    notifier = Notifier(_bot_with(posted))
    notifier._dm = AsyncMock()
    interaction = SimpleNamespace(edit_original_response=AsyncMock(), is_expired=lambda: True)
    job = SimpleNamespace(id=3, kind="generate", state="queued", owner=5, progress={},
                          channel_id=70 if restarted else None, message_id=71 if restarted else None,
                          params={"request": {"prompt": "on the moon"}})
    if not restarted:
        notifier.attach_interaction(3, interaction)
        await notifier.remember_answer(3, SimpleNamespace(channel=SimpleNamespace(id=70), id=71))
        jobs_db.set_job_message.assert_awaited_once_with(None, 3, 70, 71)

    await notifier.job_updated(job, events.Stage("loading_model"))
    await notifier._editors[3].flush()
    assert posted.edits[-1]["content"].startswith("**Drawing (job #3)**\nStage: Waiting in the queue")
    job.state = "succeeded"
    await notifier.job_finished(job, {"generation_id": 9, "images": [Picture(b"I", 42)]})
    assert posted.edits[-1]["content"].startswith("**on the moon**\nSeeds #1: 42")
    assert [f.filename for f in posted.edits[-1]["attachments"]] == ["image-1.png"]
    assert "view" in posted.edits[-1]
    interaction.edit_original_response.assert_not_awaited()  # its token no longer works
    notifier._dm.assert_not_awaited()
    generations_db.set_generation_message.assert_awaited_once_with(None, 9, 70, 71)


async def test_a_picture_answer_the_bot_cannot_post_in_place_goes_by_dm(monkeypatch):
    """Where the bot cannot edit the message itself (a channel it is not in, as a user-installed
    app), the pictures arrive by DM."""
    from bot.notifier import Notifier

    monkeypatch.setattr(generations_db, "set_generation_message", AsyncMock())
    notifier = Notifier(_bot_with(Posted(fails=True)))
    dm = SimpleNamespace(send=AsyncMock(return_value=SimpleNamespace(channel=SimpleNamespace(id=5), id=6)))
    notifier._dm = AsyncMock(return_value=dm)
    job = SimpleNamespace(id=3, kind="generate", state="succeeded", owner=5, channel_id=70, message_id=71,
                          params={"request": {"prompt": "on the moon"}})
    await notifier.job_finished(job, {"generation_id": 9, "images": [Picture(b"I", 42)]})
    assert dm.send.await_args.args[0].startswith("**on the moon**")
    assert [f.filename for f in dm.send.await_args.kwargs["files"]] == ["image-1.png"]


@pytest.mark.parametrize(("options", "refusal"), [
    ({"aspect": "round"}, "Unknown shape 'round'; choose one of square, portrait, landscape."),
    ({"negative": "blurry " * 100}, "That negative prompt is 700 characters; the limit is 600. Please shorten it."),
    ({"style": "vaporwave"}, "Unknown style 'vaporwave'; choose one of photo, portrait"),
])
async def test_a_bad_imagine_is_refused_privately_before_anything_is_queued_or_shown(tmp_path, monkeypatch, options,
                                                                                   refusal):
    """What a worker would refuse is refused by the bot, with the worker's words, before it defers
    publicly ("thinking…") and before a job row exists."""
    from bot.cogs.imagine import ImagineCog

    scheduler = SimpleNamespace(enqueue_generate=AsyncMock())
    press = Press(7, None)
    cog = ImagineCog(SimpleNamespace(settings=_settings(tmp_path), scheduler=scheduler, safety=SAFETY,
                                     access=LET_IN, store=_defaults(monkeypatch)))
    await cog.imagine.callback(cog, press, "on the moon", **options)
    [(where, text, kwargs)] = press.shown
    assert where == "response" and kwargs == {"ephemeral": True} and text.startswith(refusal)
    scheduler.enqueue_generate.assert_not_awaited()


async def test_someone_the_access_check_refuses_is_told_privately_before_anything_is_shown(tmp_path):
    from bot.cogs.imagine import ImagineCog
    from bot.scheduler import Refused

    scheduler = SimpleNamespace(enqueue_generate=AsyncMock())
    refused = SimpleNamespace(require=AsyncMock(side_effect=Refused("Sorry, I'm only open to members of X.")))
    press = Press(7, None)
    cog = ImagineCog(SimpleNamespace(settings=_settings(tmp_path), scheduler=scheduler, access=refused))
    await cog.imagine.callback(cog, press, "on the moon")
    assert press.shown == [("response", "Sorry, I'm only open to members of X.", {"ephemeral": True})]
    scheduler.enqueue_generate.assert_not_awaited()


async def test_a_request_the_scheduler_would_refuse_is_told_privately_before_thinking(tmp_path, monkeypatch):
    """A quota reached (or no model yet) is answered only to the person who asked: no public
    "thinking…" is shown first, and nothing is queued."""
    from bot.cogs.imagine import ImagineCog
    from bot.scheduler import Refused

    over = Refused("You have asked for 100 pictures in the last 24 hours; you can ask again <t:1:R>.")
    scheduler = SimpleNamespace(enqueue_generate=AsyncMock(), check_generate=AsyncMock(side_effect=over))
    press = Press(7, None)
    cog = ImagineCog(SimpleNamespace(settings=_settings(tmp_path), scheduler=scheduler, safety=SAFETY,
                                     access=LET_IN, store=_defaults(monkeypatch)))
    await cog.imagine.callback(cog, press, "on the moon")
    assert press.shown == [("response", over.message, {"ephemeral": True})]
    scheduler.enqueue_generate.assert_not_awaited()


@pytest.mark.parametrize(("options", "expected"), [
    ({}, {"negative_prompt": "blurry", "style": "anime", "aspect": "portrait", "num_images": 3, "face_pass": False}),
    ({"negative": "hats", "style": "photo", "aspect": "square", "count": 1, "face_pass": True},
     {"negative_prompt": "hats", "style": "photo", "aspect": "square", "num_images": 1, "face_pass": True}),
])
async def test_options_left_out_take_the_persons_defaults_and_given_ones_win(tmp_path, monkeypatch, options, expected):
    """The request checked (and queued) carries the person's /settings defaults for the options they
    left out; each option they give is used as given."""
    from bot.cogs.imagine import ImagineCog
    from bot.scheduler import Refused

    theirs = PersonalDefaults(negative_prompt="blurry", style="anime", aspect="portrait", num_images=3,
                              face_pass=False)
    scheduler = SimpleNamespace(enqueue_generate=AsyncMock(), check_generate=AsyncMock(side_effect=Refused("stop")))
    press = Press(7, None)
    cog = ImagineCog(SimpleNamespace(settings=_settings(tmp_path), scheduler=scheduler, safety=SAFETY,
                                     access=LET_IN, store=_defaults(monkeypatch, theirs)))
    await cog.imagine.callback(cog, press, "on the moon", **options)
    request = scheduler.check_generate.await_args.args[1]
    assert {name: getattr(request, name) for name in expected} == expected
    user_settings_db.get_defaults.assert_awaited_once_with(None, 7)


@pytest.mark.parametrize(("options", "face_pass"), [({}, True), ({"face_pass": False}, False),
                                                   ({"face_pass": True}, True)])
async def test_the_face_pass_option_reaches_the_queued_request(tmp_path, monkeypatch, options, face_pass):
    from bot.cogs.imagine import ImagineCog

    scheduler = SimpleNamespace(check_generate=AsyncMock(), waiting_for_a_worker=lambda: False,
                                enqueue_generate=AsyncMock(return_value=(SimpleNamespace(id=5), 1)))
    notifier = SimpleNamespace(attach_interaction=lambda job_id, interaction: None, remember_answer=AsyncMock())
    press = Press(7, None)
    press.edit_original_response = AsyncMock()
    cog = ImagineCog(SimpleNamespace(settings=_settings(tmp_path), scheduler=scheduler, safety=SAFETY,
                                     access=LET_IN, notifier=notifier,
                                     store=_defaults(monkeypatch)))
    await cog.imagine.callback(cog, press, "on the moon", **options)
    (user_id, queued), _ = scheduler.enqueue_generate.await_args
    assert user_id == 7 and queued.face_pass is face_pass
    # Discord shows it as an optional True/False choice.
    option = cog.imagine.get_parameter("face_pass")
    assert option is not None and option.type == discord.AppCommandOptionType.boolean and not option.required
