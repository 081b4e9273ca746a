"""End to end: one person's whole journey with the real bot, a real worker process and the tiny model.

Selfies by DM, a handle, a training with live progress, pictures, a reroll pressed after the bot
restarted, someone else trying the first person's handle, and `/forget` leaving nothing behind.
"""

from __future__ import annotations

import logging
import time

import pytest

from bot import notifier
from bot.progress import ThrottledEditor
from storage import generations_db, jobs_db, models_db, photos_db, users_db
from tests.e2e.harness import BotProcess, LoopLag, e2e_settings, last_text, running_bot
from tests.fakediscord import FakeDiscord
from tests.photos_factory import selfie
from tests.polling import wait_until

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)



async def answered(fake: FakeDiscord, interaction, timeout: float = 30) -> str:
    """Wait for the interaction's visible answer (a deferred 'thinking' state does not count)."""
    await fake.wait_for(lambda: last_text(interaction), timeout=timeout)
    return last_text(interaction)


def files_of(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(params=["local", "celery"])
def backend(request) -> dict:
    """The same journey with the default local workers and with JOB_BACKEND=celery (Redis + a worker)."""
    if request.param == "local":
        return {}
    request.getfixturevalue("celery_workers").start("w1")
    return {"job_backend": "celery", "redis_url": request.getfixturevalue("redis_url")}


async def test_selfies_handle_train_imagine_restart_reroll_and_forget(fake, tmp_path, backend, monkeypatch):
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    settings = e2e_settings(fake, tmp_path, **backend)
    throttles: list[float] = []  # the interval of each message's edit throttle

    class Throttle(ThrottledEditor):
        def __init__(self, edit, interval, *args, **kwargs) -> None:
            throttles.append(interval)
            super().__init__(edit, interval, *args, **kwargs)

    monkeypatch.setattr(notifier, "ThrottledEditor", Throttle)
    dm = fake.dm_channel_of(alice)
    lag = LoopLag()
    first = BotProcess(fake, settings)
    await first.start()
    try:
        # --- selfies: five good ones, a broken file and one over the size limit -----------------------
        huge = b"\xff\xd8" + bytes(2 * 1024 * 1024)
        sent = await fake.send_dm(alice, attachments=[(f"s{i}.jpg", selfie(i), "image/jpeg") for i in range(5)]
                                  + [("notes.jpg", b"not a picture", "image/jpeg"), ("huge.jpg", huge, "image/jpeg")])
        summary = await fake.wait_for_message(dm, lambda m: m.from_bot, timeout=30)
        assert "Kept 5 photos" in summary.content and "Refused 2" in summary.content
        assert "`notes.jpg`: That file doesn't look like a photo" in summary.content
        assert "`huge.jpg`: it is 2.0 MB; the limit is 1 MB" in summary.content
        assert "**5 of 12**" in summary.content and "ready to `/train`" in summary.content
        huge_id = sent.attachments[-1].id
        assert fake.requests_to("GET", rf"/attachments/{huge_id}/.*") == []  # refused before download
        assert len(fake.requests_to("GET", r"/attachments/\d+/.*")) == 6
        assert await photos_db.count_photos(first.store.db, alice.id) == 5

        # --- no handle yet: /train says what to do ----------------------------------------------------
        early = await fake.invoke_command(alice, "train")
        assert "Pick your handle first with `/handle`" in await answered(fake, early)

        handle = await fake.invoke_command(alice, "handle", {"name": "zqalice", "class": "woman"})
        assert await answered(fake, handle) == "Your handle is `zqalice` (woman)."

        # --- /train: one DM message edited with stage, bar, steps; then samples -----------------------
        lag.start()
        started = time.monotonic()
        train = await fake.invoke_command(alice, "train")
        assert "Training queued (position 1)" in await answered(fake, train)
        again = await fake.invoke_command(alice, "train")
        assert "already training or waiting" in await answered(fake, again)
        done = await fake.wait_for_message(dm, lambda m: m.from_bot and "Here is" in m.content, timeout=120)
        train_seconds = time.monotonic() - started
        await lag.stop()
        assert "Here is **zqalice**" in done.content and "/imagine prompt:" in done.content
        assert [a.filename for a in done.attachments] == ["sample-1.png", "sample-2.png"]
        progress = next(m for m in fake.messages_in(dm) if m.from_bot and "Training your model" in m.content)
        texts = [v.content for v in progress.history]
        assert len(texts) >= 4  # created, then edited as stages and steps went by
        assert any("Making reference images" in t for t in texts)
        assert any("Training your model" in t.split("\n")[1] and "step " in t and "Time left" in t for t in texts)
        assert texts[-1].endswith("Done! Your model is ready.")
        assert any(a.filename == "preview.png" for v in progress.history for a in v.attachments)
        assert progress.attachments == []  # the finished message drops the preview
        # Edited through a throttle set to the configured interval. Its spacing is tested on its own clock
        # in tests/bot/test_progress.py: the fake records when each edit arrived, not when it was sent.
        assert throttles and set(throttles) == {settings.progress_interval_s}
        model = await models_db.get_active_model(first.store.db, alice.id)
        run_files = first.store.files
        assert model is not None and model.metadata["handle"] == "zqalice"
        # The figures the README quotes; see them with `-o log_cli=true --log-cli-level=INFO`.
        log.info("measured: /train to model on tiny %.1f s; event loop blocked at most %.0f ms (%d samples)",
                 train_seconds, lag.worst * 1000, lag.samples)

        # --- /imagine in the guild: files with seeds and buttons --------------------------------------
        imagine = await fake.invoke_command(alice, "imagine", {"prompt": "on the moon", "count": 2}, in_guild=True)
        await fake.wait_for(lambda: imagine.callback, timeout=10)
        assert imagine.callback_type == 5  # deferred at once, the pictures follow
        await fake.wait_for(lambda: imagine.original is not None and imagine.original.attachments, timeout=60)
        result = imagine.original
        assert [a.filename for a in result.attachments] == ["image-1.png", "image-2.png"]
        assert "Seeds #1:" in result.content
        generation = await wait_until(lambda: generations_db.generation_for_message(first.store.db, result.id))
        assert generation is not None and generation.owner == alice.id
        assert [b["custom_id"] for b in result.buttons] == [
            f"gen:{generation.id}:reroll", f"gen:{generation.id}:more:0", f"gen:{generation.id}:more:1",
            f"gen:{generation.id}:up:0", f"gen:{generation.id}:up:1"]

        # --- a prompt longer than the model reads is refused with the reason, not cut ----------------
        wordy = await fake.invoke_command(alice, "imagine", {"prompt": "a very detailed scene " * 22})
        await fake.wait_for(lambda: wordy.original is not None and "too long" in wordy.original.content, timeout=60)
        assert wordy.original.content.startswith("Sorry, no pictures this time: Your prompt is too long")
        assert wordy.original.attachments == []

        # --- /export: both LoRA formats, only to her ------------------------------------------------
        export = await fake.invoke_command(alice, "export")
        exported = await fake.wait_for(lambda: export.original, timeout=30)
        assert exported.ephemeral
        assert [a.filename for a in exported.attachments] == ["pytorch_lora_weights.safetensors",
                                                              "zqalice_kohya.safetensors"]
        assert exported.attachments[0].data == run_files.read(model.lora_path, alice.id)
        fake.attachment_size_limit = min(len(a.data) for a in exported.attachments) - 1  # a tighter channel
        small = await fake.invoke_command(alice, "export")
        refused = await fake.wait_for(lambda: small.original, timeout=30)
        assert refused.attachments == [] and "larger than this channel's upload limit" in refused.content
        fake.attachment_size_limit = 10 * 1024 * 1024

        # --- bob types alice's handle: a polite refusal, never her face -------------------------------
        theirs = await fake.invoke_command(bob, "imagine", {"prompt": "zqalice on a horse"})
        assert "You don't have a model yet" in await answered(fake, theirs)
        assert all(not m.attachments for m in fake.bot_messages_to(bob))
        pressed = await fake.press_button(bob, result, f"gen:{generation.id}:reroll")
        assert "belong to the person who made these pictures" in await answered(fake, pressed)
        assert pressed.original is None or pressed.original.ephemeral
    finally:
        await first.stop()

    # --- restart: the reroll button under the old message still works -----------------------------
    async with running_bot(fake, settings) as second:
        reroll = await fake.press_button(alice, result, f"gen:{generation.id}:reroll")
        await fake.wait_for(lambda: reroll.original is not None and reroll.original.attachments, timeout=60)
        assert len(reroll.original.attachments) == 2
        assert reroll.original.content.split("\n")[1] != result.content.split("\n")[1]  # new seeds
        more = await fake.press_button(alice, result, f"gen:{generation.id}:more:1")
        await fake.wait_for(lambda: more.original is not None and more.original.attachments, timeout=60)
        assert len(more.original.attachments) == 1

        # --- /forget: confirm, and nothing of alice is left -------------------------------------------
        forget = await fake.invoke_command(alice, "forget")
        prompt = await fake.wait_for(lambda: forget.original, timeout=10)
        assert prompt.ephemeral and "can't be undone" in prompt.content
        confirm = next(b["custom_id"] for b in prompt.buttons if b["label"] == "Delete everything")
        await fake.press_button(alice, prompt, confirm)
        await fake.wait_for(lambda: "no longer have anything" in forget.original.content, timeout=30)
        assert "could not be deleted" not in forget.original.content
        # The messages with her pictures are gone too: the /imagine answers, and the training's.
        assert result.deleted and reroll.original.deleted and more.original.deleted
        assert progress.deleted and done.deleted
        assert not [m for m in fake.bot_messages_to(alice) if m.attachments and not m.ephemeral]  # /export: ephemeral
        db = second.store.db
        assert await photos_db.count_photos(db, alice.id) == 0
        assert await models_db.list_models(db, alice.id) == []
        assert await jobs_db.jobs_for_user(db, alice.id) == []
        assert await users_db.get_user(db, alice.id) is None
        assert await generations_db.get_generation(db, generation.id) is None
        assert files_of(tmp_path / "users") == []

        async def personal_files() -> list[str]:  # all that may stay: the database and shared class images
            shared = ("avatar.db", "shared/class_images/", "workers/class-cache/")
            # and, with Celery, the worker's log and the (empty) lock file it holds on its folder
            return [f for f in files_of(tmp_path) if not f.startswith(shared)
                    and not (f.startswith("workers/") and f.endswith((".log", "/.lock")))]

        async def none_left() -> bool:
            return not await personal_files()

        await wait_until(none_left)  # the worker deletes its copy of the LoRA as soon as it is told
        assert await personal_files() == []
    assert fake.unknown_routes == []
