"""The one reply a person gets for each DM of photos."""

from __future__ import annotations

from bot.cogs.selfies import MESSAGE_LIMIT, message_chunks, summarise
from bot.photo_intake import IntakeOutcome
from photos.intake import WARNINGS


def test_summary_lists_kept_with_warnings_refused_with_reasons_and_what_is_next():
    outcomes = [IntakeOutcome("a.jpg", photo_id=1), IntakeOutcome("b.jpg", photo_id=2, warnings=(WARNINGS["no_face"],)),
                IntakeOutcome("c.gif", error="That's an animated image. Please send a still photo instead.")]
    text = summarise(outcomes, total=4, cap=30, needed=5)
    assert text.splitlines() == [
        "**Kept 2 photos:**",
        "• `a.jpg`",
        f"• `b.jpg`: {WARNINGS['no_face']}",
        "**Refused 1:**",
        "• `c.gif`: That's an animated image. Please send a still photo instead.",
        "You have **4 of 30** photos.",
        "Send 1 more to be able to `/train` (at least 5).",
    ]


def test_summary_at_the_cap_says_how_to_make_room():
    text = summarise([IntakeOutcome("a.jpg", photo_id=1)], total=30, cap=30, needed=5)
    assert text.endswith("That's the maximum; you're ready to `/train`. `/photos` lets you remove some.")
    assert summarise([IntakeOutcome("a.jpg", photo_id=1)], total=6, cap=30, needed=5).endswith(
        "You're ready to `/train`!")


def test_files_with_one_reason_share_its_line():
    again = "It looks like the same photo as one you already sent. Please send a different one."
    outcomes = [IntakeOutcome("a.jpg", error=again), IntakeOutcome("b.jpg", photo_id=1),
                IntakeOutcome("c.jpg", error="That's an animated image."), IntakeOutcome("d.jpg", error=again),
                IntakeOutcome("e.jpg", photo_id=2, warnings=(WARNINGS["no_face"],)), IntakeOutcome("f.jpg", photo_id=3),
                IntakeOutcome("g.jpg", photo_id=4, warnings=(WARNINGS["no_face"],))]
    assert summarise(outcomes, total=4, cap=30, needed=5).splitlines()[:6] == [
        "**Kept 4 photos:**",
        "• `b.jpg`, `f.jpg`",
        f"• `e.jpg`, `g.jpg`: {WARNINGS['no_face']}",
        "**Refused 3:**",
        f"• `a.jpg`, `d.jpg`: {again}",
        "• `c.jpg`: That's an animated image.",
    ]


def test_a_summary_longer_than_one_message_is_sent_whole_in_several():
    """Ten photos with long names and ten different reasons: more than Discord takes in one message."""
    outcomes = [IntakeOutcome(f"IMG_{i:04d}_" + "x" * 120 + ".jpg", error=f"reason {i}: " + "too blurry " * 8)
                for i in range(10)]
    text = summarise(outcomes, total=0, cap=30, needed=5)
    assert len(text) > MESSAGE_LIMIT
    chunks = message_chunks(text)
    assert len(chunks) == 2 and all(len(c) <= MESSAGE_LIMIT for c in chunks)
    assert "\n".join(chunks) == text  # split between lines, nothing lost
    assert message_chunks("x" * 4500) == ["x" * 2000, "x" * 2000, "x" * 500]  # one overlong line, cut
    assert message_chunks("short") == ["short"]


async def test_a_dm_whose_photos_cannot_be_stored_gets_a_kind_answer_with_a_reference(caplog):
    import asyncio
    from types import SimpleNamespace
    from unittest.mock import AsyncMock

    from bot.cogs.selfies import PhotosCog

    cog = PhotosCog(SimpleNamespace(scheduler=SimpleNamespace(user_lock=lambda user_id: asyncio.Lock())))
    cog.take_photos = AsyncMock(side_effect=OSError("database is locked"))
    message = SimpleNamespace(author=SimpleNamespace(id=1, bot=False), guild=None, attachments=["a"],
                              reply=AsyncMock(), channel=SimpleNamespace(send=AsyncMock()))
    await cog.on_message(message)
    text = message.reply.await_args.args[0]
    assert text.startswith("Sorry, something went wrong on my side") and "database is locked" not in text
    reference = text.split("`")[1]
    assert any(reference in r.getMessage() and r.exc_info for r in caplog.records)
