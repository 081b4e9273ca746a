"""The seam between the bot and the workers: a `JobRunner` executes work items and reports events.

Two backends implement it: `jobs.local_runner.LocalProcessRunner` (one child process per device on
this host) and `jobs.celery_runner.CeleryRunner` (workers on any machine, through Celery and Redis).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from jobs.events import Event
from jobs.payloads import WorkItem

EventHandler = Callable[[int, Event], Awaitable[None]]


@dataclass(frozen=True)
class WorkerState:
    """One worker as its runner sees it, for the operator's /admin views."""

    name: str
    where: str  # its device (local) or that it is remote (Celery)
    jobs: tuple[int, ...] = ()  # the jobs it runs now: a job, and a generation riding on a training
    up: bool = True  # False: its process is not running

    @property
    def state(self) -> str:
        if not self.up:
            return "down"
        return "busy" if self.jobs else "idle"


class JobRunner(ABC):
    """Runs work items on workers and reports each event as `(job_id, event)`.

    Besides the trainer's events, a runner reports `WorkerLost` when the worker running a job died;
    the job's owner decides whether to retry it.
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

    def worker_states(self) -> list[WorkerState]:
        """The workers and the jobs each runs now (a runner that cannot tell lists none)."""
        return []

    @abstractmethod
    async def submit(self, item: WorkItem) -> None: ...

    @abstractmethod
    async def cancel(self, job_id: int) -> None:
        """Ask the worker running `job_id` to stop between steps; it then reports a `cancelled` error."""

    @abstractmethod
    async def forget_adapter(self, key: str) -> None:
        """Drop a user's LoRA from every worker (the user retrained or asked to be forgotten)."""

    @abstractmethod
    async def forget_jobs(self, job_ids: Collection[int]) -> None:
        """Remove every copy of these jobs' messages the runner keeps outside the bot: queued, taken by
        a worker that died, waiting beside a training, or results not yet read (their owner asked to be
        forgotten; the jobs are cancelled already)."""

