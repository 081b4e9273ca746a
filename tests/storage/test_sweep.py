"""The start-up sweep removes what crashes left in the data folder and nothing that a row names."""

from __future__ import annotations

from storage import generations_db, jobs_db, models_db, photos_db, users_db
from storage.store import Storage
from storage.sweep import sweep_data_dir

ALICE, BOB = 101, 202


def _files(store: Storage) -> set[str]:
    return {p.relative_to(store.data_dir).as_posix() for p in store.data_dir.rglob("*") if p.is_file()}


async def _current_files(store: Storage, user: int) -> set[str]:
    """One file of every kind a row can name, for `user`."""
    await users_db.ensure_user(store.db, user)
    photo = store.files.write(user, "photos", b"photo", ".png")
    await photos_db.add_photo(store.db, user, sha256=f"{user:064x}", phash=1, path=photo, byte_size=5,
                              width=1, height=1)
    lora = store.files.write(user, "models", b"lora", ".safetensors")
    kohya = store.files.write(user, "models", b"kohya", ".safetensors")
    model = await models_db.add_model(store.db, user, None, lora, "sd15", {"kohya_path": kohya})
    pictures = [store.files.write(user, "generations", b"png", ".png") for _ in range(2)]
    await generations_db.add_generation(store.db, user, model, None, "p", "", [1, 2], {}, pictures)
    job = await jobs_db.create_job(store.db, "train", user, {})
    checkpoint = store.files.write(user, "checkpoints", b"ckpt", ".zip")
    await jobs_db.set_checkpoint(store.db, job, checkpoint)
    return {photo, lora, kohya, *pictures, checkpoint}


async def test_files_no_row_names_and_temporary_files_go_and_current_files_stay(store):
    kept = await _current_files(store, ALICE) | await _current_files(store, BOB)
    store.files.write(ALICE, "photos", b"no row", ".png")  # a crash before its row was added
    store.files.write(BOB, "models", b"dropped", ".safetensors")  # a crash after its row went
    store.files.write(999, "generations", b"forgotten", ".png")  # someone with no row at all
    temporary = [store.data_dir / "users/101/photos/.tmp-abc.part", store.data_dir / "users/202/.tmp-x.part",
                 store.data_dir / ".tmp-avatar.db.before-v5.bak.part"]
    for path in temporary:
        path.write_bytes(b"half")
    unrelated = store.data_dir / "shared/class_images/woman/0.png"
    unrelated.parent.mkdir(parents=True)
    unrelated.write_bytes(b"cache")
    database = {p for p in _files(store) if p.startswith("avatar.db")}

    report = await sweep_data_dir(store)

    assert (report.orphans, report.temporary) == (3, 3)
    assert report.bytes == len(b"no row" + b"dropped" + b"forgotten") + 3 * len(b"half")
    assert _files(store) == kept | database | {"shared/class_images/woman/0.png"}
    assert not (store.data_dir / "users/999").exists()  # emptied folders go too
    assert (await sweep_data_dir(store)).orphans == 0  # and a second start finds nothing


async def test_a_finished_jobs_checkpoint_is_swept_and_its_row_no_longer_names_it(store):
    """A crash between a job's end and its checkpoint's deletion; rows never name missing files after."""
    await users_db.ensure_user(store.db, ALICE)
    job = await jobs_db.create_job(store.db, "train", ALICE, {})
    checkpoint = store.files.write(ALICE, "checkpoints", b"ckpt", ".zip")
    await jobs_db.set_checkpoint(store.db, job, checkpoint)
    await jobs_db.finish_job(store.db, job, "failed", error="x")
    report = await sweep_data_dir(store)
    assert report.orphans == 1 and not (store.data_dir / checkpoint).exists()
    assert (await jobs_db.get_job(store.db, job)).checkpoint_path is None


async def test_the_sweep_logs_its_counts_and_nothing_personal(store, caplog):
    await users_db.ensure_user(store.db, ALICE)
    store.files.write(ALICE, "photos", b"no row", ".png")
    caplog.set_level("INFO", logger="storage.sweep")
    await sweep_data_dir(store)
    assert "removed 1 file(s) no row pointed to and 0 unfinished temporary file(s)" in caplog.text
    assert str(ALICE) not in caplog.text
