"""End to end: a person sets their /imagine defaults in the /settings panel (menus, a toggle, a modal),
/imagine uses them for the options left out and what is given wins, and /forget removes them.

The worker is played by the test (`FakeRunner` with no capacity), so the pictures asked for stay
queued and the test reads the request each job carries from the database.
"""

from __future__ import annotations

import pytest

from jobs.payloads import GenerateParams, from_stored
from jobs.requests import GenerateRequest
from storage import jobs_db, models_db, user_settings_db, users_db
from storage.user_settings_db import NO_DEFAULTS, PersonalDefaults
from tests.bot.test_scheduler import FakeRunner
from tests.e2e.harness import e2e_settings, last_text, running_bot

pytestmark = pytest.mark.slow

NEGATIVE_FIELD = "What to avoid in every picture"


async def give_model(store, user_id: int, handle: str) -> None:
    """A trained model, as a finished training leaves it (training itself is tested elsewhere)."""
    await users_db.set_handle(store.db, user_id, handle, "person")
    path = store.files.write(user_id, "models", b"lora", ".safetensors")
    await models_db.add_model(store.db, user_id, None, path, "tiny", {"handle": handle, "class_word": "person"})


def menu(panel, placeholder: str) -> str:
    """The custom_id of the panel's select menu with this placeholder."""
    return next(m["custom_id"] for m in panel.selects if m.get("placeholder") == placeholder)


def button(message, label_start: str) -> str:
    return next(b["custom_id"] for b in message.buttons if b.get("label", "").startswith(label_start))


async def imagine_request(fake, run, user, options: dict) -> GenerateRequest:
    """Run /imagine in the server; return the request its queued job carries."""
    asked = await fake.invoke_command(user, "imagine", {"prompt": "on the moon", **options}, in_guild=True)
    await fake.wait_for(lambda: "Queued" in last_text(asked), timeout=20)
    job = (await jobs_db.jobs_for_user(run.store.db, user.id, kind="generate"))[-1]
    params = from_stored("generate", job.params)
    assert isinstance(params, GenerateParams)
    return params.request


