"""Functions the intake pool's tests run in its child processes (a child imports them by name)."""

from __future__ import annotations

import multiprocessing
import os
import resource
import time
from pathlib import Path


def hold(gate: str, started: str | None = None) -> int:
    """Say which process took the task (in `started`), then wait for the file `gate`; returns the pid."""
    if started:
        Path(started).write_text(str(os.getpid()))
    while not os.path.exists(gate):
        time.sleep(0.01)
    return os.getpid()


def spin() -> None:
    """Use CPU until the process is stopped."""
    while True:
        pass


def allocate(size: int) -> int:
    """Allocate and touch `size` bytes; returns how many were touched."""
    block = bytearray(size)
    block[:: 4096] = b"\x01" * len(range(0, size, 4096))
    return sum(block[:: 4096])


def fail() -> None:
    raise ValueError("a bug in an intake task")


def report() -> dict[str, object]:
    """The caps and settings the child runs under."""
    import cv2

    return {
        "name": multiprocessing.current_process().name,
        "pid": os.getpid(),
        "address_space": resource.getrlimit(resource.RLIMIT_AS)[0],
        "cpu_soft": resource.getrlimit(resource.RLIMIT_CPU)[0],
        "cpu_used": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
        "core": resource.getrlimit(resource.RLIMIT_CORE)[0],
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "cv2_threads": cv2.getNumThreads(),
    }
