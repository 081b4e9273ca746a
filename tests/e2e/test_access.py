"""End to end: who may use the bot (servers, roles, bans, user installs) and consent before the first photo.

The workers are stand-ins that never start a job (what is tested happens before one would run), and the
access check's cache runs on a clock the test moves.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.access import BANNED
from bot.consent import NEEDED_TO_TRAIN, NOT_KEPT
from storage import bans_db, consents_db, jobs_db, photos_db
from tests.bot.test_scheduler import FakeRunner
from tests.clock import FakeClock
from tests.e2e.harness import BotProcess, e2e_settings, last_text, ready_to_train, running_bot
from tests.fakediscord import FakeDiscord, FakeMessage, FakeUser
from tests.photos_factory import selfie

pytestmark = pytest.mark.slow

CACHE_S = 300.0



async def send_photos(fake: FakeDiscord, user: FakeUser, count: int = 1, seed: int = 0) -> FakeMessage:
    """DM `count` selfies; the bot's reply to them, once there is one."""
    before = len(fake.bot_messages_to(user))
    await fake.send_dm(user, attachments=[(f"s{i}.jpg", selfie(seed + i), "image/jpeg") for i in range(count)])
    replies = await fake.wait_for(lambda: fake.bot_messages_to(user)[before:], timeout=30)
    return replies[0]


async def nothing_kept_of(run: BotProcess, user: FakeUser, data_dir: Path) -> bool:
    return (await photos_db.count_photos(run.store.db, user.id) == 0
            and not (data_dir / "users" / str(user.id)).exists())


async def private_answer(fake: FakeDiscord, interaction) -> str:
    """The text of the answer, once sent; every message of it must be ephemeral (seen only by the person)."""
    text = await fake.wait_for(lambda: last_text(interaction), timeout=30)
    assert all(r.message.ephemeral for r in interaction.responses if r.message is not None)
    return text


async def test_only_members_with_an_allowed_role_are_let_in_and_nothing_of_others_is_kept(fake, tmp_path):
    alice, bob, carol = fake.add_user("alice"), fake.add_user("bob"), fake.add_user("carol")
    eve = fake.add_outsider("eve")
    artists = fake.add_role("Artists")
    for member in (alice, carol):
        fake.give_role(member, artists)
    settings = e2e_settings(fake, tmp_path, allowed_roles=("artists",), access_cache_s=CACHE_S)
    who_may = ("Sorry, I'm only open to members of the **Test Guild** server with the **artists** role; once you "
               "are one, please try again (I may take up to 5 minutes to notice).")
    async with running_bot(fake, settings, runner=FakeRunner(capacity=0)) as run:
        await bans_db.ban(run.store.db, carol.id, banned_by=fake.world.owner.id, reason="spam")
        for person, told in ((eve, who_may), (bob, who_may), (carol, BANNED)):
            reply = await send_photos(fake, person)
            assert reply.content == f"{told} I didn't keep your photos."
            assert await nothing_kept_of(run, person, tmp_path)
            trained = await fake.invoke_command(person, "train")
            assert await private_answer(fake, trained) == told
        assert fake.requests_to("GET", r"/attachments/.*") == []  # no refused photo was even downloaded

        for command, options in (("train", {}), ("imagine", {"prompt": "a cat"}), ("handle", {"name": "zqbob"})):
            used = await fake.invoke_command(bob, command, options, in_guild=True)
            assert await private_answer(fake, used) == who_may
            if command == "imagine":  # answered at once: no public "thinking…" first
                assert used.callback_type == 4
        assert await jobs_db.jobs_for_user(run.store.db, bob.id) == []

        await ready_to_train(fake, alice, "zqalice")
        assert await photos_db.count_photos(run.store.db, alice.id) == 5
        trained = await fake.invoke_command(alice, "train", in_guild=True)
        assert "Training queued" in await private_answer(fake, trained)
        [job] = await jobs_db.jobs_for_user(run.store.db, alice.id)
        assert job.guild_id == fake.guild.id  # the server her use counts against
    assert fake.unknown_routes == []


async def test_a_role_taken_away_stops_a_person_once_the_cache_time_has_passed(fake, tmp_path):
    alice = fake.add_user("alice")
    artists = fake.add_role("Artists")
    fake.give_role(alice, artists)
    settings = e2e_settings(fake, tmp_path, allowed_roles=(str(artists.id),), access_cache_s=CACHE_S)
    async with running_bot(fake, settings, runner=FakeRunner(capacity=0)) as run:
        clock = run.bot.access.clock = FakeClock(1_000.0)
        assert "Kept 1 photo" in (await send_photos(fake, alice, seed=0)).content
        member_checks = len(fake.requests_to("GET", rf"/guilds/{fake.guild.id}/members/{alice.id}"))
        assert member_checks == 1

        fake.take_role(alice, artists)
        clock.now += CACHE_S - 1
        assert "Kept 1 photo" in (await send_photos(fake, alice, seed=10)).content  # still trusted
        clock.now += 1
        refused = await send_photos(fake, alice, seed=20)
        assert refused.content.startswith("Sorry, I'm only open to members of the **Test Guild** server with the "
                                          "**Artists** role")
        assert await photos_db.count_photos(run.store.db, alice.id) == 2
        trained = await fake.invoke_command(alice, "train")
        assert (await private_answer(fake, trained)).startswith("Sorry, I'm only open to members")
        assert len(fake.requests_to("GET", rf"/guilds/{fake.guild.id}/members/{alice.id}")) == 2

        fake.give_role(alice, artists)  # back, and used in the server: the interaction says so at once
        named = await fake.invoke_command(alice, "handle", {"name": "zqalice"}, in_guild=True)
        assert "Your handle is `zqalice`" in await private_answer(fake, named)

        fake.remove_member(alice)
        clock.now += CACHE_S
        left = await send_photos(fake, alice, seed=30)
        assert left.content.startswith("Sorry, I'm only open to members")
        assert await photos_db.count_photos(run.store.db, alice.id) == 2


