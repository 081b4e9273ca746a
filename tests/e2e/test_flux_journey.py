"""End to end on a Flux base (BASE_MODEL=tiny-flux): selfies, a handle, a training with progress and a
preview, pictures with the person's LoRA, a variation and the LoRA export, through the real bot and
its worker, as on the SD base (tests/e2e/test_journey.py)."""

from __future__ import annotations

import pytest

from storage import models_db
from tests.e2e.harness import e2e_settings, last_text, running_bot
from tests.photos_factory import selfie

pytestmark = pytest.mark.slow


async def test_a_flux_base_trains_and_draws_a_person(fake, tmp_path):
    alice = fake.add_user("alice")
    settings = e2e_settings(fake, tmp_path, base_model="tiny-flux")
    dm = fake.dm_channel_of(alice)
    async with running_bot(fake, settings) as bot:
        await fake.send_dm(alice, attachments=[(f"s{i}.jpg", selfie(i), "image/jpeg") for i in range(5)])
        summary = await fake.wait_for_message(dm, lambda m: m.from_bot, timeout=30)
        assert "Kept 5 photos" in summary.content
        handle = await fake.invoke_command(alice, "handle", {"name": "zqalice", "class": "woman"})
        await fake.wait_for(lambda: last_text(handle), timeout=30)

        train = await fake.invoke_command(alice, "train")
        await fake.wait_for(lambda: "Training queued" in last_text(train), timeout=30)
        done = await fake.wait_for_message(dm, lambda m: m.from_bot and "Here is" in m.content, timeout=180)
        assert [a.filename for a in done.attachments] == ["sample-1.png", "sample-2.png"]
        progress = next(m for m in fake.messages_in(dm) if m.from_bot and "Training your model" in m.content)
        texts = [v.content for v in progress.history]
        # Flux trains without reference images by default (jobs.train_defaults), with live steps.
        assert not any("Making reference images" in t for t in texts)
        assert any("step " in t and "Time left" in t for t in texts)
        assert any(a.filename == "preview.png" for v in progress.history for a in v.attachments)
        model = await models_db.get_active_model(bot.store.db, alice.id)
        assert model is not None and model.metadata["family"] == "flux"
        assert model.metadata["base_model"] == "tiny-flux"

        imagine = await fake.invoke_command(alice, "imagine", {"prompt": "on the moon", "count": 2}, in_guild=True)
        await fake.wait_for(lambda: imagine.original is not None and imagine.original.attachments, timeout=60)
        result = imagine.original
        assert [a.filename for a in result.attachments] == ["image-1.png", "image-2.png"]
        more = next(b["custom_id"] for b in result.buttons if ":more:0" in b["custom_id"])
        variation = await fake.press_button(alice, result, more)
        await fake.wait_for(lambda: variation.original is not None and variation.original.attachments, timeout=60)

        export = await fake.invoke_command(alice, "export")
        exported = await fake.wait_for(lambda: export.original, timeout=30)
        assert [a.filename for a in exported.attachments] == ["pytorch_lora_weights.safetensors",
                                                              "zqalice_kohya.safetensors"]
