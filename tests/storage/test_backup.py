"""A copy of the database before each migration, kept until the next start that succeeds."""

from __future__ import annotations

import sqlite3

import aiosqlite
import pytest

from storage import schema
from storage.schema import LATEST_VERSION, migrate
from storage.store import DB_NAME, Storage


async def _old_database(tmp_path, version: int = 1) -> None:
    conn = await aiosqlite.connect(tmp_path / DB_NAME, isolation_level=None)
    await migrate(conn, target=version)
    await conn.execute("INSERT INTO users (id, handle, class_word, created_at) VALUES (7, 'zqold', 'woman', 0)")
    await conn.close()


def _backups(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.glob(f"{DB_NAME}.before-v*.bak"))


async def test_an_old_database_is_copied_before_it_is_migrated_and_the_copy_goes_at_the_next_start(tmp_path):
    await _old_database(tmp_path, version=1)
    async with await Storage.open(tmp_path) as store:
        assert await store.db.pragma("user_version") == LATEST_VERSION
    assert _backups(tmp_path) == [f"{DB_NAME}.before-v2.bak"]
    with sqlite3.connect(tmp_path / f"{DB_NAME}.before-v2.bak") as copy:  # the database as it was
        assert copy.execute("PRAGMA user_version").fetchone() == (1,)
        assert copy.execute("SELECT handle FROM users").fetchall() == [("zqold",)]
    assert not list(tmp_path.glob(".tmp-*"))

    async with await Storage.open(tmp_path):
        pass
    assert _backups(tmp_path) == []


async def test_a_new_or_current_database_gets_no_copy(tmp_path):
    async with await Storage.open(tmp_path):
        pass
    async with await Storage.open(tmp_path):
        pass
    assert _backups(tmp_path) == []


async def test_a_failed_migration_keeps_the_copy_and_says_where_it_is(tmp_path, monkeypatch, caplog):
    await _old_database(tmp_path, version=LATEST_VERSION)
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, ["CREATE TABLE users (id INTEGER)"]])
    monkeypatch.setattr(schema, "LATEST_VERSION", len(schema.MIGRATIONS))
    with pytest.raises(aiosqlite.OperationalError):
        await Storage.open(tmp_path)
    backup = tmp_path / f"{DB_NAME}.before-v{LATEST_VERSION + 1}.bak"
    assert _backups(tmp_path) == [backup.name]
    assert f"migrating the database failed; its copy from before is {backup}" in caplog.text
    with pytest.raises(aiosqlite.OperationalError):  # a second try keeps it too
        await Storage.open(tmp_path)
    assert _backups(tmp_path) == [backup.name]
