"""The time each part of a worker's start took, as data (`Worker.prepare` returns it and tells a
listener each part as it ends): the log's lines round their seconds for people, so whoever needs
the figures (bench.worker_start, the tests) takes them from here, never from the log.

Parts are named: `MODEL` (loading the base model), the generation warm-up's parts (trainer.engine:
`any-shape`, `during-training`, `square-N`), `helper_wait(part)` (the worker waiting for the start
helper that compiled `part`, just before it) and the training step (trainer.start_helpers.TRAINING).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

MODEL = "model"


def helper_wait(part: str) -> str:
    """The name of the time the worker waited for the start helper compiling `part`."""
    return f"waiting for the start helper's {part}"


@dataclass(frozen=True)
class PartTime:
    """One part of a start and its seconds, unrounded."""

    part: str
    seconds: float


class StartReport:
    """The parts of one start in the order they ended; `listener` hears each one as it ends, so a
    start that is interrupted has still told what it finished."""

    def __init__(self, listener: Callable[[PartTime], None] = lambda timed: None) -> None:
        self.parts: list[PartTime] = []
        self._listener = listener

    def add(self, part: str, seconds: float) -> None:
        timed = PartTime(part, seconds)
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
