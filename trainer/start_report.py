"""The time each part of a worker's start took, as data (`Worker.prepare` returns it and tells a
listener each part as it ends): the log's lines round their seconds for people, so whoever needs
the figures (bench.worker_start, the tests) takes them from here, never from the log.

Parts are named: `MODEL` (loading the base model), `ARTIFACTS` (unpacking compiled code a worker kept
or published, trainer.compile_artifacts: the worker serves from its end), the generation
warm-up's parts (trainer.engine: `any-shape`, `during-training`, `square-N`) and the training step
(trainer.start_helpers.TRAINING), each as the worker switches to its compiled code (the seconds:
reading it back, or compiling it where no start helper did), and `helper_compiled(part)` (a start
helper finished compiling `part`; the seconds: since the helpers started).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

MODEL = "model"
ARTIFACTS = "compiled code loaded"


def helper_compiled(part: str) -> str:
    """The name of a start helper's compiling of `part`."""
    return f"compiled by a start helper: {part}"


@dataclass(frozen=True)
class PartTime:
    """One part of a start, its seconds and when it ended (seconds since the start), unrounded."""

    part: str
    seconds: float
    at: float = 0.0


class StartReport:
    """The parts of one start in the order they ended; `listener` hears each one as it ends, so a
    start that is interrupted has still told what it finished."""

    def __init__(self, listener: Callable[[PartTime], None] = lambda timed: None) -> None:
        self.parts: list[PartTime] = []
        self._listener = listener
        self._began = time.monotonic()
        self._lock = threading.Lock()  # parts end on the worker's thread and on the background compile's

    def add(self, part: str, seconds: float) -> None:
        with self._lock:
            timed = PartTime(part, seconds, time.monotonic() - self._began)
            self.parts.append(timed)
        self._listener(timed)

    @contextlib.contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Add `part` with the block's seconds (time.monotonic, the engine's clock), if it ends
        without an exception."""
        started = time.monotonic()
        yield
        self.add(part, time.monotonic() - started)

    def names(self) -> list[str]:
        return [timed.part for timed in self.parts]
