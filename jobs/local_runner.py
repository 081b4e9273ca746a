"""`LocalProcessRunner`, the default `JobRunner`: one worker child process per device on this host.

Each visible GPU (or one CPU worker) gets a spawned process, so nothing slow or crash-prone runs in
the bot's process and its event loop never blocks. The child runs `WORKER_ENTRY`, named rather than
imported: this package imports no torch and nothing of the trainer; the child does. A child starts
without the bot's secrets in its environment (`common.child_env`): it needs none of them, and a
process's starting environment stays readable in /proc as long as it runs.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import multiprocessing as mp
import signal
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from common.child_env import secrets_withheld
from jobs.commands import Cancel, Evict, Run, Stop
from jobs.events import AdapterLoaded, Done, Error, Event, WorkerLost
from jobs.payloads import WorkItem
from jobs.runner import EventHandler, JobRunner, WorkerState
from jobs.worker_config import WorkerConfig

log = logging.getLogger(__name__)

# The worker process's entry point, `module:function(commands, events, config)`.
WORKER_ENTRY = "trainer.worker_process:process_main"


def _run_worker(entry: str, commands: Connection, events: Connection, config: WorkerConfig) -> None:
    """In the child: import the worker by name and run it. Ctrl-C in a terminal reaches the whole
    process group; the worker ignores it and stops when the bot says so (a `Stop`, or its pipe closing),
    at the next step, without taking its job down as a crash."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    module, function = entry.split(":")
    getattr(importlib.import_module(module), function)(commands, events, config)


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
        commands_read, commands_write = self._ctx.Pipe(duplex=False)
        events_read, events_write = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=_run_worker, name=f"worker-{slot.index}",
                                    args=(WORKER_ENTRY, commands_read, events_write, slot.config), daemon=True)
        with secrets_withheld():
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
        if isinstance(event, Done | Error):
            if slot.job_id == job_id:
                slot.job_id = slot.kind = None
            elif slot.rider_id == job_id:
                slot.rider_id = None
        if isinstance(event, AdapterLoaded):
            slot.adapters.add(event.key)
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
                await self._on_event(job_id, WorkerLost("The GPU worker stopped unexpectedly while working on this."))

    def _free(self) -> list[_Slot]:
        return [s for s in self._slots if s.job_id is None and s.process is not None]

    def _training_without_rider(self) -> list[_Slot]:
        return [s for s in self._slots if s.kind == "train" and s.rider_id is None and s.process is not None]

    def workers_online(self) -> int:
        return sum(1 for s in self._slots if s.process is not None)

    def worker_states(self) -> list[WorkerState]:
        return [WorkerState(f"worker-{s.index}", s.config.device,
                            tuple(j for j in (s.job_id, s.rider_id) if j is not None), up=s.process is not None)
                for s in self._slots]

    def idle_capacity(self, kind: str | None = None) -> int:
        """Free workers take anything; a training worker also takes one generation between its steps."""
        free = len(self._free())
        return free if kind == "train" else free + len(self._training_without_rider())

    def _pick_slot(self, item: WorkItem) -> tuple[_Slot, bool]:
        """The slot for `item`, and whether it rides along a training there."""
        key = item.adapter_key
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
        if item.adapter_key in slot.adapters:
            item = item.without_lora()  # the worker holds it already
        if rides:
            slot.rider_id = item.job_id
            slot.riders_served += 1
        else:
            slot.job_id, slot.kind, slot.riders_served = item.job_id, item.kind, 0
        assert slot.commands is not None
        try:
            await asyncio.to_thread(slot.commands.send, Run(item))
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
                await asyncio.to_thread(slot.commands.send, Cancel(job_id))

    async def forget_adapter(self, key: str) -> None:
        # Every worker is told, not only those known to hold it: a cheap message buys certainty.
        for slot in self._slots:
            slot.adapters.discard(key)
            if slot.commands is None:
                continue
            try:
                await asyncio.to_thread(slot.commands.send, Evict(key))
            except (BrokenPipeError, OSError):  # a dead worker's replacement starts with no adapters
                log.info("worker %d is gone; nothing to evict there", slot.index)

    async def forget_jobs(self, job_ids: Collection[int]) -> None:
        """Nothing to remove here: jobs reach the workers through pipes and are kept nowhere on the way;
        a job cancelled before this stops at its next step, its worker's scratch files going with it
        (a killed worker's are cleared by its replacement as it starts, `trainer.worker.Worker`), and
        `forget_adapter` has taken the person's LoRA files and weights."""

    async def stop(self) -> None:
        """Stop every worker; a running job stops at its next step and is resumed on the next start."""
        self._stopping = True
        live = [s for s in self._slots if s.process is not None]
        for slot in live:
            try:
                assert slot.commands is not None
                slot.commands.send(Stop())
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
