"""End to end: the U#N button under a picture, with the real bot, a real worker process and the tiny
model: a new message with the picture at twice its size, a click that still works after the bot
restarted, a JPEG where the PNG is over the channel's upload limit, and the refusals."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from bench.generate_speed import make_random_lora
from storage import generations_db, jobs_db, models_db, users_db
from tests.e2e.harness import BotProcess, e2e_settings, last_text, running_bot
from tests.fakediscord import FakeDiscord
from tests.polling import wait_until
from trainer.pipelines import build_random_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A LoRA for the tiny model, written as a training writes one (no training needed here)."""
    return make_random_lora(build_random_pipeline("tiny"), tmp_path_factory.mktemp("lora"), seed=2, rank=4).read_bytes()


async def give_model(run: BotProcess, user, handle: str, lora: bytes) -> None:
    """A person who trained before: a handle and a model the worker can load."""
    db, files = run.store.db, run.store.files
    await users_db.set_handle(db, user.id, handle, "woman")
    await models_db.add_model(db, user.id, None, files.write(user.id, "models", lora, ".safetensors"),
                              "tiny", {"handle": handle, "class_word": "woman"})


async def pictures(fake: FakeDiscord, run: BotProcess, user, count: int = 2):
    """/imagine in the server, its answer and its stored generation."""
    imagine = await fake.invoke_command(user, "imagine", {"prompt": "on the moon", "count": count}, in_guild=True)
    await fake.wait_for(lambda: imagine.original is not None and imagine.original.attachments, timeout=60)
    result = imagine.original
    generation = await wait_until(lambda: generations_db.generation_for_message(run.store.db, result.id))
    return result, generation


def size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


async def upscaled(fake: FakeDiscord, pressed):
    await fake.wait_for(lambda: pressed.original is not None and pressed.original.attachments, timeout=60)
    return pressed.original


async def test_u1_clicked_after_a_restart_answers_with_the_picture_at_twice_its_size(fake, tmp_path, lora):
    alice = fake.add_user("alice")
    settings = e2e_settings(fake, tmp_path)
    first = BotProcess(fake, settings)
    await first.start()
    try:
        await give_model(first, alice, "zqalice", lora)
        result, generation = await pictures(fake, first, alice, count=4)
        ids = [b["custom_id"] for b in result.buttons]
        assert ids == [f"gen:{generation.id}:reroll", *(f"gen:{generation.id}:more:{i}" for i in range(4)),
                       *(f"gen:{generation.id}:up:{i}" for i in range(4))]
        assert [b["label"] for b in result.buttons][5:] == ["U#1", "U#2", "U#3", "U#4"]
        assert [len(row["components"]) for row in result.components] == [5, 4]  # at most 5 a row
    finally:
        await first.stop()

    async with running_bot(fake, settings) as second:
        pressed = await fake.press_button(alice, result, f"gen:{generation.id}:up:0")
        answer = await upscaled(fake, pressed)
        assert answer.id != result.id and not answer.ephemeral  # a new message, the pictures stay
        assert len(result.attachments) == 4
        [picture] = answer.attachments
        assert picture.filename == "image-1.png"
        assert size_of(picture.data) == (128, 128) == tuple(2 * side for side in size_of(result.attachments[0].data))
        assert f"Picture #1 upscaled to 128×128 (seed {generation.seeds[0]})" in answer.content
        assert answer.buttons == []  # the final picture: no U#N or More like again
        [job] = [j for j in await jobs_db.jobs_for_user(second.store.db, alice.id) if j.params.get("upscale_of")]
        assert (job.kind, job.state, job.params["upscale_of"]) == ("generate", "succeeded",
                                                                   {"generation_id": generation.id, "index": 0})
        assert job.params["request"]["seed"] == generation.seeds[0]

        # The same click again makes the same picture: it is drawn from the picture's own seed.
        again = await upscaled(fake, await fake.press_button(alice, result, f"gen:{generation.id}:up:0"))
        assert again.attachments[0].data == picture.data
    assert fake.unknown_routes == []


async def test_an_upscale_over_the_upload_limit_is_sent_as_a_jpeg_and_says_so(fake, tmp_path, lora):
    alice = fake.add_user("alice")
    async with running_bot(fake, e2e_settings(fake, tmp_path)) as run:
        await give_model(run, alice, "zqalice", lora)
        result, generation = await pictures(fake, run, alice, count=1)
        # A tight channel: the 64 px pictures (about 11 kB) fit, the 128 px PNG (about 43 kB) does not.
        fake.attachment_size_limit = 25_000
        answer = await upscaled(fake, await fake.press_button(alice, result, f"gen:{generation.id}:up:0"))
        [picture] = answer.attachments
        assert picture.filename == "image-1.jpg" and picture.data.startswith(b"\xff\xd8")
        assert len(picture.data) <= 25_000 and size_of(picture.data) == (128, 128)
        assert "converted to a high-quality JPEG" in answer.content


async def test_someone_else_s_click_and_a_spent_quota_are_refused_privately(fake, tmp_path, lora):
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    async with running_bot(fake, e2e_settings(fake, tmp_path, pictures_per_day=3)) as run:
        await give_model(run, alice, "zqalice", lora)
        await give_model(run, bob, "zqbobby", lora)
        result, generation = await pictures(fake, run, alice, count=2)

        theirs = await fake.press_button(bob, result, f"gen:{generation.id}:up:0")
        await fake.wait_for(lambda: last_text(theirs), timeout=30)
        assert "belong to the person who made these pictures" in last_text(theirs)
        assert theirs.original is None or theirs.original.ephemeral
        assert not await jobs_db.jobs_for_user(run.store.db, bob.id)

        # Two pictures and one upscale are her three of the day; a second upscale is one too many.
        await upscaled(fake, await fake.press_button(alice, result, f"gen:{generation.id}:up:1"))
        spent = await fake.press_button(alice, result, f"gen:{generation.id}:up:0")
        await fake.wait_for(lambda: last_text(spent), timeout=30)
        assert "had your 3 pictures" in last_text(spent)
        assert spent.original is None or spent.original.ephemeral
        assert len(await jobs_db.jobs_for_user(run.store.db, alice.id)) == 2
