"""The /settings panel's text, its closing, and a negative prompt too long for /imagine."""

from __future__ import annotations

from types import SimpleNamespace
from unittest.mock import AsyncMock

from bot.cogs.settings import CLOSED, NegativePromptModal, SettingsPanel, panel_text
from storage import user_settings_db
from storage.user_settings_db import NO_DEFAULTS, PersonalDefaults


def _panel(defaults: PersonalDefaults = NO_DEFAULTS, max_prompt_chars: int = 600) -> SettingsPanel:
    bot = SimpleNamespace(settings=SimpleNamespace(max_prompt_chars=max_prompt_chars), store=SimpleNamespace(db=None))
    opened = SimpleNamespace(user=SimpleNamespace(id=7), edit_original_response=AsyncMock())
    return SettingsPanel(bot, opened, defaults)  # type: ignore[arg-type]


def test_the_panel_says_which_values_are_the_persons_and_which_built_in():
    text = panel_text(PersonalDefaults(style="anime", face_pass=False, negative_prompt="*bold* " * 40))
    lines = text.splitlines()[1:]
    assert lines[:4] == ["• Style: anime", "• Shape: square (built-in)", "• Pictures: 2 (built-in)", "• Face pass: off"]
    assert lines[4].startswith(r"• Negative prompt: \*bold\* ") and lines[4].endswith("…")  # markdown shown as typed
    assert panel_text(NO_DEFAULTS).count("(built-in)") == 5


async def test_the_menus_mark_the_values_in_effect():
    panel = _panel(PersonalDefaults(aspect="landscape", num_images=4))
    assert [o.value for o in panel.style.options if o.default] == ["none"]
    assert [o.value for o in panel.aspect.options if o.default] == ["landscape"]
    assert [o.value for o in panel.count.options if o.default] == ["4"]
    assert panel.face_pass.label == "Face pass: on"


async def test_a_closed_panel_says_to_run_settings_again():
    panel = _panel(PersonalDefaults(style="photo"))
    await panel.on_timeout()
    kwargs = panel.opened.edit_original_response.await_args.kwargs
    assert kwargs["view"] is None and kwargs["content"].endswith(CLOSED) and "Style: photo" in kwargs["content"]


async def test_a_negative_prompt_longer_than_imagine_takes_is_refused_and_not_saved(monkeypatch):
    """Discord's form holds it to the limit; the bot checks again, with /imagine's words."""
    monkeypatch.setattr(user_settings_db, "set_defaults", AsyncMock())
    panel = _panel(PersonalDefaults(negative_prompt="blurry " * 100))  # 699 once stripped
    modal = NegativePromptModal(panel)
    assert modal.text.max_length == 600
    sent = AsyncMock()
    interaction = SimpleNamespace(response=SimpleNamespace(is_done=lambda: False, send_message=sent))
    await modal.on_submit(interaction)  # type: ignore[arg-type]
    assert sent.await_args.args[0] == ("That negative prompt is 699 characters; the limit is 600. "
                                       "Please shorten it.")
    assert sent.await_args.kwargs == {"ephemeral": True}
    user_settings_db.set_defaults.assert_not_awaited()


async def test_a_form_sent_after_its_panel_closed_is_saved_and_shows_no_controls(monkeypatch):
    saved = PersonalDefaults(negative_prompt="hats")
    monkeypatch.setattr(user_settings_db, "set_defaults", AsyncMock(return_value=saved))
    panel = _panel(PersonalDefaults(negative_prompt=" hats "))  # the form opens with it, sent unchanged
    modal = NegativePromptModal(panel)
    panel.stop()  # as its timeout does
    edit = AsyncMock()
    interaction = SimpleNamespace(response=SimpleNamespace(is_done=lambda: False, edit_message=edit))
    await modal.on_submit(interaction)  # type: ignore[arg-type]
    user_settings_db.set_defaults.assert_awaited_once_with(None, 7, negative_prompt="hats")
    assert edit.await_args.kwargs["view"] is None and edit.await_args.kwargs["content"].endswith(CLOSED)
