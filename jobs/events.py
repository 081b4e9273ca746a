"""Events a worker reports while it works, and those the runners add, as typed records.

Each event is a small frozen dataclass whose `type` names it on the wire (`jobs.wire`); pictures
and files travel as bytes, so an event crosses a process pipe or a distributed queue unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import Field

from jobs.payloads import GenerateOutput, TrainOutput

# Stages a person sees, in the order a training goes through them; then a picture's and an upscale's.
STAGES = (
    "loading_model",
    "preparing",
    "class_images",
    "caching",
    "training",
    "saving",
    "generating",
    "refining_face",
    "upscaling",
)


@dataclass(frozen=True)
class Stage:
    """A new phase of work started."""

    stage: str
    detail: str = ""
    type: Literal["stage"] = "stage"

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}")


@dataclass(frozen=True)
class Progress:
    """Step `step` of `total` is done; `eta_s` is the estimated seconds left."""

    step: int
    total: int
    loss: float | None = None
    eta_s: float | None = None
    stage: str = "training"
    type: Literal["progress"] = "progress"


@dataclass(frozen=True)
class Preview:
    """A small preview picture (PNG bytes) made at `step`, with the image checker's verdict (as `Picture`'s)."""

    step: int
    png: bytes = field(repr=False)
    flagged: bool | None = None
    type: Literal["preview"] = "preview"


@dataclass(frozen=True)
class Checkpoint:
    """A resumable checkpoint after `step` steps, as the bytes the bot keeps (a zip of its files)."""

    step: int
    data: bytes = field(repr=False)
    type: Literal["checkpoint"] = "checkpoint"


@dataclass(frozen=True)
class Done:
    """The work finished with `result`."""

    result: TrainOutput | GenerateOutput = field(repr=False)
    type: Literal["done"] = "done"


@dataclass(frozen=True)
class Error:
    """The work failed; `message` is written for the person who asked for it, `code` for programs."""

    message: str
    code: str = "error"
    type: Literal["error"] = "error"


@dataclass(frozen=True)
class AdapterLoaded:
    """The worker now holds the LoRA kept under `key`, so later jobs need not send its file."""

    key: str
    type: Literal["adapter_loaded"] = "adapter_loaded"


@dataclass(frozen=True)
class Claimed:
    """A Celery worker took the job: the bot now knows whose death would lose it."""

    type: Literal["claimed"] = "claimed"


@dataclass(frozen=True)
class WorkerLost:
    """Reported by a runner: the worker running the job died."""

    message: str
    type: Literal["worker_lost"] = "worker_lost"


@dataclass(frozen=True)
class WorkerStopped:
    """Reported by a worker that stopped the job for its own shutdown (SIGTERM, a scale-down): the job
    waits for a worker again, from its last checkpoint, and the stop is not counted as a failure."""

    type: Literal["worker_stopped"] = "worker_stopped"


@dataclass(frozen=True)
class Requeued:
    """Reported by the bot's scheduler to its observer: the job waits for a worker again, because the
    bot restarted, its worker died, or its worker was stopped."""

    why: Literal["bot_restarted", "worker_lost", "worker_stopped"] = "bot_restarted"
    type: Literal["requeued"] = "requeued"


Event = Annotated[Stage | Progress | Preview | Checkpoint | Done | Error | AdapterLoaded | Claimed | WorkerLost
                  | WorkerStopped | Requeued, Field(discriminator="type")]
EventSink = Callable[[Event], None]
# Events that end a job's attempt.
FINAL = (Done, Error, WorkerLost, WorkerStopped)


def ignore(_event: object) -> None:
    """An event sink that drops everything (for callers that do not watch progress)."""
