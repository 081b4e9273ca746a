"""The bot's periodic clean-up: picture files past PICTURE_RETENTION_DAYS, models older than a
person's previous one that a crash or a waiting /imagine kept (storage.retention does the work), and
quota uses older than storage.usage_db keeps them.

Runs once at start and then every `interval_s`; the clock is injected so tests can move time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from bot.scheduler import adapter_key
from jobs.runner import JobRunner
from storage import retention, usage_db
from storage.store import Storage

log = logging.getLogger(__name__)

INTERVAL_S = 3600.0


class Housekeeping:
    """One task that applies the retention rules now and then."""

    def __init__(self, store: Storage, runner: JobRunner, retention_days: int, *,
                 clock: Callable[[], float] = time.time, interval_s: float = INTERVAL_S) -> None:
        self.store, self.runner = store, runner
        self.retention_days = retention_days
        self.clock, self.interval_s = clock, interval_s
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> None:
        """Apply the rules at `clock()`."""
        await retention.expire_pictures(self.store, self.retention_days, self.clock())
        for model_id in await retention.drop_old_models(self.store):
            await self.runner.forget_adapter(adapter_key(model_id))
        if pruned := await usage_db.prune_usage(self.store.db, self.clock()):
            log.info("pruned %d quota uses older than %d days", pruned, usage_db.USAGE_KEEP_S // 86400)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="housekeeping")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:  # a full disk or a locked database now is no reason to stop for good
                log.exception("clean-up of old pictures and models failed; trying again later")
            await asyncio.sleep(self.interval_s)
