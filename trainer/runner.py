"""The seam between the bot and the GPU: a `JobRunner` executes work items and reports events.

`LocalProcessRunner` is the default backend: one child process per device (each visible GPU, or
one CPU worker), so nothing slow or crash-prone runs in the bot's process and its event loop
never blocks. Another backend (a distributed task queue) implements the same `JobRunner` methods.
This module imports no torch; the child processes do.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

from dotenv import dotenv_values

from trainer.events import Event
from trainer.jobs import WorkItem

log = logging.getLogger(__name__)
T = TypeVar("T")

EventHandler = Callable[[int, Event], Awaitable[None]]


class JobRunner(ABC):
    """Runs work items on workers and reports each event as `(job_id, event)`.

    Besides the trainer's events, a runner reports `{"type": "worker_lost", "message": ...}` when
    the worker running a job died; the job's owner decides whether to retry it.
    """

    @abstractmethod
    async def start(self, on_event: EventHandler) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    def idle_capacity(self, kind: str | None = None) -> int:
        """How many more items (of `kind`, "train" or "generate", or of any kind) `submit` accepts now."""

    @abstractmethod
    def workers_online(self) -> int:
        """How many workers are up now. With none (every GPU machine of a Celery set-up is off),
        queued jobs wait until one joins, and the bot tells the people waiting."""

    @abstractmethod
    async def submit(self, item: WorkItem) -> None: ...

    @abstractmethod
    async def cancel(self, job_id: int) -> None:
        """Ask the worker running `job_id` to stop between steps; it then reports a `cancelled` error."""

    @abstractmethod
    async def forget_adapter(self, key: str) -> None:
        """Drop a user's LoRA from every worker (the user retrained or asked to be forgotten)."""


SWITCH_ON, SWITCH_OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_file_values(env_file: Path | None) -> dict[str, str]:
    """The settings a `.env` file sets (none if there is no such file), for the bot and for Celery
    workers to read the same way: under the environment, which wins."""
    if env_file is None or not env_file.is_file():
        return {}
    return {k: v for k, v in dotenv_values(env_file).items() if v is not None}


def parse_switch(raw: str) -> bool | None:
    """An on/off setting as written in the environment (any case, spaces around); None if it is neither."""
    word = raw.strip().lower()
    return True if word in SWITCH_ON else False if word in SWITCH_OFF else None


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker process needs to start: the model, its device and where it may keep files."""

    base_model: str
    device: str
    work_dir: str
    class_cache_dir: str
    log_level: str = "INFO"
    max_adapters: int = 8
    # CPU threads for torch in this worker; 0 keeps torch's default (all cores). Several CPU workers
    # on one host must share the cores, or their thread pools fight and each runs many times slower.
    cpu_threads: int = 0
    # On a GPU, compile the UNet's stages and the VAE decoder for generation (trainer.compiled_blocks),
    # keeping inductor's compiled kernels in `compile_cache_dir` so a restart reads them back.
    compile_generation: bool = True
    compile_cache_dir: str = ""
    # With compile_generation: the warm-up's square pictures also get code compiled for their static
    # shapes (trainer.compiled_blocks.ByShape), 1.08-1.09x faster for minutes more at the first start.
    compile_static_shapes: bool = True
    # On a GPU, compile the training step's UNet stages (TrainConfig.compiled_stages), at the worker's
    # start for trainings of LoRA rank `train_rank` (another rank compiles in its first training).
    compile_training: bool = True
    train_rank: int = 16
    # On a GPU, processes that compile parts of the start beside the worker (trainer.start_helpers):
    # below 0, as many as the GPU's free memory and this worker's share of the host's CPUs allow
    # (the host's CPUs split between `workers_on_host` workers); 0, none.
    start_helpers: int = -1
    workers_on_host: int = 1


@dataclass
class _Slot:
    """One worker process and what the runner knows about it."""

    index: int
    config: WorkerConfig
    process: Any = None
    commands: Connection | None = None
    job_id: int | None = None
    kind: str | None = None  # of job_id
    rider_id: int | None = None  # a generation served between the steps of the slot's training
    riders_served: int = 0  # during the current training: riders go where fewest have gone
    adapters: set[str] = field(default_factory=set)
    generation: int = 0


class NoSuchDevice(Exception):
    """DEVICE names a device this machine does not show; the message says what it shows."""


def visible_devices(requested: str, workers: int) -> list[str]:
    """The device of each worker: one per visible GPU for 'auto'/'cuda', else `workers` copies.

    A named device the machine lacks is refused here, at start: a worker on it would fail every job."""
    if requested == "mps" and not _ask_torch(_has_mps):
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
    return _ask_torch(_count_gpus)


def _ask_torch(question: Callable[[], T]) -> T:
    """Ask a throwaway child so that the bot's own process never initialises CUDA or imports torch."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(question)


