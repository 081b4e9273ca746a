"""`JobRunner` over Celery and Redis: the bot stays one process, workers run on any GPU machine.

The bot's database stays the system of record. A job goes out as a self-contained Celery message
with a fresh token (see `trainer.celery_worker`); events come back on a Redis list and are passed on
only if they carry the job's current token, so a stale attempt can never finish a job. Workers are
known by their heartbeat keys: capacity is the live workers minus the jobs in flight, and a worker
whose key expires while it runs a job is reported as `worker_lost`, which the scheduler re-queues
from the last checkpoint it holds. A generation goes to the queue of a live, idle worker that
already holds the person's LoRA when there is one, else to the shared queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from dataclasses import dataclass, field

import redis

from trainer import wire
from trainer.celery_worker import (
    EVENTS,
    SHARED_QUEUE,
    TASK,
    TOKEN_TTL_S,
    cancel_key,
    evict_key,
    make_app,
    token_key,
    worker_key,
    worker_queue,
)
from trainer.jobs import WorkItem
from trainer.runner import EventHandler, JobRunner

log = logging.getLogger(__name__)

LIVENESS_POLL_S = 1.0


@dataclass
class _Known:
    """What the bot knows of one live worker."""

    adapters: set[str] = field(default_factory=set)


class CeleryRunner(JobRunner):
    def __init__(self, redis_url: str) -> None:
        self.app = make_app(redis_url)
        self.redis = redis.Redis.from_url(redis_url)
        self._workers: dict[str, _Known] = {}
        self._tokens: dict[int, str] = {}  # job id -> token of the attempt in flight
        self._running_on: dict[int, str | None] = {}  # job id -> worker name once it reported
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_event: EventHandler | None = None
        self._stop = threading.Event()
        self._liveness: asyncio.Task[None] | None = None

    async def start(self, on_event: EventHandler) -> None:
        self._loop, self._on_event = asyncio.get_running_loop(), on_event
        await self._refresh_workers()
        threading.Thread(target=self._read_events, name="celery-events", daemon=True).start()
        self._liveness = asyncio.create_task(self._watch_workers())

    async def stop(self) -> None:
        self._stop.set()
        if self._liveness is not None:
            self._liveness.cancel()
            await asyncio.gather(self._liveness, return_exceptions=True)

    # ---- workers -------------------------------------------------------------------------------
    @property
    def workers(self) -> list[str]:
        return sorted(self._workers)

    def _live_names(self) -> set[str]:
        return {k.decode().rsplit(":", 1)[1] for k in self.redis.scan_iter(match=worker_key("*"))}

    async def _refresh_workers(self) -> None:
        live = await asyncio.to_thread(self._live_names)
        for name in live - set(self._workers):
            log.info("worker %s joined", name)
            self._workers[name] = _Known()
        for name in set(self._workers) - live:
            log.warning("worker %s is gone", name)
            del self._workers[name]
            for job_id in [j for j, w in self._running_on.items() if w == name]:
                self._forget_job(job_id)
                if self._on_event is not None:
                    await self._on_event(job_id, {"type": "worker_lost",
                                                  "message": "The GPU worker stopped unexpectedly while "
                                                             "working on this."})

    async def _watch_workers(self) -> None:
        while True:
            await asyncio.sleep(LIVENESS_POLL_S)
            try:
                await self._refresh_workers()
            except redis.RedisError as exc:
                log.warning("could not read worker heartbeats: %s", exc)

    # ---- events --------------------------------------------------------------------------------
    def _read_events(self) -> None:
        """Thread: pop event envelopes from Redis and hand them to the loop."""
        assert self._loop is not None
        while not self._stop.is_set():
            try:
                popped = self.redis.blpop([EVENTS], timeout=1)
            except redis.RedisError as exc:
                log.warning("reading events from Redis failed: %s", exc)
                self._stop.wait(1)
                continue
            if popped is not None:
                asyncio.run_coroutine_threadsafe(self._deliver(wire.loads(popped[1])), self._loop)

    async def _deliver(self, envelope: dict) -> None:
        job_id, event, name = envelope["job_id"], envelope["event"], envelope["worker"]
        if self._tokens.get(job_id) != envelope["token"]:
            return  # an attempt the bot no longer waits for
        self._running_on[job_id] = name
        known = self._workers.setdefault(name, _Known())
        if event["type"] == "claimed":
            return
        if event["type"] == "adapter_loaded":
            known.adapters.add(event["key"])
            return
        if event["type"] in ("done", "error"):
            self._forget_job(job_id)
        assert self._on_event is not None
        await self._on_event(job_id, event)

    def _forget_job(self, job_id: int) -> None:
        self._tokens.pop(job_id, None)
        self._running_on.pop(job_id, None)

    # ---- JobRunner -----------------------------------------------------------------------------
    def idle_capacity(self, kind: str | None = None) -> int:
        return max(0, len(self._workers) - len(self._tokens))

    def _queue_for(self, item: WorkItem) -> str:
        key = item.params.get("adapter_key")
        busy = {w for w in self._running_on.values() if w}
        for name, known in self._workers.items():
            if key and key in known.adapters and name not in busy:
                item.blobs.pop("lora", None)  # that worker holds it already
                return worker_queue(name)
        return SHARED_QUEUE

    async def submit(self, item: WorkItem) -> None:
        token = uuid.uuid4().hex
        queue = self._queue_for(item)
        payload = wire.dumps(wire.item_to_dict(item))
        await asyncio.to_thread(self.redis.set, token_key(item.job_id), token, ex=TOKEN_TTL_S)
        self._tokens[item.job_id], self._running_on[item.job_id] = token, None
        await asyncio.to_thread(self.app.send_task, TASK, args=[payload, token], queue=queue)
        log.info("job %d (%s) sent to %s", item.job_id, item.kind, queue)

    async def cancel(self, job_id: int) -> None:
        await asyncio.to_thread(self.redis.set, cancel_key(job_id), 1, ex=TOKEN_TTL_S)

    async def forget_adapter(self, key: str) -> None:
        for name, known in self._workers.items():
            known.adapters.discard(key)
            await asyncio.to_thread(self.redis.rpush, evict_key(name), key)
