"""End to end: the pictures /imagine sends carry their settings in A1111's `parameters` chunk, and
/imagine with the same prompt and `seed:` sends the same files again, byte for byte.

The real bot and a real worker process on the tiny model; the person's model is a LoRA put in storage
directly, as a finished training leaves it, so that no training has to run first.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from bench.generate_speed import make_random_lora
from jobs import png_parameters
from storage import models_db, users_db
from tests.e2e.harness import e2e_settings, running_bot
from trainer.pipelines import build_random_pipeline

pytestmark = pytest.mark.slow


async def test_imagine_with_a_seed_sends_the_same_files_and_each_says_how_it_was_made(fake, tmp_path):
    alice = fake.add_user("alice")
    lora = make_random_lora(build_random_pipeline("tiny"), tmp_path / "lora", seed=5, rank=4)
    async with running_bot(fake, e2e_settings(fake, tmp_path / "data")) as run:
        await users_db.ensure_user(run.store.db, alice.id)
        await users_db.set_handle(run.store.db, alice.id, "zqalice", "person")
        path = run.store.files.write(alice.id, "models", lora.read_bytes(), ".safetensors")
        await models_db.add_model(run.store.db, alice.id, None, path, "tiny",
                                  {"handle": "zqalice", "class_word": "person"})
        options = {"prompt": "on the moon, smiling", "negative": "blurry", "count": 2, "seed": 1234}

        async def pictures() -> list[bytes]:
            imagine = await fake.invoke_command(alice, "imagine", options)
            await fake.wait_for(lambda: imagine.original is not None and imagine.original.attachments, timeout=120)
            assert "Seeds #1: 1234, #2: 1235" in imagine.original.content
            return [attachment.data for attachment in imagine.original.attachments]

        first = await pictures()
        again = await pictures()
        assert again == first and len(set(first)) == 2

        for n, data in enumerate(first):
            text = Image.open(io.BytesIO(data)).info[png_parameters.KEY]
            settings = png_parameters.parse(text)
            assert settings == png_parameters.PictureSettings(
                prompt="a photo of zqalice person, on the moon, smiling", negative_prompt="blurry", seed=1234 + n,
                steps=25, guidance=7.0, scheduler="dpmpp_2m", width=64, height=64, model="tiny",
                lora_name="zqalice", lora_hash=png_parameters.lora_hash(lora))
            # Nothing of the person beyond what they typed and their handle: no ids, no server paths.
            assert str(alice.id) not in text and str(tmp_path) not in text and path not in text
