"""End to end: what the bot may draw, with the real bot, a real worker process and the tiny model.

The prompt filter refuses privately before anything is queued; a stand-in image checker that flags
every picture keeps every picture out of every channel (training samples and previews included),
except an age-restricted channel, and there only while NSFW_IN_AGE_RESTRICTED is on.
"""

from __future__ import annotations

import pytest

from storage import generations_db, jobs_db, usage_db
from tests.e2e.harness import BotProcess, e2e_settings, last_text, ready_to_train, running_bot, start_training
from tests.fakediscord import FakeDiscord
from trainer.safety_checker import save_stand_in

pytestmark = pytest.mark.slow

REFUSED = "your prompt contains something this server doesn't allow"


async def answer_of(fake: FakeDiscord, interaction, timeout: float = 30):
    """The message that finally answers an interaction, once it says something."""
    await fake.wait_for(lambda: last_text(interaction), timeout=timeout)
    return [r.message for r in interaction.responses if r.message is not None][-1]


def pictures_from_bot(fake: FakeDiscord) -> list[str]:
    """Every picture the bot has posted or left in a message anywhere, in any version of it."""
    return [f"{m.channel.name or 'dm'}/{a.filename}" for channel in fake.world.channels.values()
            for m in fake.messages_in(channel, include_deleted=True) if m.from_bot
            for version in m.history for a in version.attachments if a.filename.endswith(".png")]


async def test_the_prompt_filter_refuses_privately_where_it_applies(fake, tmp_path):
    """Blocked words are refused, ephemerally in a server and before any job exists; the negative
    prompt is not read; an age-restricted channel opened by the operator gets no filter."""
    adults = fake.world.new_text_channel(fake.guild, "after-dark", nsfw=True)
    alice = fake.add_user("alice")
    settings = e2e_settings(fake, tmp_path, nsfw_in_age_restricted=True)
    async with running_bot(fake, settings) as run:
        for where in ({"in_guild": True}, {}):  # a server channel; the DM, where SAFETY=images applies
            refused = await fake.invoke_command(alice, "imagine", {"prompt": "a N.U.D.E portrait"}, **where)
            answer = await answer_of(fake, refused)
            assert REFUSED in answer.content and "nude" not in answer.content.lower()
            assert answer.ephemeral and refused.callback_type == 4  # answered privately, never deferred

        # Past the filter, each of these is refused for the next reason: no model yet.
        for options, where in (({"prompt": "a portrait", "negative": "nude"}, {"in_guild": True}),
                               ({"prompt": "a nude portrait"}, {"channel": adults}),
                               ({"prompt": "a portrait in Scunthorpe, with my therapist"}, {"in_guild": True})):
            passed = await fake.invoke_command(alice, "imagine", options, **where)
            assert "You don't have a model yet" in (await answer_of(fake, passed)).content
        assert await jobs_db.jobs_for_user(run.store.db, alice.id) == []
    assert fake.unknown_routes == []


async def test_flagged_pictures_reach_only_an_age_restricted_channel_opened_to_them(fake, tmp_path):
    checker = save_stand_in(tmp_path / "flag-all", flag_all=True)
    adults = fake.world.new_text_channel(fake.guild, "after-dark", nsfw=True)
    alice = fake.add_user("alice")
    settings = e2e_settings(fake, tmp_path / "data", safety_checker=str(checker), nsfw_in_age_restricted=True)
    run = BotProcess(fake, settings)
    await run.start()
    try:
        # --- a training: its previews and samples are flagged, and its DM gets none of them -----------
        await ready_to_train(fake, alice, "zqalice")
        progress = await start_training(fake, alice)
        done = await fake.wait_for_message(fake.dm_channel_of(alice),
                                           lambda m: m.from_bot and "Your model is trained" in m.content, timeout=180)
        assert "2 pictures were withheld by this server's safety filter." in done.content
        assert done.attachments == [] and progress.history[-1].content.endswith("Done! Your model is ready.")

        # --- /imagine in an ordinary server channel: nothing is sent, the person is told ------------
        general = await fake.invoke_command(alice, "imagine", {"prompt": "on the moon", "count": 2}, in_guild=True)
        answer = await fake.wait_for(lambda: general.original is not None and "withheld" in general.original.content
                                     and general.original, timeout=120)
        assert "2 pictures were withheld by this server's safety filter." in answer.content
        assert answer.attachments == [] and "Seeds" not in answer.content
        assert pictures_from_bot(fake) == []  # not a sample, a preview or a picture, anywhere
        [job] = [j for j in await jobs_db.jobs_for_user(run.store.db, alice.id) if j.kind == "generate"]
        generation = await generations_db.get_generation(run.store.db, job.result["generation_id"])
        assert generation.paths == []  # flagged pictures are not kept either
        counted = await usage_db.used_by(run.store.db, alice.id, "flagged", 0)
        assert counted >= 2 + 2  # the samples and these two, and any previews

        # --- the age-restricted channel the operator opened to them gets them -----------------------
        opened = await fake.invoke_command(alice, "imagine", {"prompt": "on the moon", "count": 2}, channel=adults)
        shown = await fake.wait_for(lambda: opened.original is not None and opened.original.attachments
                                    and opened.original, timeout=120)
        assert [a.filename for a in shown.attachments] == ["image-1.png", "image-2.png"]
        assert "withheld" not in shown.content
        assert {p.split("/")[0] for p in pictures_from_bot(fake)} == {"after-dark"}
        assert await usage_db.used_by(run.store.db, alice.id, "flagged", 0) == counted
    finally:
        await run.stop()

    # --- the same channel, once the operator turned NSFW_IN_AGE_RESTRICTED off -----------------------
    async with running_bot(fake, e2e_settings(fake, tmp_path / "data", safety_checker=str(checker))):
        closed = await fake.invoke_command(alice, "imagine", {"prompt": "on the moon", "count": 1}, channel=adults)
        answer = await fake.wait_for(lambda: closed.original is not None and "withheld" in closed.original.content
                                     and closed.original, timeout=120)
        assert "1 picture was withheld by this server's safety filter." in answer.content
        assert answer.attachments == []
        assert len(pictures_from_bot(fake)) == 2  # still only the two sent while it was allowed
    assert fake.unknown_routes == []
