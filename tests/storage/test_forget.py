"""Forgetting a person removes every row and file of theirs and nothing of anyone else."""

from __future__ import annotations

import aiosqlite
import pytest

from storage import consents_db, generations_db, jobs_db, models_db, photos_db, user_settings_db, users_db
from storage.forget import forget_user, posted_messages
from storage.store import Storage

ALICE, BOB = 101, 202
TABLES = {"users": "id", "photos": "owner", "jobs": "owner", "models": "owner", "generations": "owner",
          "consents": "user_id", "user_settings": "user_id"}


async def _give_everything(store: Storage, user: int) -> None:
    await users_db.set_handle(store.db, user, f"zorbq{user}", "person")
    await consents_db.record_consent(store.db, user, "these are photos of me")
    await user_settings_db.set_defaults(store.db, user, style="anime", negative_prompt="blurry")
    photo = store.files.write(user, "photos", b"pixels", ".png")
    await photos_db.add_photo(
        store.db, user, sha256=f"{user:064x}", phash=1, path=photo, byte_size=6, width=1, height=1
    )
    job = await jobs_db.create_job(store.db, "train", user, {}, channel_id=user + 1, message_id=user + 2)
    await jobs_db.claim_next_job(store.db, "w", 60)
    await jobs_db.set_result_message(store.db, job, user + 1, user + 3)
    await jobs_db.set_checkpoint(store.db, job, store.files.write(user, "checkpoints", b"ckpt", ".zip"))
    lora = store.files.write(user, "models", b"lora", ".safetensors")
    model = await models_db.add_model(store.db, user, job, lora, "sd15", {"handle": f"zorbq{user}"})
    await jobs_db.finish_job(store.db, job, "succeeded", result={"model_id": model})
    gen_job = await jobs_db.create_job(store.db, "generate", user, {})
    image = store.files.write(user, "generations", b"img", ".png")
    generation = await generations_db.add_generation(store.db, user, model, gen_job, "p", "", [1], {}, [image])
    await generations_db.set_generation_message(store.db, generation, user + 4, user + 5)


async def _rows(store: Storage, user: int) -> dict[str, int]:
    counts = {}
    for table, column in TABLES.items():
        counts[table] = (
            await store.db.fetchone(f"SELECT count(*) FROM {table} WHERE {column} = ?", (user,))
        )[0]
    return counts


async def test_forget_user_leaves_nothing_of_them_and_everything_of_others(store):
    await _give_everything(store, ALICE)
    await _give_everything(store, BOB)
    bob_rows = await _rows(store, BOB)
    bob_usage = store.files.user_usage(BOB)

    summary = await forget_user(store, ALICE)

    assert summary == {
        "generations": 1,
        "models": 1,
        "jobs": 2,
        "photos": 1,
        "consents": 1,
        "user_settings": 1,
        "users": 1,
        "files": 4,
        "bytes": len(b"pixels" + b"ckpt" + b"lora" + b"img"),
    }
    assert await _rows(store, ALICE) == dict.fromkeys(TABLES, 0)
    assert not store.files.user_dir(ALICE).exists()
    assert await _rows(store, BOB) == bob_rows and all(bob_rows.values())
    assert store.files.user_usage(BOB) == bob_usage
    bob_photos = await photos_db.list_photos(store.db, BOB)
    assert store.files.read(bob_photos[0].path, BOB) == b"pixels"
    # The handle is free again, and forgetting twice is harmless.
    assert "zorbq101" not in await users_db.all_handles(store.db)
    assert (await forget_user(store, ALICE))["users"] == 0


async def test_a_late_result_for_a_forgotten_person_is_refused(store):
    await _give_everything(store, ALICE)
    await forget_user(store, ALICE)
    with pytest.raises(aiosqlite.IntegrityError, match="FOREIGN KEY"):
        await generations_db.add_generation(store.db, ALICE, None, None, "p", "", [1], {}, [])


async def test_a_photo_that_arrives_as_its_owner_is_forgotten_leaves_no_file(store):
    """The photo was checked before /forget and is stored after it: its row cannot be added any more
    (the person is gone), and the file written just before must not stay behind."""
    from bot.photo_intake import accept_photo
    from photos.intake import IntakeLimits
    from tests.photos_factory import selfie

    await users_db.ensure_user(store.db, ALICE)
    await forget_user(store, ALICE)
    with pytest.raises(aiosqlite.IntegrityError):
        await accept_photo(store, ALICE, selfie(1), "late.jpg", IntakeLimits(), max_photos=30)
    assert [p for p in (store.data_dir / "users").rglob("*") if p.is_file()] == []


async def test_the_messages_posted_with_a_persons_pictures_are_theirs_alone(store):
    """What /forget deletes on Discord: the training's progress and samples messages, the pictures."""
    await _give_everything(store, ALICE)
    await _give_everything(store, BOB)
    assert sorted(await posted_messages(store, ALICE)) == [(ALICE + 1, ALICE + 2), (ALICE + 1, ALICE + 3),
                                                           (ALICE + 4, ALICE + 5)]
    await forget_user(store, ALICE)
    assert await posted_messages(store, ALICE) == []
    assert len(await posted_messages(store, BOB)) == 3


