"""What the local backend tells its worker processes, over their command pipe."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.payloads import WorkItem


@dataclass(frozen=True)
class Run:
    """Run this item (or, while a training runs, serve it between its steps if it is a picture)."""

    item: WorkItem


@dataclass(frozen=True)
class Cancel:
    """Stop job `job_id` at its next step; it then reports a `cancelled` error."""

    job_id: int


@dataclass(frozen=True)
class Evict:
    """Forget the LoRA kept under `key`: its file at once, its weights once no job uses them."""

    key: str


@dataclass(frozen=True)
class Stop:
    """The bot is stopping: the running job stops at its next step and reports nothing."""


Command = Run | Cancel | Evict | Stop
