"""Users, photos, models and generations: the small query modules over the database."""

from __future__ import annotations

import hashlib

import aiosqlite
import pytest

from jobs.handles import HandleError, HandleTakenError
from storage import generations_db, models_db, photos_db, users_db
from storage.photos_db import DuplicatePhotoError
from storage.store import Storage

ALICE, BOB = 101, 202


@pytest.fixture
async def store(tmp_path):
    store = await Storage.open(tmp_path)
    for user in (ALICE, BOB):
        await users_db.ensure_user(store.db, user)
    yield store
    await store.close()


async def _add_photo(store: Storage, owner: int, content: bytes, phash: int = 0, **extra) -> int:
    path = store.files.write(owner, "photos", content, ".png")
    return await photos_db.add_photo(
        store.db,
        owner,
        sha256=hashlib.sha256(content).hexdigest(),
        phash=phash,
        path=path,
        byte_size=len(content),
        width=640,
        height=480,
        **extra,
    )


async def test_ensure_user_creates_once_and_keeps_settings(store):
    user = await users_db.get_user(store.db, ALICE)
    assert user is not None and (user.handle, user.class_word, user.settings) == (None, None, {})
    await users_db.update_settings(store.db, ALICE, steps=600, style="photo")
    again = await users_db.ensure_user(store.db, ALICE)
    assert again.settings == {"steps": 600, "style": "photo"} and again.created_at == user.created_at
    assert await users_db.get_user(store.db, 999) is None


async def test_update_settings_merges_and_removes(store):
    await users_db.update_settings(store.db, ALICE, steps=600, style="photo")
    assert await users_db.update_settings(store.db, ALICE, style=None, seed=3) == {"steps": 600, "seed": 3}
    assert (await users_db.get_user(store.db, ALICE)).settings == {"steps": 600, "seed": 3}


async def test_set_handle_normalises_and_can_be_changed(store):
    user = await users_db.set_handle(store.db, ALICE, " ZorbQ ", "Woman")
    assert (user.handle, user.class_word) == ("zorbq", "woman")
    user = await users_db.set_handle(store.db, ALICE, "vexlyn", "person")
    assert (user.handle, user.class_word) == ("vexlyn", "person")
    assert await users_db.all_handles(store.db) == {"vexlyn"}


async def test_a_handle_taken_by_someone_else_is_refused_kindly(store):
    await users_db.set_handle(store.db, ALICE, "zorbq", "woman")
    with pytest.raises(HandleTakenError) as refused:
        await users_db.set_handle(store.db, BOB, "ZORBQ", "man")
    assert "already has the handle 'zorbq'" in refused.value.reason
    suggestion = refused.value.reason.split("How about '")[1].rstrip("'?")
    assert suggestion != "zorbq" and suggestion.startswith("zorbq")
    assert (await users_db.set_handle(store.db, BOB, suggestion, "man")).handle == suggestion
    # Setting one's own handle again is not a conflict.
    assert (await users_db.set_handle(store.db, ALICE, "zorbq", "woman")).handle == "zorbq"


async def test_the_database_itself_treats_handles_case_insensitively(store):
    await users_db.set_handle(store.db, ALICE, "zorbq", "woman")
    with pytest.raises(aiosqlite.IntegrityError):
        await store.db.execute("UPDATE users SET handle = 'ZorbQ' WHERE id = ?", (BOB,))


async def test_set_handle_applies_the_handle_rules(store):
    with pytest.raises(HandleError, match="common English word"):
        await users_db.set_handle(store.db, ALICE, "dragon", "woman")
    assert (await users_db.get_user(store.db, ALICE)).handle is None


