"""Forgetting a person: every row and every file of theirs, in one call."""

from __future__ import annotations

import asyncio
import logging
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
    """Delete the person's rows in every table, then their whole folder; return what was removed.

    Rows go in one transaction, so the database never holds half a person. Files go after: a
    crash in between leaves only files no row points to, and calling this again removes them.
    Running jobs should be stopped first; a late result for a forgotten person is refused by
    the foreign keys.
    """
    summary: dict[str, int] = {}
    async with storage.db.transaction() as tx:
        for table, column in _TABLES:
            summary[table] = await tx.execute(f"DELETE FROM {table} WHERE {column} = ?", (user_id,))
    summary["files"], summary["bytes"] = await asyncio.to_thread(storage.files.delete_user_files, user_id)
    log.info("forgot a user: %s", summary)
    return summary