async def test_settings_defaults_apply_to_imagine_and_are_forgotten(fake, tmp_path):
    alice = fake.add_user("alice")
    settings = e2e_settings(fake, tmp_path, max_queued_generations=10)
    async with running_bot(fake, settings, runner=FakeRunner(capacity=0)) as run:
        await give_model(run.store, alice.id, "zqalice")

        # --- the panel: private, showing the built-in defaults --------------------------------------
        opened = await fake.invoke_command(alice, "settings", in_guild=True)
        panel = await fake.wait_for(lambda: opened.original, timeout=10)
        assert panel.ephemeral and opened.callback_type == 4
        assert "Style: none (built-in)" in panel.content and "Pictures: 2 (built-in)" in panel.content
        assert [m["placeholder"] for m in panel.selects] == ["Style", "Shape", "How many pictures"]

        # --- each change is saved at once and shown ---------------------------------------------------
        for placeholder, value, shown in (("Style", "anime", "Style: anime\n"),
                                          ("Shape", "portrait", "Shape: portrait\n"),
                                          ("How many pictures", "3", "Pictures: 3\n")):
            chose = await fake.choose(alice, panel, menu(panel, placeholder), [value])
            await fake.wait_for(lambda: shown in panel.content, timeout=10)  # noqa: B023 (awaited here)
            assert chose.callback_type == 7  # the panel itself is updated
        chosen = {o["value"] for m in panel.selects for o in m["options"] if o.get("default")}
        assert chosen == {"anime", "portrait", "3"}

        toggled = await fake.press_button(alice, panel, button(panel, "Face pass"))
        await fake.wait_for(lambda: "Face pass: off\n" in panel.content, timeout=10)
        assert toggled.callback_type == 7 and button(panel, "Face pass: off")

        asked = await fake.press_button(alice, panel, button(panel, "Negative prompt"))
        await fake.wait_for(lambda: asked.callback_type == 9, timeout=10)
        [field] = [f for r in asked.responses if r.type == 9 for row in r.payload["data"]["components"]
                   for f in row["components"]]
        assert field["max_length"] == settings.max_prompt_chars and field["required"] is False
        await fake.submit_modal(alice, asked, {NEGATIVE_FIELD: "  blurry, extra fingers  "})
        await fake.wait_for(lambda: "Negative prompt: blurry, extra fingers" in panel.content, timeout=10)
        assert "(built-in)" not in panel.content

        theirs = PersonalDefaults(negative_prompt="blurry, extra fingers", style="anime", aspect="portrait",
                                  num_images=3, face_pass=False)
        assert await user_settings_db.get_defaults(run.store.db, alice.id) == theirs

        # --- /imagine: what is left out comes from the defaults, what is given wins ---------------------
        request = await imagine_request(fake, run, alice, {})
        assert (request.negative_prompt, request.style, request.aspect, request.num_images, request.face_pass) == (
            "blurry, extra fingers", "anime", "portrait", 3, False)
        request = await imagine_request(fake, run, alice, {"negative": "hats", "style": "photo", "aspect": "square",
                                                           "count": 1, "face_pass": True})
        assert (request.negative_prompt, request.style, request.aspect, request.num_images, request.face_pass) == (
            "hats", "photo", "square", 1, True)

        # --- a second panel shows them; emptying the negative prompt removes that one only ----------------
        again = await fake.invoke_command(alice, "settings")
        second = await fake.wait_for(lambda: again.original, timeout=10)
        assert "Style: anime\n" in second.content and "Face pass: off\n" in second.content
        asked = await fake.press_button(alice, second, button(second, "Negative prompt"))
        await fake.wait_for(lambda: asked.callback_type == 9, timeout=10)
        await fake.submit_modal(alice, asked, {NEGATIVE_FIELD: ""})
        await fake.wait_for(lambda: "Negative prompt: none (built-in)" in second.content, timeout=10)
        assert (await user_settings_db.get_defaults(run.store.db, alice.id)).negative_prompt is None

        # --- /forget: the defaults go with everything else -----------------------------------------------
        forget = await fake.invoke_command(alice, "forget")
        question = await fake.wait_for(lambda: forget.original, timeout=10)
        await fake.press_button(alice, question, button(question, "Delete everything"))
        await fake.wait_for(lambda: "I no longer have anything of yours" in forget.original.content, timeout=30)
        assert await run.store.db.fetchall("SELECT * FROM user_settings WHERE user_id = ?", (alice.id,)) == []
        assert await user_settings_db.get_defaults(run.store.db, alice.id) == NO_DEFAULTS

        # Trained again, she gets the built-in defaults.
        await give_model(run.store, alice.id, "zqalice")
        request = await imagine_request(fake, run, alice, {})
        built_in = GenerateRequest(prompt="on the moon")
        assert (request.negative_prompt, request.style, request.aspect, request.num_images, request.face_pass) == (
            built_in.negative_prompt, built_in.style, built_in.aspect, 2, built_in.face_pass)
        fresh = await fake.invoke_command(alice, "settings")
        shown = await fake.wait_for(lambda: fresh.original, timeout=10)
        assert shown.content.count("(built-in)") == 5
    assert fake.unknown_routes == []


async def test_reset_removes_every_default_and_refusals_come_first(fake, tmp_path):
    alice = fake.add_user("alice")
    async with running_bot(fake, e2e_settings(fake, tmp_path), runner=FakeRunner(capacity=0)) as run:
        await user_settings_db.set_defaults(run.store.db, alice.id, style="anime", num_images=4)
        opened = await fake.invoke_command(alice, "settings")
        panel = await fake.wait_for(lambda: opened.original, timeout=10)
        assert "Style: anime\n" in panel.content and "Pictures: 4\n" in panel.content
        reset = await fake.press_button(alice, panel, button(panel, "Reset"))
        await fake.wait_for(lambda: panel.content.count("(built-in)") == 5, timeout=10)
        assert reset.callback_type == 7
        assert await run.store.db.fetchall("SELECT * FROM user_settings") == []

        await run.store.db.execute("INSERT INTO bans (user_id, banned_by, banned_at) VALUES (?, 1, 0)", (alice.id,))
        banned = await fake.invoke_command(alice, "settings", in_guild=True)
        await fake.wait_for(lambda: last_text(banned), timeout=10)
        assert "banned you" in last_text(banned) and banned.original.ephemeral and banned.original.components == []
    assert fake.unknown_routes == []
