"""A copy of the database before its schema is migrated, so that a failed or faulty upgrade loses nothing.

The copy (``VACUUM INTO``: a consistent snapshot, also in WAL mode) is written beside the database
as ``<name>.before-v<N>.bak``, N being the first migration step about to run. It is kept until the
next start that opens the database without error, which removes it: the operator has one run of the
new code to notice a problem and put the copy back. A failed migration keeps every copy.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import aiosqlite

from common.atomic import TMP_PREFIX, TMP_SUFFIX, fsync_dir

log = logging.getLogger(__name__)


def backup_path(db_path: Path, next_version: int) -> Path:
    """Where the copy made before migrating ``db_path`` to ``next_version`` goes."""
    return db_path.with_name(f"{db_path.name}.before-v{next_version}.bak")


def existing_backups(db_path: Path) -> list[Path]:
    """The copies earlier starts made of ``db_path`` (before their migrations)."""
    return sorted(db_path.parent.glob(f"{db_path.name}.before-v*.bak"))


async def backup_database(conn: aiosqlite.Connection, db_path: Path, next_version: int) -> Path:
    """Copy the open database beside it, all at once (a crash leaves a `.tmp-*.part`, never half a
    copy under the final name); return the copy's path."""
    target = backup_path(db_path, next_version)
    tmp = target.with_name(f"{TMP_PREFIX}{target.name}{TMP_SUFFIX}")
    tmp.unlink(missing_ok=True)  # VACUUM INTO refuses to write over a file
    await conn.execute("VACUUM INTO ?", (str(tmp),))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    log.info("copied the database to %s before migrating it", target)
    return target


def remove_backups(paths: list[Path]) -> None:
    """Remove the copies of earlier starts: this one opened the database without error."""
    for path in paths:
        path.unlink(missing_ok=True)
        log.info("removed %s: the database was migrated and has opened without error since", path.name)
