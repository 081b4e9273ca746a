"""Events the trainer reports while it works.

Events are plain dicts of JSON-friendly values (bytes allowed for images) so that they cross a
process pipe or a distributed task queue unchanged. Helper constructors keep the keys in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Event = dict[str, Any]
EventSink = Callable[[Event], None]

# Stages a person sees, in the order a training goes through them.
STAGES = (
    "loading_model",
    "preparing",
    "class_images",
    "caching",
    "training",
    "saving",
    "generating",
)


def stage(name: str, detail: str = "") -> Event:
    """A new phase of work started."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}")
    return {"type": "stage", "stage": name, "detail": detail}


def progress(step: int, total: int, *, loss: float | None = None, eta_s: float | None = None,
             stage_name: str = "training") -> Event:
    """Step `step` of `total` is done; `eta_s` is the estimated seconds left."""
    return {"type": "progress", "stage": stage_name, "step": step, "total": total,
            "loss": loss, "eta_s": eta_s}


def preview(step: int, png: bytes) -> Event:
    """A small preview image (PNG bytes) made at `step`."""
    return {"type": "preview", "step": step, "png": png}


def checkpoint(step: int, path: str) -> Event:
    """A resumable checkpoint was written at `path` after `step` steps."""
    return {"type": "checkpoint", "step": step, "path": path}


def done(result: dict[str, Any]) -> Event:
    """The work finished; `result` holds file paths or bytes, depending on the caller."""
    return {"type": "done", "result": result}


def error(message: str, code: str = "error") -> Event:
    """The work failed; `message` is written for the person who asked for it."""
    return {"type": "error", "code": code, "message": message}


def ignore(_event: Event) -> None:
    """An event sink that drops everything (for callers that do not watch progress)."""
