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
