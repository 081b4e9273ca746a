"""A GPU worker on any machine, fed through Celery and Redis: `python -m trainer worker`.

Each worker process owns one device, keeps the base model loaded and runs one job at a time (Celery's
solo pool, prefetch 1), with the same `trainer.worker.Worker` code as the local runner. Jobs arrive
self-contained (photo and LoRA bytes inside, JSON with base64 bytes, see `trainer.wire`); events and
results go back on a Redis list the bot reads, so a worker needs no shared disk and no database.

Redis keys (all under `avatar:`):
- `avatar:events` — a list of `{"job_id", "token", "worker", "event"}` the bot pops;
- `avatar:worker:<name>` — this worker's heartbeat, refreshed every second, expiring after a few:
  the bot sees a worker die by its key expiring;
- `avatar:job:<id>:token` — the bot's token for the current attempt of a job. A worker runs a job
  only while its message carries that token, so a message that Redis re-delivers after its worker
  died, or an attempt the bot has since replaced, stops without running to completion twice. The bot
  deletes the token once the attempt ended (done, failed, cancelled, its worker lost), so a message
  re-delivered after that is dropped without running;
- `avatar:cancel:<id>` — set by the bot to cancel a job between steps;
- `avatar:evict:<name>` — LoRA keys this worker must forget (a person asked to be forgotten);
- `avatar:riders:<name>` — generations the bot gave this worker while it trains: the training task
  pops and serves them between its steps (as the local runner's workers do), and serves any left
  when the training ends. Each carries its own token like any job.
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
from celery import Celery

from trainer import wire
from trainer.events import Event

if TYPE_CHECKING:
    from trainer.jobs import WorkItem
    from trainer.runner import WorkerConfig

log = logging.getLogger(__name__)

TASK = "avatar.run_job"
SHARED_QUEUE = "avatar.jobs"
EVENTS = "avatar:events"
HEARTBEAT_S = 1.0
WORKER_TTL_S = 5  # a worker silent this long is taken for dead
TOKEN_TTL_S = 7 * 24 * 3600
# Redis re-delivers an unacknowledged job after this long; longer than the longest training, so a
# job is re-delivered only when its worker died (the bot has usually re-queued it long before).
VISIBILITY_TIMEOUT_S = 6 * 3600
CANCEL_POLL_S = 0.5
RIDER_POLL_S = 0.2  # how often a training looks for generations to serve between its steps


def worker_queue(name: str) -> str:
    return f"avatar.worker.{name}"


def worker_key(name: str) -> str:
    return f"avatar:worker:{name}"


def token_key(job_id: int) -> str:
    return f"avatar:job:{job_id}:token"


def cancel_key(job_id: int) -> str:
    return f"avatar:cancel:{job_id}"


def evict_key(name: str) -> str:
    return f"avatar:evict:{name}"


def rider_key(name: str) -> str:
    return f"avatar:riders:{name}"


def make_app(redis_url: str) -> Celery:
    """The Celery app both sides use, with the settings long GPU jobs need."""
    app = Celery("avatar", broker=redis_url)
    app.conf.update(
        task_serializer="json", accept_content=["json"], task_default_queue=SHARED_QUEUE,
        task_acks_late=True,  # acknowledged when done: a worker that dies leaves its job in Redis
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a busy worker holds no other job hostage
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
        task_ignore_result=True,
    )
    return app


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
                self._run_one(item, token, between_steps=self._serve_riders_now_and_then)
            finally:
                self.current = None
                self._serve_riders()
                self._apply_evictions()

    def _run_one(self, item: WorkItem, token: str, between_steps: Callable[[], None] | None = None) -> None:
        job_id = item.job_id
        if not self._current_attempt(job_id, token):
            log.info("job %d: this message is an old attempt; dropped", job_id)
            return

        def emit(event: Event) -> None:
            self.redis.rpush(EVENTS, wire.dumps({"job_id": job_id, "token": token, "worker": self.name,
                                                 "event": event}))

        last_poll, cancelled = 0.0, False

        def should_cancel() -> bool:
            nonlocal last_poll, cancelled
            now = time.monotonic()
            if not cancelled and now - last_poll >= CANCEL_POLL_S:
                last_poll = now
                cancelled = bool(self.redis.exists(cancel_key(job_id))) or not self._current_attempt(job_id, token)
            return cancelled

        emit({"type": "claimed"})  # tells the bot which worker runs it, so it notices if this one dies
        self.worker.execute(item, emit, should_cancel,
                            between_steps=between_steps if item.kind == "train" else None)

    def _serve_riders_now_and_then(self) -> None:
        """Between training steps: unload forgotten adapters (a long training must not keep a forgotten
        person's weights loaded until it ends; its own LoRA is not one of the engine's adapters) and
        serve waiting generations, looking at most every RIDER_POLL_S."""
        now = time.monotonic()
        if now - self._last_rider_poll >= RIDER_POLL_S:
            self._last_rider_poll = now
            self._apply_evictions()
            self._serve_riders()

    def _serve_riders(self) -> None:
        try:
            while (raw := self.redis.lpop(rider_key(self.name))) is not None:
                envelope = wire.loads(raw)
                self._run_one(wire.item_from_dict(envelope["item"]), envelope["token"])
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

