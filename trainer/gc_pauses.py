"""Python's garbage collector in a GPU worker: long-lived objects frozen, long collections logged.

A worker that compiled its generation code holds a million or more Python objects that live as long
as the process: the models' modules and parameters, dynamo's guards, inductor's graphs and kernels.
A full collection walks all of them, and CPython runs one whenever enough new objects have survived
since the last, for instance in the middle of a training. Everything on the worker's job thread
waits, including a picture served between training steps. `python -m bench.gc_pause` measures it:
after compiling even the tiny test model, a full collection took about half a second on a 2-core CPU.

`gc.freeze()` moves every object alive at that moment to a permanent generation that collections do
not visit. Done once the worker is warm, later collections only see what jobs create, which goes
away with the job. Frozen objects are still freed by reference counting; only reference cycles among
them would stay, and those are the model and its compiled code, kept for the process's life anyway.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

LONG_COLLECTION_S = 0.1  # a tenth of a picture's time: worth a line in the log


def freeze_long_lived() -> int:
    """Collect what is garbage now, then freeze the rest; returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("froze %d long-lived objects out of the garbage collector's walks", frozen)
    return frozen


class CollectionTimer:
    """A `gc.callbacks` entry that logs collections taking longer than `threshold_s`; `on_long`, when
    set, hears each one's seconds, unrounded (bench.worker_start records them)."""

    def __init__(self, threshold_s: float = LONG_COLLECTION_S,
                 on_long: Callable[[float], None] | None = None) -> None:
        self.threshold_s = threshold_s
        self.on_long = on_long
        self._started: float | None = None

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            took = time.perf_counter() - self._started
            self._started = None
            if took >= self.threshold_s:
                log.warning("garbage collection of generation %d paused this process for %.0f ms "
                            "(%d objects collected)", info["generation"], took * 1000, info["collected"])
                if self.on_long is not None:
                    self.on_long(took)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No collection inside the block: for the heavy imports of a worker's start. On Python 3.11 a
    collection in the middle of an import can run a finalizer that imports in turn, which breaks the
    import lock with a KeyError (CPython gh-91351, fixed in 3.12) and kills the worker as it starts."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def log_long_collections(threshold_s: float = LONG_COLLECTION_S) -> CollectionTimer:
    """Log every collection slower than `threshold_s` from now on (once per process)."""
    for callback in gc.callbacks:
        if isinstance(callback, CollectionTimer):
            return callback
    timer = CollectionTimer(threshold_s)
    gc.callbacks.append(timer)
    return timer
