"""The SQLite connection: pragmas, migrations, and transactions that coroutines cannot interleave.

One aiosqlite connection is shared by every coroutine of the bot. SQLite ties a transaction to the
connection, not to the coroutine, so a statement from one coroutine issued while another has a
transaction open would silently join (or be rolled back with) that transaction. Every statement
therefore goes through an ``asyncio.Lock``; single statements run in autocommit mode and groups
of statements run inside ``transaction()``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from storage import schema
from storage.backup import backup_database, existing_backups, remove_backups

log = logging.getLogger(__name__)

Params = Sequence[Any] | dict[str, Any]


def to_json(value: Any) -> str:
    """Encode a JSON column; compact, because these rows are read far more often than by eye."""
    return json.dumps(value, separators=(",", ":"))


def from_json(text: str | None) -> Any:
    """Decode a JSON column; NULL stays None."""
    return None if text is None else json.loads(text)


class Tx:
    """Statements inside one open transaction (the lock is already held)."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run a statement and return the number of rows it changed."""
        async with self.conn.execute(sql, params) as cur:
            return cur.rowcount

    async def insert(self, sql: str, params: Params = ()) -> int:
        """Run an INSERT and return the new row id."""
        async with self.conn.execute(sql, params) as cur:
            return int(cur.lastrowid or 0)

    async def fetchall(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        """Run a query (or a statement with RETURNING) and return every row."""
        return list(await self.conn.execute_fetchall(sql, params))

    async def fetchone(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        """Run a query and return its first row, if any."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None


class Database:
    """An open database file with WAL, foreign keys and the latest schema."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self.path = path
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path, *, busy_timeout_s: float = 10.0) -> Database:
        """Open (creating if needed) and migrate the database at ``path``.

        WAL lets readers carry on while one writer commits. ``synchronous=FULL`` syncs the log at
        every commit: a job or photo row the bot has acknowledged survives a power cut.
        ``secure_delete`` zeroes what a deleted row leaves in the file, so a forgotten person's
        handle and prompts do not linger in free pages. An existing database is copied before it is
        migrated (storage.backup); the copy from an earlier start goes once this one has succeeded.
        """
        conn = await aiosqlite.connect(path, isolation_level=None, timeout=busy_timeout_s)
        try:
            conn.row_factory = aiosqlite.Row
            async with conn.execute("PRAGMA journal_mode = WAL") as cur:
                row = await cur.fetchone()
            mode = str(row[0]) if row is not None else "no answer"
            if mode.lower() != "wal":
                log.warning("SQLite refused WAL mode for %s (got %s)", path, mode)
            await conn.execute("PRAGMA foreign_keys = ON")
            await conn.execute("PRAGMA synchronous = FULL")
            await conn.execute("PRAGMA secure_delete = ON")
            earlier = existing_backups(path)
            version = await schema.schema_version(conn)
            migrating = 0 < version < schema.LATEST_VERSION
            backup = await backup_database(conn, path, version + 1) if migrating else None
            try:
                await schema.migrate(conn)
            except Exception:
                if backup is not None:
                    log.error("migrating the database failed; its copy from before is %s", backup)
                raise
            remove_backups([old for old in earlier if old != backup])
        except BaseException:
            await conn.close()
            raise
        return cls(conn, path)

    async def close(self) -> None:
        """Close the connection after any statement in progress has finished."""
        async with self._lock:
            await self._conn.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """Run several statements atomically: all commit, or none do if the block raises.

        ``BEGIN IMMEDIATE`` takes the write lock up front, so another process cannot commit
        between our reads and our writes.
        """
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(self._conn)
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement on its own; return the number of rows it changed."""
        async with self._lock:
            return await Tx(self._conn).execute(sql, params)

    async def insert(self, sql: str, params: Params = ()) -> int:
        """Run one INSERT on its own; return the new row id."""
        async with self._lock:
            return await Tx(self._conn).insert(sql, params)

    async def fetchall(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        """Run one query (or statement with RETURNING) on its own; return every row."""
        async with self._lock:
            return await Tx(self._conn).fetchall(sql, params)

    async def fetchone(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        """Run one query on its own; return its first row, if any."""
        async with self._lock:
            return await Tx(self._conn).fetchone(sql, params)

    async def truncate_wal(self) -> bool:
        """Copy the write-ahead log into the database file and empty it, so that rows just deleted
        are gone from the disk too (with secure_delete); False if a reader kept it from finishing."""
        row = await self.fetchone("PRAGMA wal_checkpoint(TRUNCATE)")
        done = row is not None and row[0] == 0
        if not done:
            log.warning("the database's write-ahead log could not be emptied (a reader held it)")
        return done

    async def pragma(self, name: str) -> Any:
        """Read a pragma's value (used by health checks and tests)."""
        row = await self.fetchone(f"PRAGMA {name}")
        return row[0] if row else None


def placeholders(values: Iterable[Any]) -> str:
    """``?, ?, ?`` for an ``IN (...)`` list."""
    return ", ".join("?" for _ in values)