async def test_the_person_is_marked_forgotten_before_any_file_goes(store, monkeypatch):
    """Files first, rows last, behind a committed tombstone: what the files' removal sees."""
    await _give_everything(store, ALICE)
    seen = {}
    real = store.files.delete_user_files

    def delete_user_files(user_id):
        import sqlite3

        # Another connection sees only what is committed.
        with sqlite3.connect(store.db.path) as other:
            seen.setdefault("tombstone", other.execute("SELECT user_id FROM forgotten").fetchall())
            seen.setdefault("photos", other.execute("SELECT count(*) FROM photos WHERE owner = ?",
                                                    (user_id,)).fetchone()[0])
        return real(user_id)

    monkeypatch.setattr(store.files, "delete_user_files", delete_user_files)
    await forget_user(store, ALICE)
    assert seen == {"tombstone": [(ALICE,)], "photos": 1}
    assert await store.db.fetchall("SELECT * FROM forgotten") == []


async def test_a_forget_a_crash_interrupted_is_finished_at_the_next_start(tmp_path):
    """The crash came after the tombstone and half the files: the next open removes the rest, and
    the rows, and leaves everyone else alone."""
    store = await Storage.open(tmp_path)
    await _give_everything(store, ALICE)
    await _give_everything(store, BOB)
    bob_rows, bob_usage = await _rows(store, BOB), store.files.user_usage(BOB)
    await store.db.execute("INSERT INTO forgotten (user_id, started_at) VALUES (?, 0)", (ALICE,))
    photo = (await photos_db.list_photos(store.db, ALICE))[0]
    store.files.delete(photo.path, ALICE)
    await store.close()

    store = await Storage.open(tmp_path)
    try:
        assert await _rows(store, ALICE) == dict.fromkeys(TABLES, 0)
        assert not store.files.user_dir(ALICE).exists()
        assert await store.db.fetchall("SELECT * FROM forgotten") == []
        assert await _rows(store, BOB) == bob_rows and store.files.user_usage(BOB) == bob_usage
    finally:
        await store.close()


async def test_nothing_new_of_a_person_being_forgotten_can_be_stored(store):
    await _give_everything(store, ALICE)
    await store.db.execute("INSERT INTO forgotten (user_id, started_at) VALUES (?, 0)", (ALICE,))
    with pytest.raises(aiosqlite.IntegrityError, match="being forgotten"):
        await photos_db.add_photo(store.db, ALICE, sha256="f" * 64, phash=2, path="users/101/photos/x.png",
                                  byte_size=1, width=1, height=1)
    with pytest.raises(aiosqlite.IntegrityError, match="being forgotten"):
        await jobs_db.create_job(store.db, "generate", ALICE, {})
    with pytest.raises(aiosqlite.IntegrityError, match="being forgotten"):
        await models_db.add_model(store.db, ALICE, None, "users/101/models/x.safetensors", "sd15", {})
    with pytest.raises(aiosqlite.IntegrityError, match="being forgotten"):
        await generations_db.add_generation(store.db, ALICE, None, None, "p", "", [1], {}, [])
    with pytest.raises(aiosqlite.IntegrityError, match="being forgotten"):
        await user_settings_db.set_defaults(store.db, ALICE, face_pass=False)
    await users_db.ensure_user(store.db, BOB)
    await jobs_db.create_job(store.db, "generate", BOB, {})  # others carry on


MARKER_HANDLE, MARKER_PROMPT = "zqmarkerhandle", "a marker prompt 8f3a1c under the sea"
MARKER_NEGATIVE = "a marker negative 5d2e9b of her own"


def _database_bytes(store: Storage) -> bytes:
    """Everything SQLite keeps on disk for this database: the file, its write-ahead log and index."""
    path = store.db.path
    return b"".join(p.read_bytes() for p in (path, path.with_name(path.name + "-wal"),
                                             path.with_name(path.name + "-shm")) if p.exists())


async def test_after_forget_the_database_files_hold_nothing_of_the_person(store):
    """No handle or prompt of theirs in the database file (secure_delete zeroes deleted rows) nor in
    the write-ahead log (emptied after the delete), even while the bot keeps running."""
    await users_db.set_handle(store.db, ALICE, MARKER_HANDLE, "person")
    await jobs_db.create_job(store.db, "generate", ALICE, {"request": {"prompt": MARKER_PROMPT}})
    await generations_db.add_generation(store.db, ALICE, None, None, MARKER_PROMPT, "", [1], {}, [])
    await user_settings_db.set_defaults(store.db, ALICE, negative_prompt=MARKER_NEGATIVE)
    await store.db.truncate_wal()  # the rows reach the database file itself, as they would in time
    await users_db.set_handle(store.db, BOB, "zqbobkept", "person")
    before = _database_bytes(store)
    assert all(marker.encode() in before for marker in (MARKER_HANDLE, MARKER_PROMPT, MARKER_NEGATIVE))

    await forget_user(store, ALICE)

    after = _database_bytes(store)
    assert all(marker.encode() not in after for marker in (MARKER_HANDLE, MARKER_PROMPT, MARKER_NEGATIVE))
    assert b"zqbobkept" in after
    assert await store.db.pragma("secure_delete") == 1


async def test_a_file_written_for_them_while_they_are_forgotten_goes_too(store, monkeypatch):
    """A checkpoint of their cancelled training, say, arriving between the folder's removal and the rows'."""
    await _give_everything(store, ALICE)
    real = store.files.delete_user_files
    calls = []

    def delete_user_files(user_id):
        removed = real(user_id)
        if not calls:
            store.files.write(user_id, "checkpoints", b"late", ".zip")
        calls.append(removed)
        return removed

    monkeypatch.setattr(store.files, "delete_user_files", delete_user_files)
    summary = await forget_user(store, ALICE)
    assert not store.files.user_dir(ALICE).exists()
    assert summary["files"] == 5
