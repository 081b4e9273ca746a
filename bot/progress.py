"""Progress messages: what a person sees while their job runs, and how often it is edited.

Discord allows only a few edits per message per few seconds, and an interaction token dies after
15 minutes, so progress goes into one ordinary DM message edited with the bot token, at most once
every `interval` seconds, always keeping the latest state (the last edit is never dropped).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

STAGE_LABELS = {
    "queued": "Waiting in the queue",
    "loading_model": "Loading the model",
    "preparing": "Preparing your photos",
    "class_images": "Making reference images",
    "caching": "Reading your photos",
    "training": "Training your model",
    "saving": "Saving your model",
    "generating": "Drawing",
    "refining_face": "Refining the face",
    "upscaling": "Upscaling",
}


def progress_bar(fraction: float, width: int = 20) -> str:
    """A text bar like `[#######-------------]  35%`."""
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {fraction * 100:3.0f}%"


def format_duration(seconds: float | None) -> str:
    """`1 h 05 min`, `4 min 10 s`, `12 s`, `under a second`; `unknown` when there is no estimate."""
    if seconds is None or seconds < 0:
        return "unknown"
    if seconds < 0.5:
        return "under a second"
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


NO_WORKER_ONLINE = "No GPU worker is online right now; your job starts as soon as one is."


def render_progress(title: str, progress: dict[str, Any], queue_position: int | None = None, *,
                    no_worker: bool = False) -> str:
    """The text of a progress message from a job's stored progress; `no_worker` adds, to a queued
    job's, that no worker is online to take it."""
    stage = progress.get("stage", "queued")
    label = STAGE_LABELS.get(stage, stage)
    detail = progress.get("detail")
    lines = [f"**{title}**", f"Stage: {label} ({detail})" if detail else f"Stage: {label}"]
    if queue_position:
        lines.append(f"Position in the queue: {queue_position}")
        if no_worker:
            lines.append(NO_WORKER_ONLINE)
    total = progress.get("total")
    if total:
        step = progress.get("step", 0)
        lines.append(f"`{progress_bar(step / total)}`  step {step}/{total}")
        eta = progress.get("eta_s")
        if eta is not None and step < total:  # no estimate yet, or nothing left: no line
            lines.append(f"Time left: about {format_duration(eta)}")
    return "\n".join(lines)


class ThrottledEditor:
    """Coalesces updates to one message: at most one edit per `interval`, the latest one wins."""

    def __init__(self, edit: Callable[[str, bytes | None], Awaitable[None]], interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._edit = edit
        self._interval = interval
        self._clock = clock
        self._last_edit = -float("inf")
        self._pending: tuple[str, bytes | None] | None = None
        self._last_sent: tuple[str, bytes | None] | None = None
        self._task: asyncio.Task[None] | None = None

    def update(self, text: str, image: bytes | None = None) -> None:
        """Record the newest state; it is sent now or as soon as the interval allows.

        An image waiting to be sent is kept when a newer text without one replaces it.
        """
        if image is None and self._pending is not None:
            image = self._pending[1]
        self._pending = (text, image)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        while self._pending is not None:
            wait = self._last_edit + self._interval - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
            state, self._pending = self._pending, None
            if state is None or state == self._last_sent:
                continue
            try:
                await self._edit(*state)
                self._last_sent = state
            except Exception:  # a failed edit must not stop later ones; the next update retries
                log.warning("progress edit failed", exc_info=True)
            finally:  # counted from when the edit landed: one that waited out rate limits took time
                self._last_edit = self._clock()

    async def flush(self) -> None:
        """Wait until the newest state has been sent (used before a job's final message)."""
        if self._task is not None:
            await self._task
