"""Forgetting a person: every row and every file of theirs, in one call that survives a crash."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storage.store import Storage

log = logging.getLogger(__name__)

# Children before parents, so the counts are of rows really deleted here, not by cascades.
_TABLES = (
    ("generations", "owner"),
    ("models", "owner"),
    ("jobs", "owner"),
    ("photos", "owner"),
    ("consents", "user_id"),
    ("user_settings", "user_id"),
    ("users", "id"),
)


async def posted_messages(storage: Storage, user_id: int) -> list[tuple[int, int]]:
    """(channel id, message id) of the Discord messages the bot posted with the person's pictures:
    their jobs' messages (progress with previews, then the finished training's sample pictures)
    and their /imagine answers. Read before `forget_user`, which deletes the rows that hold them."""
    rows = await storage.db.fetchall(
        "SELECT channel_id, message_id FROM jobs WHERE owner = ? AND message_id IS NOT NULL "
        "UNION SELECT result_channel_id, result_message_id FROM jobs WHERE owner = ? AND result_message_id IS NOT NULL "
        "UNION SELECT channel_id, message_id FROM generations WHERE owner = ? AND message_id IS NOT NULL",
        (user_id, user_id, user_id))
    return [(row["channel_id"], row["message_id"]) for row in rows if row["channel_id"]]


async def forget_user(storage: Storage, user_id: int) -> dict[str, int]:
    """Delete the person's files and their rows in every table; return what was removed.

    Crash-safe in three steps: the person is marked forgotten (a committed tombstone, after which
    the database refuses anything new of theirs), their folder is removed, then their rows and the
    tombstone go in one transaction. A crash anywhere leaves the tombstone, and the next
    `Storage.open` finishes the job (`finish_interrupted_forgets`). Last, the write-ahead log is
    emptied into the database file, where secure_delete has zeroed the deleted rows.
    Running jobs should be stopped first; a late result for a forgotten person is refused.
    """
    await storage.db.execute(
        "INSERT INTO forgotten (user_id, started_at) VALUES (?, ?) ON CONFLICT (user_id) DO NOTHING",
        (user_id, time.time()))
    summary = await _remove_files_then_rows(storage, user_id)
    await storage.db.truncate_wal()
    log.info("forgot a user: %s", summary)
    return summary


async def _remove_files_then_rows(storage: Storage, user_id: int) -> dict[str, int]:
    files, size = await asyncio.to_thread(storage.files.delete_user_files, user_id)
    summary: dict[str, int] = {}
    async with storage.db.transaction() as tx:
        for table, column in _TABLES:
            summary[table] = await tx.execute(f"DELETE FROM {table} WHERE {column} = ?", (user_id,))
        await tx.execute("DELETE FROM forgotten WHERE user_id = ?", (user_id,))
    # A worker's event handled meanwhile (a checkpoint of a job being cancelled) may have written a
    # file after the folder went; with the rows gone, nothing writes there for them any more.
    late_files, late_size = await asyncio.to_thread(storage.files.delete_user_files, user_id)
    summary["files"], summary["bytes"] = files + late_files, size + late_size
    return summary


async def finish_interrupted_forgets(storage: Storage) -> int:
    """Complete every /forget a crash interrupted (at start, before anything else runs); return how many."""
    rows = await storage.db.fetchall("SELECT user_id FROM forgotten ORDER BY started_at")
    for row in rows:
        summary = await _remove_files_then_rows(storage, row["user_id"])
        log.info("finished forgetting a user after a crash: %s", summary)
    if rows:
        await storage.db.truncate_wal()
    return len(rows)