async def test_photos_are_listed_oldest_first_with_fields_decoded(store):
    big_hash = 0xFEDCBA9876543210  # above 2**63: must survive SQLite's signed integers
    first = await _add_photo(
        store, ALICE, b"one", phash=big_hash, face_box=(10, 20, 30, 40), quality_flags=["blurry"]
    )
    second = await _add_photo(store, ALICE, b"two", phash=5)
    await _add_photo(store, BOB, b"one")
    photos = await photos_db.list_photos(store.db, ALICE)
    assert [p.id for p in photos] == [first, second]
    assert photos[0].phash == big_hash and photos[0].face_box == (10, 20, 30, 40)
    assert photos[0].quality_flags == ("blurry",) and photos[1].quality_flags == ()
    assert (photos[0].width, photos[0].height, photos[0].byte_size) == (640, 480, 3)
    assert store.files.read(photos[0].path, ALICE) == b"one"
    assert await photos_db.count_photos(store.db, ALICE) == 2
    assert await photos_db.photo_hashes(store.db, ALICE) == [
        (hashlib.sha256(b"one").hexdigest(), big_hash),
        (hashlib.sha256(b"two").hexdigest(), 5),
    ]


async def test_the_same_photo_twice_is_refused(store):
    await _add_photo(store, ALICE, b"one")
    with pytest.raises(DuplicatePhotoError):
        await _add_photo(store, ALICE, b"one")
    assert await photos_db.count_photos(store.db, ALICE) == 1


async def test_delete_photo_removes_only_the_owners_photo_and_its_file(store):
    photo_id = await _add_photo(store, ALICE, b"one")
    path = store.files.resolve((await photos_db.list_photos(store.db, ALICE))[0].path)
    assert not await photos_db.delete_photo(store, BOB, photo_id)
    assert path.exists() and await photos_db.count_photos(store.db, ALICE) == 1
    assert await photos_db.delete_photo(store, ALICE, photo_id)
    assert not path.exists() and await photos_db.count_photos(store.db, ALICE) == 0
    assert not await photos_db.delete_photo(store, ALICE, photo_id)


async def test_the_newest_model_is_the_only_active_one(store):
    first = await models_db.add_model(
        store.db, ALICE, None, "users/101/models/a.safetensors", "sd15", {"rank": 4}
    )
    second = await models_db.add_model(
        store.db, ALICE, None, "users/101/models/b.safetensors", "sd15", {"handle": "zorbq", "steps": 400}
    )
    bobs = await models_db.add_model(store.db, BOB, None, "users/202/models/c.safetensors", "sd15", {})
    active = await models_db.get_active_model(store.db, ALICE)
    assert active.id == second and active.metadata == {"handle": "zorbq", "steps": 400}
    assert [(m.id, m.active) for m in await models_db.list_models(store.db, ALICE)] == [
        (first, False),
        (second, True),
    ]
    assert (await models_db.get_active_model(store.db, BOB)).id == bobs
    assert (await models_db.get_model(store.db, first)).lora_path == "users/101/models/a.safetensors"
    assert await models_db.get_active_model(store.db, 999) is None


async def test_generations_round_trip_and_are_found_by_message(store):
    model_id = await models_db.add_model(store.db, ALICE, None, "users/101/models/a.safetensors", "sd15", {})
    gen_id = await generations_db.add_generation(
        store.db,
        ALICE,
        model_id,
        None,
        "zorbq woman as an astronaut",
        "blurry",
        [11, 12],
        {"request": {"steps": 25}},
        ["users/101/generations/x.png", "users/101/generations/y.png"],
    )
    gen = await generations_db.get_generation(store.db, gen_id)
    assert (gen.owner, gen.model_id, gen.prompt, gen.negative) == (
        ALICE,
        model_id,
        "zorbq woman as an astronaut",
        "blurry",
    )
    assert (gen.seeds, gen.params, gen.paths[1]) == (
        [11, 12],
        {"request": {"steps": 25}},
        "users/101/generations/y.png",
    )
    assert gen.message_id is None
    await generations_db.set_generation_message(store.db, gen_id, 5, 555)
    found = await generations_db.generation_for_message(store.db, 555)
    assert found.id == gen_id and found.channel_id == 5
    assert await generations_db.generation_for_message(store.db, 556) is None
    assert await generations_db.get_generation(store.db, gen_id + 1) is None
