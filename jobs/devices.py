"""Which devices the local backend's workers run on, and how they share the host's CPUs.

Torch is asked in a throwaway child process, so the bot's own process never imports it.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import os
from typing import Any

log = logging.getLogger(__name__)

# The module that answers questions about devices; it imports torch, so only a child loads it.
DEVICE_PROBES = "trainer.device_probes"


class NoSuchDevice(Exception):
    """DEVICE names a device this machine does not show; the message says what it shows."""


def visible_devices(requested: str, workers: int) -> list[str]:
    """The device of each worker: one per visible GPU for 'auto'/'cuda', else `workers` copies.

    A named device the machine lacks is refused here, at start: a worker on it would fail every job."""
    if requested == "mps" and not _ask_torch("has_mps"):
        raise NoSuchDevice("DEVICE=mps, but this machine shows no Apple GPU (MPS needs macOS 12.3 or later "
                           "on Apple silicon, and a torch built with it). Use DEVICE=auto or DEVICE=cpu.")
    if requested.startswith("cuda:"):
        count = _cuda_device_count()
        if int(requested.split(":", 1)[1]) >= count:
            shows = f"{count} GPU{'s' if count != 1 else ''}, numbered from 0" if count else "no GPU"
            raise NoSuchDevice(f"DEVICE={requested}, but this machine shows {shows}. Use DEVICE=auto, "
                               "or a GPU it shows (CUDA_VISIBLE_DEVICES renumbers them from 0).")
    if requested in ("auto", "cuda"):
        count = _cuda_device_count()
        if count:
            devices = [f"cuda:{i}" for i in range(count)]
            return devices[:workers] if workers else devices
        if requested == "cuda":
            log.warning("DEVICE=cuda but no GPU is visible; running on the CPU")
        requested = "cpu"
    return [requested] * max(workers, 1)


def usable_cpus() -> int:
    """The CPUs this process may run on: a container pinned to a few of the host's cores
    (`docker run --cpuset-cpus`) sees all of them in `os.cpu_count()`, but may use only these."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_threads_per_worker(devices: list[str]) -> int:
    """Torch threads for each worker: CPU workers split the usable cores between them, GPU workers
    keep the default."""
    cpu_workers = sum(1 for d in devices if d == "cpu")
    return max(1, usable_cpus() // cpu_workers) if cpu_workers > 1 else 0


def _cuda_device_count() -> int:
    return _ask_torch("count_gpus")


def _ask_torch(question: str) -> Any:
    """Ask `trainer.device_probes.<question>` in a throwaway child, so that the bot's own process never
    initialises CUDA or imports torch."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_answer, (question,))


def _answer(question: str) -> Any:
    """In the child: the trainer's answer, found by name (this package imports nothing of the trainer)."""
    return getattr(importlib.import_module(DEVICE_PROBES), question)()

