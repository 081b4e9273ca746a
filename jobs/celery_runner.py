"""`JobRunner` over Celery and Redis: the bot stays one process, workers run on any GPU machine.

The bot's database stays the system of record. A job goes out as a self-contained Celery message
with a fresh token (see `jobs.celery_protocol`); events come back on a Redis list and are passed on
only if they carry the job's current token, so a stale attempt can never finish a job. Workers are
known by their heartbeat keys: capacity is the live workers minus the jobs in flight, and a worker
whose key expires while it runs a job is reported as `worker_lost`, which the scheduler re-queues
from the last checkpoint it holds. A generation goes to the queue of a live, idle worker that
already holds the person's LoRA when there is one, else to the shared queue.

When no worker is idle, a generation may ride on a training: it is pushed to that worker's rider
list, which the training task serves between its steps (one rider per training at a time, spread
over the trainings, preferring a worker that holds the person's LoRA). A rider the training did not
pick up before it ended is sent again through the queues, with a new token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field

import redis

from jobs import wire
from jobs.celery_protocol import (
    EVENTS,
    SHARED_QUEUE,
    TASK,
    TOKEN_TTL_S,
    cancel_key,
    evict_key,
    make_app,
    rider_key,
    token_key,
    worker_key,
    worker_queue,
)
from jobs.events import AdapterLoaded, Claimed, Done, Error, WorkerLost
from jobs.payloads import WorkItem
from jobs.runner import EventHandler, JobRunner

log = logging.getLogger(__name__)

LIVENESS_POLL_S = 1.0
# Deletes a job's token only while it is still the given attempt's: a newer attempt's token stays.
VOID_TOKEN = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


@dataclass
class _Known:
    """What the bot knows of one live worker."""

    adapters: set[str] = field(default_factory=set)


class CeleryRunner(JobRunner):
    def __init__(self, redis_url: str) -> None:
        self.app = make_app(redis_url)
        self.redis = redis.Redis.from_url(redis_url)
        self._void_token = self.redis.register_script(VOID_TOKEN)
        self._workers: dict[str, _Known] = {}
        self._tokens: dict[int, str] = {}  # job id -> token of the attempt in flight
        self._running_on: dict[int, str | None] = {}  # job id -> worker name once it reported
        self._kinds: dict[int, str] = {}  # job id -> "train" or "generate", for jobs in flight
        self._claimed: set[int] = set()  # jobs a worker has started
        self._riders: dict[str, WorkItem] = {}  # worker name -> the generation riding on its training
        self._riders_served: Counter[str] = Counter()  # per worker: riders go where fewest have gone
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
                await self._forget_job(job_id)
                if self._on_event is not None:
                    await self._on_event(job_id, WorkerLost("The GPU worker stopped unexpectedly while "
                                                            "working on this."))

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
            if popped is None or self._stop.is_set():
                continue
            try:
                asyncio.run_coroutine_threadsafe(self._deliver(wire.envelope_from_text(popped[1])), self._loop)
            except RuntimeError:  # the bot's loop closed while this event was on its way
                return

    async def _deliver(self, envelope: wire.Envelope) -> None:
        job_id, event, name = envelope.job_id, envelope.event, envelope.worker
        if self._tokens.get(job_id) != envelope.token:
            return  # an attempt the bot no longer waits for
        self._running_on[job_id] = name
        known = self._workers.setdefault(name, _Known())
        if isinstance(event, Claimed):
            self._claimed.add(job_id)
            return
        if isinstance(event, AdapterLoaded):
            known.adapters.add(event.key)
            return
        if isinstance(event, Done | Error):
            training = self._kinds.get(job_id) == "train"
            await self._forget_job(job_id)
            if training:
                await self._resend_unserved_rider(name)
        assert self._on_event is not None
        await self._on_event(job_id, event)

    async def _forget_job(self, job_id: int) -> None:
        """The bot waits for this attempt no more (it ended, or its worker is gone): its token is voided
        too, so a worker that gets its message later (Redis re-delivers an unacknowledged one hours
        on, when the job may be long cancelled or forgotten) drops it instead of running it."""
        token = self._tokens.pop(job_id, None)
        self._running_on.pop(job_id, None)
        self._kinds.pop(job_id, None)
        self._claimed.discard(job_id)
        for name, rider in list(self._riders.items()):
            if rider.job_id == job_id:
                del self._riders[name]
        if token is None:
            return
        try:
            await asyncio.to_thread(self._void_token, keys=[token_key(job_id)], args=[token])
        except redis.RedisError as exc:  # the token expires on its own after TOKEN_TTL_S
            log.warning("job %d: could not void its token in Redis: %s", job_id, exc)

    async def _resend_unserved_rider(self, name: str) -> None:
        """A training ended before it picked up its rider: send the rider through the queues instead.

        The new token makes the old rider entry void should this worker pop it later."""
        rider = self._riders.pop(name, None)
        self._riders_served.pop(name, None)
        if rider is None or rider.job_id in self._claimed:
            return
        await self._forget_job(rider.job_id)
        log.info("job %d: the training it waited on ended first; sending it again", rider.job_id)
        await self.submit(rider)

    # ---- JobRunner -----------------------------------------------------------------------------
    def _free(self) -> int:
        """Workers that no job (other than a rider) is meant for."""
        riding = {r.job_id for r in self._riders.values()}
        return max(0, len(self._workers) - len([j for j in self._tokens if j not in riding]))

    def _trainings_without_rider(self) -> list[str]:
        return [name for job_id, name in self._running_on.items()
                if name in self._workers and self._kinds.get(job_id) == "train" and job_id in self._claimed
                and name not in self._riders]

    def workers_online(self) -> int:
        """Workers whose heartbeat is fresh (a worker starts beating once it has warmed up)."""
        return len(self._workers)

    def idle_capacity(self, kind: str | None = None) -> int:
        free = self._free()
        return free if kind == "train" else free + len(self._trainings_without_rider())

    def _queue_for(self, item: WorkItem) -> tuple[str, str | None, WorkItem]:
        """The queue to send `item` to, the one worker that reads it (None: any worker), and the item
        as it goes there."""
        key = item.adapter_key
        busy = {w for w in self._running_on.values() if w}
        for name, known in self._workers.items():
            if key and key in known.adapters and name not in busy:
                return worker_queue(name), name, item.without_lora()  # that worker holds it already
        return SHARED_QUEUE, None, item

    async def submit(self, item: WorkItem) -> None:
        riding = self._trainings_without_rider() if item.kind == "generate" and not self._free() else []
        if riding:
            await self._send_rider(item, riding)
            return
        token = uuid.uuid4().hex
        queue, reader, sent = self._queue_for(item)
        payload = wire.dumps(wire.item_to_dict(sent))
        await asyncio.to_thread(self.redis.set, token_key(item.job_id), token, ex=TOKEN_TTL_S)
        # A job sent to one worker's own queue is that worker's from now on: should it go away before
        # taking the job, nobody else reads that queue, and the job is reported lost (and sent again
        # with a new token, which voids the entry left in the queue).
        self._tokens[item.job_id], self._running_on[item.job_id] = token, reader
        self._kinds[item.job_id] = item.kind
        # The message's headers (and Celery's log lines) show `argsrepr` instead of the arguments: the
        # job's id, not its prompt, handle or token.
        await asyncio.to_thread(self.app.send_task, TASK, args=[payload, token], queue=queue,
                                argsrepr=f"<job {item.job_id}>", kwargsrepr="{}")
        log.info("job %d (%s) sent to %s", item.job_id, item.kind, queue)

    async def _send_rider(self, item: WorkItem, trainings: list[str]) -> None:
        key = item.adapter_key
        name = min(trainings, key=lambda n: (self._riders_served[n], not (key and key in self._workers[n].adapters)))
        sent = item.without_lora() if key in self._workers[name].adapters else item  # held there
        token = uuid.uuid4().hex
        await asyncio.to_thread(self.redis.set, token_key(item.job_id), token, ex=TOKEN_TTL_S)
        self._tokens[item.job_id], self._running_on[item.job_id] = token, name
        self._kinds[item.job_id] = item.kind
        self._riders[name] = item  # kept whole: it may have to go elsewhere, LoRA file included
        self._riders_served[name] += 1
        await asyncio.to_thread(self.redis.rpush, rider_key(name), wire.rider_to_text(sent, token))
        log.info("job %d (generate) rides on the training of worker %s", item.job_id, name)

    async def cancel(self, job_id: int) -> None:
        await asyncio.to_thread(self.redis.set, cancel_key(job_id), 1, ex=TOKEN_TTL_S)

    async def forget_adapter(self, key: str) -> None:
        for name, known in list(self._workers.items()):  # workers may join or leave during the awaits
            known.adapters.discard(key)
            await asyncio.to_thread(self.redis.rpush, evict_key(name), key)
