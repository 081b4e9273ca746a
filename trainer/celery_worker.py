"""A GPU worker on any machine, fed through Celery and Redis: `python -m trainer worker`.

Each worker process owns one device, keeps the base model loaded and runs one job at a time (Celery's
solo pool, prefetch 1), with the same `trainer.worker.Worker` code as the local runner. Jobs arrive
self-contained (photo and LoRA bytes inside, JSON with base64 bytes, see `jobs.wire`); events and
results go back on a Redis list the bot reads, so a worker needs no shared disk and no database.
The queue and key names are `jobs.celery_protocol`'s.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

from jobs import wire
from jobs.celery_protocol import (
    CANCEL_POLL_S,
    EVENTS,
    HEARTBEAT_S,
    RIDER_POLL_S,
    SHARED_QUEUE,
    TASK,
    WORKER_TTL_S,
    cancel_key,
    evict_key,
    make_app,
    rider_key,
    token_key,
    worker_key,
    worker_queue,
)
from jobs.events import Claimed, Event

if TYPE_CHECKING:
    from jobs.payloads import WorkItem
    from jobs.worker_config import WorkerConfig

log = logging.getLogger(__name__)


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class CeleryWorker:
    """The task body, the heartbeat and evictions around one `trainer.worker.Worker`."""

    def __init__(self, config: WorkerConfig, name: str, redis_url: str) -> None:
        from trainer.worker import Worker

        self.config, self.name = config, name
        self.redis = redis.Redis.from_url(redis_url)
        self.worker = Worker(config)
        self.current: int | None = None
        self._evicted: list[str] = []
        self._lock = threading.Lock()
        self._busy = threading.Lock()  # held while a task runs: one thread at a time uses the engine
        self._stop = threading.Event()
        self._last_rider_poll = 0.0

    # ---- heartbeat ---------------------------------------------------------------------------
    def start_heartbeat(self) -> None:
        threading.Thread(target=self._beat, name="heartbeat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.is_set():
            self.beat_once()
            self._stop.wait(HEARTBEAT_S)

    def beat_once(self) -> None:
        """Say this worker is alive, and take the adapters to forget: their files go at once, their
        weights when no task uses the engine (now, if the worker is idle, else after the task)."""
        try:
            self.redis.set(worker_key(self.name), wire.dumps({"busy": self.current}), ex=WORKER_TTL_S)
            while (key := self.redis.lpop(evict_key(self.name))) is not None:
                key = key.decode()
                self.worker.adapter_file(key).unlink(missing_ok=True)
                with self._lock:
                    self._evicted.append(key)
        except redis.RedisError as exc:
            log.warning("heartbeat to Redis failed: %s", exc)
        if self._busy.acquire(blocking=False):
            try:
                self._apply_evictions()
            finally:
                self._busy.release()

    def stop(self, *, remove_work_dir: bool = False) -> None:
        """Stop beating and leave no one's files behind (see `Worker.remove_files`)."""
        self._stop.set()
        try:
            self.worker.remove_files(folder_too=remove_work_dir)
        finally:
            self.redis.delete(worker_key(self.name))

    def _apply_evictions(self) -> None:
        """Unload forgotten adapters from the engine; only with `_busy` held, when nothing uses them."""
        with self._lock:
            keys, self._evicted = self._evicted, []
        for key in keys:
            self.worker.evict(key)

    # ---- the task ----------------------------------------------------------------------------
    def run(self, payload: str, token: str) -> None:
        """The Celery task: one job, then any generation left waiting for this worker's training."""
        with self._busy:
            self._apply_evictions()
            item = wire.item_from_dict(wire.loads(payload))
            self.current = item.job_id
            try:
                self._run_one(item, token, serve_riders=self.serve_riders)
            finally:
                self.current = None
                self._drain_riders()
                self._apply_evictions()

    def _run_one(self, item: WorkItem, token: str, serve_riders: Callable[[], None] | None = None) -> None:
        job_id = item.job_id
        if not self._current_attempt(job_id, token):
            log.info("job %d: this message is an old attempt; dropped", job_id)
            return

        def emit(event: Event) -> None:
            self.redis.rpush(EVENTS, wire.envelope_to_text(wire.Envelope(job_id, token, self.name, event)))

        last_poll, cancelled = 0.0, False

        def should_cancel() -> bool:
            nonlocal last_poll, cancelled
            now = time.monotonic()
            if not cancelled and now - last_poll >= CANCEL_POLL_S:
                last_poll = now
                cancelled = bool(self.redis.exists(cancel_key(job_id))) or not self._current_attempt(job_id, token)
            return cancelled

        emit(Claimed())  # tells the bot which worker runs it, so it notices if this one dies
        self.worker.execute(item, emit, should_cancel,
                            serve_riders=serve_riders if item.kind == "train" else None)

    def serve_riders(self) -> None:
        """Between training steps: unload forgotten adapters (a long training must not keep a forgotten
        person's weights loaded until it ends; its own LoRA is not one of the engine's adapters) and
        serve waiting generations, looking at most every RIDER_POLL_S."""
        now = time.monotonic()
        if now - self._last_rider_poll >= RIDER_POLL_S:
            self._last_rider_poll = now
            self._apply_evictions()
            self._drain_riders()

    def _drain_riders(self) -> None:
        try:
            while (raw := self.redis.lpop(rider_key(self.name))) is not None:
                self._run_one(*wire.rider_from_text(raw))
        except redis.RedisError as exc:  # the training goes on; the bot re-sends what it misses
            log.warning("could not read waiting generations from Redis: %s", exc)

    def _current_attempt(self, job_id: int, token: str) -> bool:
        stored = self.redis.get(token_key(job_id))
        return stored is not None and stored.decode() == token


def serve(config: WorkerConfig, redis_url: str, name: str | None = None, *, remove_work_dir: bool = False) -> None:
    """Run a Celery worker for the bot's jobs in this process until it is stopped; then empty its work
    folder, and remove the folder too with `remove_work_dir` (one made for this worker's name alone)."""
    name = name or default_name()
    app = make_app(redis_url)
    body = CeleryWorker(config, name, redis_url)

    @app.task(name=TASK)
    def run_job(payload: str, token: str) -> None:
        body.run(payload, token)

    body.worker.prepare()  # load the model before taking the first job
    body.start_heartbeat()
    log.info("worker %s on %s, queues %s and %s", name, config.device, SHARED_QUEUE, worker_queue(name))
    try:
        app.worker_main(["worker", "--pool=solo", "--concurrency=1", "--prefetch-multiplier=1",
                         f"--hostname={name}@%h", "-Q", f"{SHARED_QUEUE},{worker_queue(name)}",
                         "--without-gossip", "--without-mingle", "--without-heartbeat",
                         f"--loglevel={config.log_level}"])
    finally:
        body.stop(remove_work_dir=remove_work_dir)

