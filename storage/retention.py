"""What is kept, and for how long: each person's current model and the one before it, and the pictures
made for them for PICTURE_RETENTION_DAYS.

Rows go first and files after: a crash in between leaves only files that no row names, which the
start-up sweep (storage.sweep) removes, never a row naming a file that is gone.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from storage import models_db
from storage.db import Tx, from_json
from storage.files import UnsafePathError
from storage.store import Storage

log = logging.getLogger(__name__)

KEPT_MODELS = 2  # the active model and the one before it (to go back to if the new one disappoints)
DAY_S = 86400.0

# Models of `owner` beyond the newest KEPT_MODELS, except the active one and any that a waiting or
# running /imagine was queued with (it would fail without its LoRA; the next pass drops the model).
_DROP_OLD_MODELS = f"""
    DELETE FROM models WHERE owner = :owner AND active = 0
    AND id NOT IN (SELECT id FROM models WHERE owner = :owner ORDER BY id DESC LIMIT {KEPT_MODELS})
    AND id NOT IN (SELECT json_extract(params, '$.model_id') FROM jobs
                   WHERE owner = :owner AND kind = 'generate' AND state IN ('queued', 'running')
                   AND json_extract(params, '$.model_id') IS NOT NULL)
    RETURNING id, owner, lora_path, metadata"""


@dataclass(frozen=True)
class DroppedModel:
    id: int
    owner: int
    paths: tuple[str, ...]  # its LoRA files (diffusers, and kohya's when there is one)


async def _drop_old_models(tx: Tx, owner: int) -> list[DroppedModel]:
    rows = await tx.fetchall(_DROP_OLD_MODELS, {"owner": owner})
    dropped = []
    for row in rows:
        kohya = from_json(row["metadata"]).get("kohya_path")
        dropped.append(DroppedModel(row["id"], row["owner"], (row["lora_path"], *([kohya] if kohya else []))))
    return dropped


async def save_model(
    storage: Storage, owner: int, job_id: int | None, lora_path: str, base_model: str, metadata: dict[str, Any]
) -> tuple[int, list[int]]:
    """Record a new trained model as the person's active one and drop their models older than the
    previous one (rows in the same transaction, then files); return the new id and the dropped ids."""
    async with storage.db.transaction() as tx:
        model_id = await models_db.insert_active_model(tx, owner, job_id, lora_path, base_model, metadata)
        dropped = await _drop_old_models(tx, owner)
    await _delete_files(storage, [(m.owner, path) for m in dropped for path in m.paths])
    return model_id, [m.id for m in dropped]


async def drop_old_models(storage: Storage) -> list[int]:
    """Everyone's models older than their previous one that are still kept (a crash between saving a
    model and dropping the old ones, or a model a waiting /imagine needed then); return their ids."""
    rows = await storage.db.fetchall(
        f"SELECT owner FROM models GROUP BY owner HAVING count(*) > {KEPT_MODELS}")
    dropped: list[DroppedModel] = []
    for row in rows:
        async with storage.db.transaction() as tx:
            dropped += await _drop_old_models(tx, row["owner"])
    await _delete_files(storage, [(m.owner, path) for m in dropped for path in m.paths])
    if dropped:
        log.info("dropped %d model(s) older than their owners' previous one", len(dropped))
    return [m.id for m in dropped]


async def expire_pictures(storage: Storage, retention_days: int, now: float) -> tuple[int, int]:
    """Delete the picture files of generations older than ``retention_days`` (0 keeps them forever);
    return (generations, files). The rows stay, with no paths: they hold the Discord messages that
    /forget deletes and the requests that Reroll repeats; "More like" needs the file and says so."""
    if retention_days <= 0:
        return 0, 0
    async with storage.db.transaction() as tx:  # RETURNING would give the new, empty paths
        rows = await tx.fetchall("SELECT id, owner, paths FROM generations WHERE created_at < ? AND paths != '[]'",
                                 (now - retention_days * DAY_S,))
        for row in rows:
            await tx.execute("UPDATE generations SET paths = '[]' WHERE id = ?", (row["id"],))
    files = [(row["owner"], path) for row in rows for path in from_json(row["paths"])]
    await _delete_files(storage, files)
    if rows:
        log.info("deleted %d picture(s) of %d generation(s) older than %d days", len(files), len(rows),
                 retention_days)
    return len(rows), len(files)


async def _delete_files(storage: Storage, files: list[tuple[int, str]]) -> None:
    def delete_all() -> None:
        for owner, path in files:
            try:
                storage.files.delete(path, owner)
            except UnsafePathError:
                log.warning("a row named a file outside its owner's folder; left it alone")

    if files:
        await asyncio.to_thread(delete_all)