def _count_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _has_mps() -> bool:
    import torch

    return torch.backends.mps.is_available()


class LocalProcessRunner(JobRunner):
    """One spawned worker process per device on this host; crashed workers are replaced."""

    def __init__(self, configs: list[WorkerConfig]) -> None:
        self._slots = [_Slot(i, c) for i, c in enumerate(configs)]
        self._ctx = mp.get_context("spawn")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_event: EventHandler | None = None
        self._stopping = False

    @property
    def worker_pids(self) -> list[int | None]:
        return [s.process.pid if s.process else None for s in self._slots]

    def slot_of(self, job_id: int) -> int | None:
        return next((s.index for s in self._slots if job_id in (s.job_id, s.rider_id)), None)

    async def start(self, on_event: EventHandler) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_event = on_event
        for slot in self._slots:
            self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        from trainer import worker  # light module at import; torch loads in the child only

        commands_read, commands_write = self._ctx.Pipe(duplex=False)
        events_read, events_write = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=worker.process_main, name=f"worker-{slot.index}",
                                    args=(commands_read, events_write, slot.config), daemon=True)
        process.start()
        commands_read.close()
        events_write.close()
        slot.process, slot.commands = process, commands_write
        slot.job_id, slot.kind, slot.rider_id, slot.adapters = None, None, None, set()
        slot.generation += 1
        threading.Thread(target=self._pump_events, args=(slot, events_read, slot.generation),
                         name=f"events-{slot.index}", daemon=True).start()
        log.info("started worker %d (pid %d) on %s", slot.index, process.pid, slot.config.device)

    def _pump_events(self, slot: _Slot, events: Connection, generation: int) -> None:
        """Thread: forward the child's events to the loop; notice when the child dies."""
        assert self._loop is not None
        while True:
            try:
                job_id, event = events.recv()
            except (EOFError, OSError):
                break
            asyncio.run_coroutine_threadsafe(self._deliver(slot, job_id, event), self._loop)
        events.close()
        asyncio.run_coroutine_threadsafe(self._worker_exited(slot, generation), self._loop)

    async def _deliver(self, slot: _Slot, job_id: int, event: Event) -> None:
        if self._stopping:  # a job cut short by the shutdown stays running in the database
            return
        if event["type"] in ("done", "error"):
            if slot.job_id == job_id:
                slot.job_id = slot.kind = None
            elif slot.rider_id == job_id:
                slot.rider_id = None
        if event["type"] == "adapter_loaded":
            slot.adapters.add(event["key"])
            return
        if event["type"] == "adapter_evicted":
            slot.adapters.discard(event["key"])
            return
        assert self._on_event is not None
        await self._on_event(job_id, event)

    async def _worker_exited(self, slot: _Slot, generation: int) -> None:
        if generation != slot.generation:
            return
        code = slot.process.exitcode if slot.process else None
        lost = [j for j in (slot.job_id, slot.rider_id) if j is not None]
        slot.job_id = slot.kind = slot.rider_id = None
        if self._stopping:
            return
        log.warning("worker %d exited (code %s)%s", slot.index, code,
                    f" while running job(s) {lost}" if lost else "")
        self._spawn(slot)
        for job_id in lost:
            if self._on_event is not None:
                await self._on_event(job_id, {"type": "worker_lost",
                                              "message": "The GPU worker stopped unexpectedly while working on this."})

    def _free(self) -> list[_Slot]:
        return [s for s in self._slots if s.job_id is None and s.process is not None]

    def _training_without_rider(self) -> list[_Slot]:
        return [s for s in self._slots if s.kind == "train" and s.rider_id is None and s.process is not None]

    def workers_online(self) -> int:
        return sum(1 for s in self._slots if s.process is not None)

    def idle_capacity(self, kind: str | None = None) -> int:
        """Free workers take anything; a training worker also takes one generation between its steps."""
        free = len(self._free())
        return free if kind == "train" else free + len(self._training_without_rider())

    def _pick_slot(self, item: WorkItem) -> tuple[_Slot, bool]:
        """The slot for `item`, and whether it rides along a training there."""
        key = item.params.get("adapter_key")
        free = self._free()
        if free:  # a worker that already holds the person's LoRA skips reading it again
            return next((s for s in free if key and key in s.adapters), free[0]), False
        riding = self._training_without_rider() if item.kind == "generate" else []
        if riding:
            # Each generation served slows that training down: spread them over the trainings,
            # preferring (among the least burdened) a worker that holds the person's LoRA.
            return min(riding, key=lambda s: (s.riders_served, not (key and key in s.adapters))), True
        raise RuntimeError(f"no worker can take a {item.kind} job now; check idle_capacity() before submit()")

    async def submit(self, item: WorkItem) -> None:
        slot, rides = self._pick_slot(item)
        key = item.params.get("adapter_key")
        if key and key in slot.adapters:
            item.blobs.pop("lora", None)  # the worker holds it already
        if rides:
            slot.rider_id = item.job_id
            slot.riders_served += 1
        else:
            slot.job_id, slot.kind, slot.riders_served = item.job_id, item.kind, 0
        assert slot.commands is not None
        try:
            await asyncio.to_thread(slot.commands.send, {"op": "run", "item": item})
        except (BrokenPipeError, OSError):
            if rides:
                slot.rider_id = None
            else:
                slot.job_id = slot.kind = None
            raise
        log.info("job %d (%s) sent to worker %d%s", item.job_id, item.kind, slot.index,
                 " to run between the steps of its training" if rides else "")

    async def cancel(self, job_id: int) -> None:
        for slot in self._slots:
            if job_id in (slot.job_id, slot.rider_id) and slot.commands is not None:
                await asyncio.to_thread(slot.commands.send, {"op": "cancel", "job_id": job_id})

    async def forget_adapter(self, key: str) -> None:
        # Every worker is told, not only those known to hold it: a cheap message buys certainty.
        for slot in self._slots:
            slot.adapters.discard(key)
            if slot.commands is None:
                continue
            try:
                await asyncio.to_thread(slot.commands.send, {"op": "evict", "key": key})
            except (BrokenPipeError, OSError):  # a dead worker's replacement starts with no adapters
                log.info("worker %d is gone; nothing to evict there", slot.index)

    async def stop(self) -> None:
        """Stop every worker; a running job stops at its next step and is resumed on the next start."""
        self._stopping = True
        live = [s for s in self._slots if s.process is not None]
        for slot in live:
            try:
                assert slot.commands is not None
                slot.commands.send({"op": "stop"})
            except (BrokenPipeError, OSError):
                pass
        await asyncio.gather(*(self._join(slot) for slot in live))
        log.info("workers stopped")

    @staticmethod
    async def _join(slot: _Slot) -> None:
        await asyncio.to_thread(slot.process.join, 10)
        if slot.process.is_alive():
            slot.process.kill()
            await asyncio.to_thread(slot.process.join, 5)
