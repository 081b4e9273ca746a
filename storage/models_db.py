"""A person's trained models (LoRA files); the newest one is the active one used by /imagine."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from storage.db import Database, Tx, from_json, to_json


@dataclass(frozen=True)
class Model:
    id: int
    owner: int
    job_id: int | None
    lora_path: str
    base_model: str
    metadata: dict[str, Any]
    active: bool
    created_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Model:
        values = dict(row)
        values["metadata"] = from_json(values["metadata"])
        values["active"] = bool(values["active"])
        return cls(**values)


async def add_model(
    db: Database,
    owner: int,
    job_id: int | None,
    lora_path: str,
    base_model: str,
    metadata: dict[str, Any],
) -> int:
    """Record a trained LoRA (``metadata``: handle, class word, steps, rank, ...) as the person's
    active model, deactivating their others in the same transaction; return its id.
    (storage.retention.save_model also drops the models older than the previous one.)"""
    async with db.transaction() as tx:
        return await insert_active_model(tx, owner, job_id, lora_path, base_model, metadata)


async def insert_active_model(
    tx: Tx, owner: int, job_id: int | None, lora_path: str, base_model: str, metadata: dict[str, Any]
) -> int:
    """`add_model` inside a transaction the caller holds."""
    await tx.execute("UPDATE models SET active = 0 WHERE owner = ? AND active = 1", (owner,))
    return await tx.insert(
        "INSERT INTO models (owner, job_id, lora_path, base_model, metadata, active, created_at) "
        "VALUES (?, ?, ?, ?, ?, 1, ?)",
        (owner, job_id, lora_path, base_model, to_json(metadata), time.time()),
    )


async def get_model(db: Database, model_id: int) -> Model | None:
    row = await db.fetchone("SELECT * FROM models WHERE id = ?", (model_id,))
    return Model.from_row(row) if row else None


async def get_active_model(db: Database, owner: int) -> Model | None:
    row = await db.fetchone("SELECT * FROM models WHERE owner = ? AND active = 1", (owner,))
    return Model.from_row(row) if row else None


async def list_models(db: Database, owner: int) -> list[Model]:
    """The person's models, oldest first."""
    rows = await db.fetchall("SELECT * FROM models WHERE owner = ? ORDER BY id", (owner,))
    return [Model.from_row(row) for row in rows]