async def test_a_member_of_another_allowed_server_counts_against_it(fake, tmp_path):
    club = fake.add_guild("Photo Club")
    alice, bob = fake.add_outsider("alice"), fake.add_user("bob")
    fake.add_member(alice, guild=club)
    settings = e2e_settings(fake, tmp_path, allowed_guilds=(club.id,))
    async with running_bot(fake, settings, runner=FakeRunner(capacity=0)) as run:
        refused = await send_photos(fake, bob)
        assert refused.content.startswith("Sorry, I'm only open to members of the **Photo Club** server;")
        await ready_to_train(fake, alice, "zqalice")
        trained = await fake.invoke_command(alice, "train")
        assert "Training queued" in await private_answer(fake, trained)
        [job] = await jobs_db.jobs_for_user(run.store.db, alice.id)
        assert job.guild_id == club.id


async def test_with_user_installs_anyone_may_use_it_against_no_server(fake, tmp_path):
    eve = fake.add_outsider("eve")
    settings = e2e_settings(fake, tmp_path, allow_user_install=True)
    async with running_bot(fake, settings, runner=FakeRunner(capacity=0)) as run:
        train = next(c for c in fake.commands() if c["name"] == "train")
        assert sorted(train["integration_types"]) == [0, 1]  # the app can be installed by a person
        await ready_to_train(fake, eve, "zqeve")
        trained = await fake.invoke_command(eve, "train")
        assert "Training queued" in await private_answer(fake, trained)
        [job] = await jobs_db.jobs_for_user(run.store.db, eve.id)
        assert job.guild_id is None


def consent_buttons(message: FakeMessage) -> dict[str, str]:
    return {b["label"]: b["custom_id"] for b in message.buttons if b["custom_id"].startswith("consent:")}


async def test_consent_is_asked_once_before_the_first_photo_is_kept(fake, tmp_path):
    alice = fake.add_user("alice")
    settings = e2e_settings(fake, tmp_path, require_consent=True)
    first = BotProcess(fake, settings, FakeRunner(capacity=0))
    await first.start()
    try:
        asked = await send_photos(fake, alice, 2)
        assert asked.content == f"{settings.consent_text}\n\n{NOT_KEPT}"
        assert set(consent_buttons(asked)) == {"I agree", "No, thanks"}
        assert await nothing_kept_of(first, alice, tmp_path)
        assert fake.requests_to("GET", r"/attachments/.*") == []
        trained = await fake.invoke_command(alice, "train")
        assert await private_answer(fake, trained) == NEEDED_TO_TRAIN

        declined = await fake.press_button(alice, asked, consent_buttons(asked)["No, thanks"])
        await fake.wait_for(lambda: declined.callback_type == 7, timeout=10)
        assert "You didn't agree, so I keep no photo of yours" in asked.content and asked.buttons == []
        again = await send_photos(fake, alice, 2)
        assert NOT_KEPT in again.content
        assert await consents_db.consent_time(first.store.db, alice.id, settings.consent_text) is None
    finally:
        await first.stop()

    # The operator changed the text and restarted: the old buttons still answer, with the new text.
    changed = e2e_settings(fake, tmp_path, require_consent=True, consent_text="New rules: only your own face.")
    async with running_bot(fake, changed, runner=FakeRunner(capacity=0)) as run:
        stale = await fake.press_button(alice, again, consent_buttons(again)["I agree"])
        await fake.wait_for(lambda: stale.callback_type == 7, timeout=10)
        assert again.content.startswith("New rules: only your own face.") and "changed since I first asked" in again.content
        assert await consents_db.consent_time(run.store.db, alice.id, changed.consent_text) is None
        agreed = await fake.press_button(alice, again, consent_buttons(again)["I agree"])
        await fake.wait_for(lambda: agreed.callback_type == 7 and not again.buttons, timeout=10)
        when = await consents_db.consent_time(run.store.db, alice.id, changed.consent_text)
        assert when is not None and f"You agreed on <t:{int(when)}:f>" in again.content

        assert "Kept 2 photos" in (await send_photos(fake, alice, 2)).content
        status = await fake.invoke_command(alice, "consent", in_guild=True)
        assert f"You agreed on <t:{int(when)}:f>" in await private_answer(fake, status)

        forget = await fake.invoke_command(alice, "forget")
        question = await fake.wait_for(lambda: forget.original, timeout=10)
        await fake.press_button(alice, question, next(b["custom_id"] for b in question.buttons
                                                      if b["label"] == "Delete everything"))
        await fake.wait_for(lambda: "no longer have anything" in forget.original.content, timeout=30)
        assert await consents_db.consent_time(run.store.db, alice.id, changed.consent_text) is None
        assert NOT_KEPT in (await send_photos(fake, alice, 1, seed=9)).content  # asked again
        assert await nothing_kept_of(run, alice, tmp_path)
    assert fake.unknown_routes == []
