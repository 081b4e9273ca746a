"""Retention: a person's current model and the previous one are kept, pictures for a number of days."""

from __future__ import annotations

import pytest

from jobs.payloads import GenerateParams, to_stored
from jobs.requests import GenerateRequest
from storage import generations_db, jobs_db, models_db, users_db
from storage.retention import DAY_S, drop_old_models, expire_pictures, save_model
from storage.store import Storage

ALICE, BOB = 101, 202


@pytest.fixture
async def store(tmp_path):
    store = await Storage.open(tmp_path)
    for user in (ALICE, BOB):
        await users_db.ensure_user(store.db, user)
    yield store
    await store.close()


async def _train(store: Storage, user: int, n: int) -> tuple[int, list[int], list[str]]:
    lora = store.files.write(user, "models", f"lora {n}".encode(), ".safetensors")
    kohya = store.files.write(user, "models", f"kohya {n}".encode(), ".safetensors")
    model_id, dropped = await save_model(store, user, None, lora, "sd15", {"kohya_path": kohya})
    return model_id, dropped, [lora, kohya]


async def test_a_new_model_drops_those_older_than_the_previous_one_rows_and_files(store):
    first, dropped, first_files = await _train(store, ALICE, 1)
    second, _, _ = await _train(store, ALICE, 2)
    bobs, _, bob_files = await _train(store, BOB, 1)
    assert dropped == [] and [m.id for m in await models_db.list_models(store.db, ALICE)] == [first, second]
    generation = await generations_db.add_generation(store.db, ALICE, first, None, "p", "", [1], {}, [])

    third, dropped, _ = await _train(store, ALICE, 3)

    assert dropped == [first]
    models = await models_db.list_models(store.db, ALICE)
    assert [(m.id, m.active) for m in models] == [(second, False), (third, True)]
    assert not any((store.data_dir / path).exists() for path in first_files)
    assert sorted(p.name for p in (store.data_dir / "users/101/models").iterdir()) == sorted(
        path.rsplit("/", 1)[1] for m in models for path in (m.lora_path, m.metadata["kohya_path"]))
    # Pictures made with the dropped model keep their row; it no longer names the model.
    assert (await generations_db.get_generation(store.db, generation)).model_id is None
    # Nobody else's model is touched.
    assert [m.id for m in await models_db.list_models(store.db, BOB)] == [bobs]
    assert all((store.data_dir / path).exists() for path in bob_files)


async def test_a_model_a_waiting_picture_needs_is_kept_until_it_is_done(store):
    first, _, first_files = await _train(store, ALICE, 1)
    params = to_stored(GenerateParams(GenerateRequest("p"), first, f"model-{first}", "zq", "woman"))
    job = await jobs_db.create_job(store.db, "generate", ALICE, params)
    await _train(store, ALICE, 2)
    _, dropped, _ = await _train(store, ALICE, 3)
    assert dropped == [] and len(await models_db.list_models(store.db, ALICE)) == 3
    await jobs_db.finish_job(store.db, job, "succeeded")
    assert await drop_old_models(store) == [first]  # the periodic pass catches up
    assert not any((store.data_dir / path).exists() for path in first_files)
    assert len(await models_db.list_models(store.db, ALICE)) == 2


async def test_pictures_older_than_the_retention_lose_their_files_and_keep_their_rows(store):
    now = 1_000_000_000.0
    old = [store.files.write(ALICE, "generations", b"old", ".png") for _ in range(2)]
    new = [store.files.write(ALICE, "generations", b"new", ".png")]
    old_id = await generations_db.add_generation(store.db, ALICE, None, None, "p", "", [1, 2], {}, old,
                                                 channel_id=5, message_id=6)
    new_id = await generations_db.add_generation(store.db, ALICE, None, None, "p", "", [3], {}, new)
    await store.db.execute("UPDATE generations SET created_at = ? WHERE id = ?", (now - 31 * DAY_S, old_id))
    await store.db.execute("UPDATE generations SET created_at = ? WHERE id = ?", (now - 29 * DAY_S, new_id))

    assert await expire_pictures(store, 0, now) == (0, 0)  # 0 keeps them for ever
    assert await expire_pictures(store, 30, now) == (1, 2)

    expired = await generations_db.get_generation(store.db, old_id)
    assert expired.paths == [] and expired.message_id == 6  # /forget can still delete its message
    assert not any((store.data_dir / path).exists() for path in old)
    assert (await generations_db.get_generation(store.db, new_id)).paths == new
    assert (store.data_dir / new[0]).read_bytes() == b"new"
    assert await expire_pictures(store, 30, now) == (0, 0)
    assert await expire_pictures(store, 30, now + 2 * DAY_S) == (1, 1)  # the clock moves on
