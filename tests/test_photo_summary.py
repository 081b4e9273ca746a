"""The one reply a person gets for each DM of photos."""

from __future__ import annotations

from bot.cogs.photos import summarise
from storage.accept import IntakeOutcome
from storage.intake import WARNINGS


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
