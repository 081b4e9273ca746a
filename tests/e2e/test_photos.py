"""End to end: /photos with its contact sheet, removing one photo, clearing all, /help and /handle rules,
and a /train whose progress DM cannot be sent."""

from __future__ import annotations

import io
import logging
import re

import pytest
from PIL import Image

from storage import jobs_db, photos_db
from tests.bot.test_scheduler import FakeRunner
from tests.e2e.harness import e2e_settings, last_text, ready_to_train, running_bot
from tests.photos_factory import selfie

pytestmark = pytest.mark.slow



async def test_photos_sheet_remove_one_and_clear_all(fake, tmp_path):
    alice = fake.add_user("alice")
    async with running_bot(fake, e2e_settings(fake, tmp_path)) as run:
        empty = await fake.invoke_command(alice, "photos")
        await fake.wait_for(lambda: "no photos yet" in last_text(empty), timeout=10)

        await fake.send_dm(alice, attachments=[(f"s{i}.jpg", selfie(i), "image/jpeg") for i in range(3)])
        await fake.wait_for_message(fake.dm_channel_of(alice), lambda m: "Kept 3 photos" in m.content, timeout=30)
        shown = await fake.invoke_command(alice, "photos")
        sheet_message = await fake.wait_for(
            lambda: next((f for f in shown.followups if f.attachments), None), timeout=40)
        assert sheet_message.ephemeral and "**3 of 12**" in sheet_message.content
        with Image.open(io.BytesIO(sheet_message.attachments[0].data)) as sheet:
            assert sheet.size == (3 * 128, 128)  # three numbered thumbnails in a row
        labels = {b["label"]: b["custom_id"] for b in sheet_message.buttons}
        assert set(labels) == {"Remove a photo", "Clear all"}

        kept = await photos_db.list_photos(run.store.db, alice.id)
        opened = await fake.press_button(alice, sheet_message, labels["Remove a photo"])
        await fake.wait_for(lambda: opened.callback_type == 9, timeout=10)
        wrong = await fake.submit_modal(alice, opened, {"Photo number (from the contact sheet)": "7"})
        await fake.wait_for(lambda: "no photo number '7'" in last_text(wrong), timeout=10)
        reopened = await fake.press_button(alice, sheet_message, labels["Remove a photo"])  # a modal closes once sent
        await fake.wait_for(lambda: reopened.callback_type == 9, timeout=10)
        submitted = await fake.submit_modal(alice, reopened, {"Photo number (from the contact sheet)": "2"})
        await fake.wait_for(lambda: "Removed photo #2. You have 2 left." in last_text(submitted), timeout=10)
        left = await photos_db.list_photos(run.store.db, alice.id)
        assert [p.id for p in left] == [kept[0].id, kept[2].id]
        assert not (tmp_path / kept[1].path).exists()

        async def remove(number: str) -> str:  # by the number the (unchanged) contact sheet shows
            opened = await fake.press_button(alice, sheet_message, labels["Remove a photo"])
            await fake.wait_for(lambda: opened.callback_type == 9, timeout=10)
            submitted = await fake.submit_modal(alice, opened, {"Photo number (from the contact sheet)": number})
            return await fake.wait_for(lambda: last_text(submitted), timeout=10)

        assert await remove("3") == "Removed photo #3. You have 1 left."
        assert [p.id for p in await photos_db.list_photos(run.store.db, alice.id)] == [kept[0].id]
        assert await remove("2") == "Photo #2 was already removed. You have 1 left."
        assert [p.id for p in await photos_db.list_photos(run.store.db, alice.id)] == [kept[0].id]

        clear = await fake.press_button(alice, sheet_message, labels["Clear all"])
        question = await fake.wait_for(lambda: clear.original, timeout=10)
        assert "Delete **all** your photos?" in question.content
        yes = next(b["custom_id"] for b in question.buttons if b["label"] == "Yes, delete them")
        await fake.press_button(alice, question, yes)
        await fake.wait_for(lambda: clear.original.content == "Deleted 1 photo.", timeout=10)
        assert await photos_db.count_photos(run.store.db, alice.id) == 0
        assert list((tmp_path / "users").rglob("*.png")) == []
    assert fake.unknown_routes == []


