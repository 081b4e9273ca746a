"""The start-up sweep: files in the data folder that no row points to, which a crash left behind.

Every write puts its file in place before the row that names it, and every delete removes the row
before the file, so a crash (or a power cut) can leave files without rows, never rows without files.
At start nothing is being written, so anything under ``users/`` that no row names is such a file,
and so is every temporary ``.tmp-*.part`` file of an atomic write (common.atomic) there or beside
the database. Files that rows name are never touched. ``shared/`` (caches that workers fill) and
``work/`` (their scratch folders, cleared by each worker) are left to their owners.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from common.atomic import TMP_PREFIX, TMP_SUFFIX
from storage.db import from_json
from storage.jobs_db import TERMINAL_STATES
from storage.store import Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepReport:
    orphans: int  # files no row pointed to
    temporary: int  # `.tmp-*.part` files of writes a crash interrupted
    bytes: int


async def referenced_paths(storage: Storage) -> set[str]:
    """Every file a row points to, relative to the data folder."""
    db = storage.db
    paths = {row["path"] for row in await db.fetchall("SELECT path FROM photos")}
    for row in await db.fetchall("SELECT lora_path, metadata FROM models"):
        paths.add(row["lora_path"])
        kohya = from_json(row["metadata"]).get("kohya_path")
        if kohya:
            paths.add(kohya)
    for row in await db.fetchall("SELECT paths FROM generations"):
        paths.update(from_json(row["paths"]))
    rows = await db.fetchall("SELECT checkpoint_path FROM jobs WHERE checkpoint_path IS NOT NULL")
    paths.update(row["checkpoint_path"] for row in rows)
    return paths


async def sweep_data_dir(storage: Storage) -> SweepReport:
    """Remove what crashes left in the data folder (call at start, before jobs or intake run)."""
    # A finished job's checkpoint is never used again and its file is deleted when it ends; a crash
    # right then can leave the file, and the row always keeps the name. Neither is wanted.
    await storage.db.execute(
        "UPDATE jobs SET checkpoint_path = NULL WHERE checkpoint_path IS NOT NULL "
        f"AND state IN ({', '.join(repr(s) for s in TERMINAL_STATES)})")
    keep = await referenced_paths(storage)
    report = await asyncio.to_thread(_sweep, storage.data_dir, keep)
    if report.orphans or report.temporary:
        log.info("start-up sweep removed %d file(s) no row pointed to and %d unfinished temporary file(s), "
                 "%d bytes in all", report.orphans, report.temporary, report.bytes)
    return report


def _is_temporary(name: str) -> bool:
    return name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX)


def _remove(path: Path) -> int:
    """Remove one file (or link); return its size, 0 if it was already gone."""
    try:
        size = path.lstat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


def _sweep(root: Path, keep: set[str]) -> SweepReport:
    orphans = temporary = size = 0
    for entry in root.iterdir():
        if entry.is_file() and _is_temporary(entry.name):
            temporary, size = temporary + 1, size + _remove(entry)
    users = root / "users"
    # Bottom-up, links not followed: a folder emptied here is removed after its files.
    for folder, dirs, names in os.walk(users, topdown=False):
        here = Path(folder)
        for name in names:
            path = here / name
            if _is_temporary(name):
                temporary, size = temporary + 1, size + _remove(path)
            elif path.relative_to(root).as_posix() not in keep:
                orphans, size = orphans + 1, size + _remove(path)
        for name in dirs:
            if (here / name).is_symlink():
                orphans, size = orphans + 1, size + _remove(here / name)
        if here != users and not any(here.iterdir()):
            here.rmdir()
    return SweepReport(orphans, temporary, size)
