"""Database opening, pragmas and schema migrations (fresh and from an old version)."""

from __future__ import annotations

import time

import aiosqlite
import pytest

from storage import jobs_db
from storage.db import Database
from storage.schema import LATEST_VERSION, SchemaTooNewError, migrate, schema_version
from storage.store import DB_NAME, Storage


async def _columns(db: Database, table: str) -> set[str]:
    return {row["name"] for row in await db.fetchall(f"PRAGMA table_info({table})")}


async def _indexes(db: Database) -> set[str]:
    return {row["name"] for row in await db.fetchall("SELECT name FROM sqlite_master WHERE type = 'index'")}


async def test_fresh_database_is_at_latest_schema_with_wal_and_foreign_keys(tmp_path):
    async with await Storage.open(tmp_path / "data") as store:
        assert LATEST_VERSION >= 2
        assert await store.db.pragma("user_version") == LATEST_VERSION
        assert (await store.db.pragma("journal_mode")).lower() == "wal"
        assert await store.db.pragma("foreign_keys") == 1
        assert {"worker_id", "lease_expires_at", "attempts", "checkpoint_path", "cancel_requested"} <= (
            await _columns(store.db, "jobs")
        )
        assert {"jobs_by_state", "generations_by_message", "models_one_active"} <= await _indexes(store.db)
    assert (tmp_path / "data" / DB_NAME).is_file()


async def test_reopening_keeps_version_and_rows(tmp_path):
    async with await Storage.open(tmp_path) as store:
        await store.db.execute("INSERT INTO users (id, created_at) VALUES (7, 0)")
    async with await Storage.open(tmp_path) as store:
        assert await store.db.pragma("user_version") == LATEST_VERSION
        assert (await store.db.fetchone("SELECT count(*) FROM users"))[0] == 1


async def test_version_1_database_is_upgraded_with_its_rows(tmp_path):
    path = tmp_path / DB_NAME
    conn = await aiosqlite.connect(path, isolation_level=None)
    assert await migrate(conn, target=1) == 1
    now = time.time()
    await conn.execute(
        "INSERT INTO users (id, handle, class_word, created_at) VALUES (1, 'zorbq', 'woman', ?)", (now,)
    )
    await conn.execute(
        "INSERT INTO jobs (kind, owner, params, created_at, updated_at) VALUES ('train', 1, '{\"steps\": 9}', ?, ?)",
        (now, now),
    )
    await conn.execute(
        "INSERT INTO jobs (kind, owner, state, created_at, updated_at) VALUES ('generate', 1, 'succeeded', ?, ?)",
        (now, now),
    )
    assert "attempts" not in {row[1] for row in await conn.execute_fetchall("PRAGMA table_info(jobs)")}
    await conn.close()

    async with await Storage.open(tmp_path) as store:
        assert await store.db.pragma("user_version") == LATEST_VERSION
        train = await jobs_db.get_job(store.db, 1)
        assert train is not None and train.params == {"steps": 9} and train.state == "queued"
        assert (train.attempts, train.cancel_requested, train.checkpoint_path) == (0, False, None)
        done = await jobs_db.get_job(store.db, 2)
        assert done is not None and done.state == "succeeded"
        # The upgraded queue works: the old queued job can be claimed with a lease.
        claimed = await jobs_db.claim_next_job(store.db, "w1", 60)
        assert claimed is not None and claimed.id == 1 and claimed.attempts == 1
        row = await store.db.fetchone("SELECT handle FROM users WHERE id = 1")
        assert row["handle"] == "zorbq"


async def test_migration_step_that_fails_leaves_the_previous_version(tmp_path, monkeypatch):
    from storage import schema

    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, ["CREATE TABLE users (id INTEGER)"]])
    monkeypatch.setattr(schema, "LATEST_VERSION", len(schema.MIGRATIONS))
    conn = await aiosqlite.connect(tmp_path / DB_NAME, isolation_level=None)
    with pytest.raises(aiosqlite.OperationalError):
        await migrate(conn, target=schema.LATEST_VERSION)
    assert await schema_version(conn) == LATEST_VERSION
    await conn.close()


async def test_database_from_a_newer_release_is_refused(tmp_path):
    conn = await aiosqlite.connect(tmp_path / DB_NAME, isolation_level=None)
    await conn.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    await conn.close()
    with pytest.raises(SchemaTooNewError, match="newer than this code"):
        await Storage.open(tmp_path)


async def test_transaction_rolls_back_everything_when_the_block_raises(tmp_path):
    async with await Storage.open(tmp_path) as store:
        with pytest.raises(RuntimeError):
            async with store.db.transaction() as tx:
                await tx.execute("INSERT INTO users (id, created_at) VALUES (1, 0)")
                raise RuntimeError("boom")
        assert (await store.db.fetchone("SELECT count(*) FROM users"))[0] == 0


async def test_foreign_keys_are_enforced(tmp_path):
    async with await Storage.open(tmp_path) as store:
        with pytest.raises(aiosqlite.IntegrityError):
            await jobs_db.create_job(store.db, "train", 12345, {})