async def test_help_handle_rules_failures_and_a_message_without_photos(fake, tmp_path, caplog):
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    async with running_bot(fake, e2e_settings(fake, tmp_path)) as run:
        train = next(c for c in fake.commands() if c["name"] == "train")
        # Installed on servers only: ALLOW_USER_INSTALL is off (tests/e2e/test_access.py turns it on).
        assert sorted(train["contexts"]) == [0, 1, 2] and sorted(train["integration_types"]) == [0]
        helped = await fake.invoke_command(alice, "help", in_guild=True)
        await fake.wait_for(lambda: last_text(helped), timeout=10)
        assert helped.original.ephemeral and "/train" in last_text(helped) and "/imagine" in last_text(helped)

        suggested = await fake.invoke_command(alice, "handle", {"class": "woman"})
        await fake.wait_for(lambda: last_text(suggested), timeout=10)
        assert last_text(suggested).startswith("How about `") and "class:woman" in last_text(suggested)

        common = await fake.invoke_command(alice, "handle", {"name": "table", "class": "woman"})
        await fake.wait_for(lambda: last_text(common), timeout=10)
        assert "common" in last_text(common).lower()
        ok = await fake.invoke_command(alice, "handle", {"name": "zqalice", "class": "woman"})
        await fake.wait_for(lambda: last_text(ok) == "Your handle is `zqalice` (woman).", timeout=10)
        taken = await fake.invoke_command(bob, "handle", {"name": "ZQalice", "class": "man"})
        await fake.wait_for(lambda: last_text(taken), timeout=10)
        assert "Someone else already has the handle" in last_text(taken)

        async def broken(*args, **kwargs):
            raise RuntimeError("the database went away")

        run.bot.scheduler.enqueue_train = broken  # an unexpected failure inside a command
        with caplog.at_level(logging.ERROR, logger="bot.app"):
            failed = await fake.invoke_command(alice, "train")
            await fake.wait_for(lambda: "something went wrong" in last_text(failed), timeout=10)
        reference = re.search(r"reference `([0-9a-f]{8})`", last_text(failed))[1]
        assert "RuntimeError" not in last_text(failed) and "database" not in last_text(failed)
        assert any(reference in r.getMessage() and r.exc_info for r in caplog.records)

        await fake.send_dm(alice, "hello")
        await fake.wait_for_message(
            fake.dm_channel_of(alice),
            lambda m: m.from_bot and not m.ephemeral and "Send me your selfies as attachments" in m.content)
    assert fake.unknown_routes == []


async def test_a_training_whose_progress_dm_cannot_be_sent_is_not_started(fake, tmp_path):
    """Someone who closed their DMs to the bot after sending photos: the training would run unseen
    and its results go nowhere, so it is not started, and they are told what to change."""
    alice = fake.add_user("alice")
    async with running_bot(fake, e2e_settings(fake, tmp_path), runner=FakeRunner(capacity=0)) as run:
        await ready_to_train(fake, alice, "zqalice")
        alice.accepts_dms = False
        train = await fake.invoke_command(alice, "train", in_guild=True)
        await fake.wait_for(lambda: "couldn't send you a direct message" in last_text(train), timeout=30)
        assert "Sorry, something went wrong" not in last_text(train)
        assert [j.state for j in await jobs_db.jobs_for_user(run.store.db, alice.id)] == ["cancelled"]

        alice.accepts_dms = True
        again = await fake.invoke_command(alice, "train", in_guild=True)  # not "already training"
        await fake.wait_for(lambda: "Training queued" in last_text(again), timeout=30)
