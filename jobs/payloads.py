"""What travels between the bot and a worker: self-contained job payloads and their results.

A payload carries every byte the work needs (photos, the user's LoRA, a checkpoint to resume
from), so a worker needs no shared disk and no database; results come back as bytes too. This
keeps the same payloads valid for a local child process and for workers on other machines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

JobKind = Literal["train", "generate"]


@dataclass
class WorkItem:
    """One job for a worker: `params` are the stored job parameters, `blobs` the bytes it needs."""

    job_id: int
    kind: JobKind
    params: dict[str, Any]
    blobs: dict[str, Any] = field(default_factory=dict)


# Keys of `blobs`:
#   train:    "photos": list[bytes] (normalised PNGs), "checkpoint": bytes | None
#   generate: "lora": bytes | None (absent when the worker already holds `params["adapter_key"]`),
#             "init_image": bytes | None (for variations)
# Keys of a `done` event's result:
#   train:    "lora": bytes, "kohya": bytes | None, "metadata": dict, "samples": list[{"png", "seed"}],
#             "steps": int, "final_loss": float
#   generate: "images": list[{"png": bytes, "seed": int}]
