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

Jobs go out signed with the shared JOB_SECRET, and events are taken only when signed with it
(`jobs.signing`): an item on the events list that is not a signed event of a size a worker sends is
logged and dropped, and the reader goes on. When a worker is gone, the bot deletes its rider list, its
own queue and the lost jobs' messages; when a person is forgotten, every message of their jobs
(`forget_jobs`, `jobs.celery_purge`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field

import redis

from jobs import wire
from jobs.celery_protocol import (
    EVENTS,
    EVICT_TTL_S,
    MESSAGE_TTL_S,
    SHARED_QUEUE,
    TASK,
    TOKEN_TTL_S,
    cancel_key,
    evict_key,
    make_app,
    new_task_id,
    rider_key,
    token_key,
    worker_key,
    worker_queue,
)
from jobs.celery_purge import purge_jobs, remove_worker_lists
from jobs.events import AdapterLoaded, Claimed, Done, Error, WorkerLost, WorkerStopped
from jobs.payloads import WorkItem
from jobs.runner import EventHandler, JobRunner, WorkerState
from jobs.signing import DEFAULT_MAX_MESSAGE_MB, MB, BadFrame, too_large

log = logging.getLogger(__name__)

LIVENESS_POLL_S = 1.0
# What Celery wraps around a job's frame: its body (the frame in a JSON list) in base64, with headers.
TASK_MESSAGE_OVERHEAD = 4096


class JobTooLarge(ValueError):
    """A job whose message would be larger than MAX_JOB_MESSAGE_MB: no worker would take it."""
# Deletes a job's token only while it is still the given attempt's: a newer attempt's token stays.
VOID_TOKEN = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


@dataclass
class _Known:
    """What the bot knows of one live worker."""

    adapters: set[str] = field(default_factory=set)


class CeleryRunner(JobRunner):
    def __init__(self, redis_url: str, secret: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_MB * MB) -> None:
        """`secret`: JOB_SECRET, shared with the workers; `max_message_bytes`: MAX_JOB_MESSAGE_MB."""
        self.app = make_app(redis_url, max_message_bytes)
        self.redis = redis.Redis.from_url(redis_url)
        self._secret = secret.encode()
        self._max_bytes = max_message_bytes
        self._void_token = self.redis.register_script(VOID_TOKEN)
        self._workers: dict[str, _Known] = {}
        self._tokens: dict[int, str] = {}  # job id -> token of the attempt in flight
        self._running_on: dict[int, str | None] = {}  # job id -> worker name once it reported
        self._kinds: dict[int, str] = {}  # job id -> "train" or "generate", for jobs in flight
        self._claimed: set[int] = set()  # jobs a worker has started
        self._sent_at: dict[int, float] = {}  # job id -> when its message went out (time.monotonic)
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
        """Stop, as the local runner's workers do: every attempt in flight is voided, so its worker stops
        it at its next step and reports nothing more (a training's checkpoints are with the bot already),
        and a message still on its way is dropped where it arrives. The jobs stay `running` in the
        database; the next start re-queues them, and a training resumes from its last checkpoint."""
        self._stop.set()
        if self._liveness is not None:
            self._liveness.cancel()
            await asyncio.gather(self._liveness, return_exceptions=True)
        in_flight = list(self._tokens)
        for job_id in in_flight:
            await self._forget_job(job_id)
        if in_flight:
            log.info("asked the workers to stop job(s) %s", in_flight)

    # ---- workers -------------------------------------------------------------------------------
    @property
    def workers(self) -> list[str]:
        return sorted(self._workers)

    def _live_names(self) -> set[str]:
        return {k.decode(errors="replace").rsplit(":", 1)[1] for k in self.redis.scan_iter(match=worker_key("*"))}

    async def _refresh_workers(self) -> None:
        live = await asyncio.to_thread(self._live_names)
        for name in live - set(self._workers):
            log.info("worker %s joined", name)
            self._workers[name] = _Known()
        for name in set(self._workers) - live:
            log.warning("worker %s is gone", name)
            del self._workers[name]
            lost = [j for j, w in self._running_on.items() if w == name]
            for job_id in lost:
                await self._forget_job(job_id)
            # What waits for it is sent again (its rider, the jobs in its queue) or was its own (the message
            # of the job it ran stays in kombu's `unacked` hash): all of it goes before the jobs are re-sent.
            await asyncio.to_thread(remove_worker_lists, self.redis, name)
            await asyncio.to_thread(purge_jobs, self.redis, set(lost))
            await self._report_lost(lost, "The GPU worker stopped unexpectedly while working on this.")
        now = time.monotonic()
        late = [j for j, sent in self._sent_at.items() if j not in self._claimed and now - sent > MESSAGE_TTL_S]
        for job_id in late:  # its message expired on the way: no worker will run it
            log.warning("job %d: no worker took it in %d s", job_id, MESSAGE_TTL_S)
            await self._forget_job(job_id)
        await self._report_lost(late, "No GPU worker picked this up in time.")

    async def _report_lost(self, job_ids: list[int], message: str) -> None:
        for job_id in job_ids:
            if self._on_event is not None:
                await self._on_event(job_id, WorkerLost(message))

    async def _watch_workers(self) -> None:
        while True:
            await asyncio.sleep(LIVENESS_POLL_S)
            try:
                await self._refresh_workers()
            except redis.RedisError as exc:
                log.warning("could not read worker heartbeats: %s", exc)
            except Exception:  # the watch goes on: without it, no lost job would ever be sent again
                log.exception("watching the workers failed")

    # ---- events --------------------------------------------------------------------------------
    def _read_events(self) -> None:
        """Thread: pop event envelopes from Redis, check them, and hand them to the loop. An item that is
        not a signed event (too large, unsigned, malformed) is logged and dropped; the reading goes on."""
        assert self._loop is not None
        while not self._stop.is_set():
            try:
                popped = self.redis.blpop([EVENTS], timeout=1)
            except redis.RedisError as exc:
                log.warning("reading events from Redis failed: %s", exc)
                self._stop.wait(1)
                continue
            except Exception:  # the reading goes on: without it, no job would ever finish
                log.exception("reading events from Redis failed")
                self._stop.wait(1)
                continue
            if popped is None or self._stop.is_set():
                continue
            envelope = self._open(popped[1])
            if envelope is None:
                continue
            try:
                asyncio.run_coroutine_threadsafe(self._deliver(envelope), self._loop)
            except RuntimeError:  # the bot's loop closed while this event was on its way
                return

    def _open(self, item: bytes | str) -> wire.Envelope | None:
        """The envelope in an item of the events list, if a worker signed it; None (logged) if not."""
        try:
            return wire.envelope_from_frame(item, self._secret, self._max_bytes)
        except BadFrame as exc:
            log.warning("dropped an item of the events list: %s", exc)
        except Exception as exc:  # signed, yet unreadable (a worker of another version?); never its content
            log.warning("dropped an event that could not be read (%s)", type(exc).__name__)
        return None

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
        if isinstance(event, Done | Error | WorkerStopped):
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
        self._sent_at.pop(job_id, None)
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

    def worker_states(self) -> list[WorkerState]:
        """The live workers and the jobs meant for each: taken by it, riding on its training, or waiting
        in its own queue. A job still in the shared queue is on none of them."""
        return [WorkerState(name, "remote", tuple(sorted(j for j, w in self._running_on.items() if w == name)))
                for name in sorted(self._workers)]

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

    def _frame(self, item: WorkItem, token: str, overhead: int) -> str:
        """The job signed for a worker; JobTooLarge when its message would exceed the workers' cap."""
        frame = wire.job_to_frame(wire.SignedJob(item, token, time.time() + MESSAGE_TTL_S), self._secret)
        size = len(frame) * 4 // 3 + overhead if overhead else len(frame)
        if size > self._max_bytes:
            log.error("job %d: its message would be too large for the workers (%s); raise MAX_JOB_MESSAGE_MB "
                      "for the bot and every worker", item.job_id, too_large(size, self._max_bytes))
            raise JobTooLarge(f"job {item.job_id} is too large to send")
        return frame

    async def submit(self, item: WorkItem) -> None:
        riding = self._trainings_without_rider() if item.kind == "generate" and not self._free() else []
        if riding:
            await self._send_rider(item, riding)
            return
        token = uuid.uuid4().hex
        queue, reader, sent = self._queue_for(item)
        frame = self._frame(sent, token, TASK_MESSAGE_OVERHEAD)
        await asyncio.to_thread(self.redis.set, token_key(item.job_id), token, ex=TOKEN_TTL_S)
        # A job sent to one worker's own queue is that worker's from now on: should it go away before
        # taking the job, nobody else reads that queue, and the job is reported lost (and sent again
        # with a new token, which voids the entry left in the queue).
        self._tokens[item.job_id], self._running_on[item.job_id] = token, reader
        self._kinds[item.job_id], self._sent_at[item.job_id] = item.kind, time.monotonic()
        # The message's headers (and Celery's log lines) show `argsrepr` instead of the arguments: the
        # job's id, not its prompt, handle or token; so does the task's id.
        await asyncio.to_thread(self.app.send_task, TASK, args=[frame], queue=queue,
                                task_id=new_task_id(item.job_id), expires=MESSAGE_TTL_S,
                                argsrepr=f"<job {item.job_id}>", kwargsrepr="{}")
        await asyncio.to_thread(self.redis.expire, queue, MESSAGE_TTL_S)
        log.info("job %d (%s) sent to %s", item.job_id, item.kind, queue)

    async def _send_rider(self, item: WorkItem, trainings: list[str]) -> None:
        key = item.adapter_key
        name = min(trainings, key=lambda n: (self._riders_served[n], not (key and key in self._workers[n].adapters)))
        sent = item.without_lora() if key in self._workers[name].adapters else item  # held there
        token = uuid.uuid4().hex
        frame = self._frame(sent, token, 0)
        await asyncio.to_thread(self.redis.set, token_key(item.job_id), token, ex=TOKEN_TTL_S)
        self._tokens[item.job_id], self._running_on[item.job_id] = token, name
        self._kinds[item.job_id], self._sent_at[item.job_id] = item.kind, time.monotonic()
        self._riders[name] = item  # kept whole: it may have to go elsewhere, LoRA file included
        self._riders_served[name] += 1
        await asyncio.to_thread(self._push, rider_key(name), frame, MESSAGE_TTL_S)
        log.info("job %d (generate) rides on the training of worker %s", item.job_id, name)

    async def cancel(self, job_id: int) -> None:
        await asyncio.to_thread(self.redis.set, cancel_key(job_id), 1, ex=TOKEN_TTL_S)

    async def forget_adapter(self, key: str) -> None:
        for name, known in list(self._workers.items()):  # workers may join or leave during the awaits
            known.adapters.discard(key)
            await asyncio.to_thread(self._push, evict_key(name), key, EVICT_TTL_S)

    async def forget_jobs(self, job_ids: Collection[int]) -> None:
        """Every message of these jobs goes from Redis: in the queues, in kombu's hash of the messages
        workers have taken (a killed worker's stays there), in rider lists (a dead worker's too) and on
        the events list. Their attempts are voided first, so a copy on its way is dropped where it
        arrives, and a worker still running one stops it at its next step."""
        ids = set(job_ids)
        for job_id in ids & set(self._tokens):
            await self._forget_job(job_id)
        removed = await asyncio.to_thread(purge_jobs, self.redis, ids)
        log.info("removed %d message(s) of %d job(s) from Redis", removed, len(ids))

    def _push(self, key: str, value: str, ttl_s: int) -> None:
        """Append to a list that expires `ttl_s` after its last entry."""
        with self.redis.pipeline() as pipe:
            pipe.rpush(key, value)
            pipe.expire(key, ttl_s)
            pipe.execute()
