"""A GPU worker on any machine, fed through Celery and Redis: `python -m trainer worker`.

Each worker process owns one device, keeps the base model loaded and runs one job at a time (Celery's
solo pool, prefetch 1), with the same `trainer.worker.Worker` code as the local runner. Jobs arrive
self-contained (photo and LoRA bytes inside, JSON with base64 bytes, see `jobs.wire`); events and
results go back on a Redis list the bot reads, so a worker needs no shared disk and no database.
The queue and key names are `jobs.celery_protocol`'s.

What arrives is not trusted: an item of a queue that is not a task message, or is larger than the cap,
is dropped before it is decoded (`jobs.celery_transport`); a job the bot did not sign with the shared
JOB_SECRET, or whose message expired, is logged and dropped (Celery acknowledges it), and the worker
goes on serving. Events go back signed. On SIGTERM or SIGINT the job in progress stops at its next
step and is reported stopped (the bot has its checkpoints, and sends it again without counting a
failure), and the worker exits 0;
it exits non-zero when it cannot reach Redis at start or Celery stops on an error.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery, signals

from jobs import wire
from jobs.celery_protocol import (
    CANCEL_POLL_S,
    EVENTS,
    EVENTS_TTL_S,
    HEARTBEAT_S,
    MESSAGE_TTL_S,
    RIDER_POLL_S,
    SHARED_QUEUE,
    TASK,
    UNACKED_KEYS,
    WORKER_TTL_S,
    cancel_key,
    evict_key,
    make_app,
    rider_key,
    token_key,
    worker_key,
    worker_queue,
)
from jobs.events import Claimed, Event, WorkerStopped
from jobs.signing import DEFAULT_MAX_MESSAGE_MB, MB, BadFrame
from trainer.errors import TrainerError

if TYPE_CHECKING:
    from jobs.worker_config import WorkerConfig

log = logging.getLogger(__name__)

REDIS_START_TRIES = 5  # one a second: Redis may be starting beside the worker
MAX_EVICT_KEY_CHARS = 200  # an adapter key is `model-<id>`; anything longer is not one


class WorkerFailed(TrainerError):
    code = "worker_failed"


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class CeleryWorker:
    """The task body, the heartbeat and evictions around one `trainer.worker.Worker`."""

    def __init__(self, config: WorkerConfig, name: str, redis_url: str, secret: str,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_MB * MB) -> None:
        from trainer.compile_artifacts import RedisStore
        from trainer.worker import Worker

        self.config, self.name = config, name
        self.redis = redis.Redis.from_url(redis_url)
        self._secret = secret.encode()
        # The first worker to compile publishes its code; the others, on other machines, load it.
        self.worker = Worker(config, shared_artifacts=RedisStore(self.redis), secret=self._secret)
        self._max_bytes = max_message_bytes
        self.current: int | None = None
        # Set when the worker shuts down (SIGTERM, SIGINT): the job in progress stops at its next step.
        self.stopping = threading.Event()
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
            try:
                self.beat_once()
            except Exception:  # the beat goes on: a worker that stops beating is taken for dead
                log.exception("heartbeat failed")
            self._stop.wait(HEARTBEAT_S)

    def beat_once(self) -> None:
        """Say this worker is alive, and take the adapters to forget: their files go at once, their
        weights when no task uses the engine (now, if the worker is idle, else after the task)."""
        try:
            self.redis.set(worker_key(self.name), wire.dumps({"busy": self.current}), ex=WORKER_TTL_S)
            while (raw := self.redis.lpop(evict_key(self.name))) is not None:
                if len(raw) > MAX_EVICT_KEY_CHARS:
                    log.warning("dropped an eviction that names no adapter")
                    continue
                key = raw.decode(errors="replace")
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
        self.worker.stop_compiling()  # before its scratch files go
        try:
            self.worker.remove_files(folder_too=remove_work_dir)
        finally:
            try:
                self.redis.delete(worker_key(self.name))  # the bot need not wait for it to expire
            except redis.RedisError as exc:
                log.warning("could not remove this worker's heartbeat from Redis: %s", exc)

    def _apply_evictions(self) -> None:
        """Unload forgotten adapters from the engine; only with `_busy` held, when nothing uses them."""
        with self._lock:
            keys, self._evicted = self._evicted, []
        for key in keys:
            self.worker.evict(key)

    # ---- the task ----------------------------------------------------------------------------
    def run(self, message: Any) -> None:
        """The Celery task: one job, then any generation left waiting for this worker's training."""
        job = self._open(message, "job message")
        if job is None:
            return
        with self._busy:
            self._keep_unacked_expiring()
            self._apply_evictions()
            self.current = job.item.job_id
            try:
                self._run_one(job, serve_riders=self.serve_riders)
            finally:
                self.current = None
                self._drain_riders()
                self._apply_evictions()

    def _open(self, frame: Any, what: str) -> wire.SignedJob | None:
        """The job in a frame the bot signed, still valid; None (logged) for anything else."""
        try:
            if not isinstance(frame, str | bytes):
                raise BadFrame("it is not a signed frame")
            job = wire.job_from_frame(frame, self._secret, self._max_bytes)
        except BadFrame as exc:
            log.warning("refused a %s: %s", what, exc)
            return None
        except Exception as exc:  # signed, yet unreadable (a bot of another version?); never its content
            log.warning("refused a %s that could not be read (%s)", what, type(exc).__name__)
            return None
        if job.expires_at < time.time():
            log.warning("job %d: its message expired; dropped", job.item.job_id)
            return None
        return job

    def _keep_unacked_expiring(self) -> None:
        """kombu keeps the message of each task in progress in a hash with no expiry; give it one, so a
        killed worker's message (a person's photos) does not stay there for good."""
        try:
            with self.redis.pipeline() as pipe:
                for key in UNACKED_KEYS:
                    pipe.expire(key, MESSAGE_TTL_S)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not set the expiry of the messages in progress: %s", exc)

    def _run_one(self, job: wire.SignedJob, serve_riders: Callable[[], None] | None = None) -> None:
        item, token = job.item, job.token
        job_id = item.job_id
        if not self._current_attempt(job_id, token):
            log.info("job %d: this message is an old attempt; dropped", job_id)
            return

        def emit(event: Event) -> None:
            frame = wire.envelope_to_frame(wire.Envelope(job_id, token, self.name, event), self._secret)
            with self.redis.pipeline() as pipe:
                pipe.rpush(EVENTS, frame)
                pipe.expire(EVENTS, EVENTS_TTL_S)
                pipe.execute()

        last_poll, cancelled, voided = 0.0, False, False

        def should_cancel() -> bool:
            nonlocal last_poll, cancelled, voided
            if self.stopping.is_set():
                return True
            now = time.monotonic()
            if not cancelled and now - last_poll >= CANCEL_POLL_S:
                last_poll = now
                voided = not self._current_attempt(job_id, token)
                cancelled = voided or bool(self.redis.exists(cancel_key(job_id)))
            return cancelled

        def nobody_waits() -> bool:
            """Stopped for a reason that needs no report: the worker shuts down (the bot learns that from
            its heartbeat), or the bot no longer waits for this attempt (it stopped, or forgot the job)."""
            return self.stopping.is_set() or voided

        emit(Claimed())  # tells the bot which worker runs it, so it notices if this one dies
        if not self.worker.execute(item, emit, should_cancel,
                                   serve_riders=serve_riders if item.kind == "train" else None, stopping=nobody_waits):
            log.info("job %d stopped at its next step: %s", job_id,
                     "this worker is stopping" if self.stopping.is_set() else "the bot no longer waits for it")
            if self.stopping.is_set() and not voided:  # sent again at once, and not as this worker's failure
                emit(WorkerStopped())

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
        """Serve the generations waiting in this worker's rider list; none once it is stopping (the bot
        sends them elsewhere when this worker has gone)."""
        try:
            while not self.stopping.is_set() and (raw := self.redis.lpop(rider_key(self.name))) is not None:
                job = self._open(raw, "waiting generation")
                if job is not None:
                    self._run_one(job)
        except redis.RedisError as exc:  # the training goes on; the bot re-sends what it misses
            log.warning("could not read waiting generations from Redis: %s", exc)

    def _current_attempt(self, job_id: int, token: str) -> bool:
        stored = self.redis.get(token_key(job_id))
        return stored is not None and stored.decode() == token


class StoppedDuringStart(Exception):
    """SIGTERM or SIGINT came while the worker loaded its model or compiled: there is no job to finish."""


@contextmanager
def stopped_by_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise StoppedDuringStart in the block (before Celery's own handlers exist), so
    a worker stopped as it starts still leaves no files behind and exits 0."""

    def stop(_signum: int, _frame: Any) -> None:
        raise StoppedDuringStart()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_for_redis(client: redis.Redis, tries: int = REDIS_START_TRIES) -> None:
    """Return once Redis answers; WorkerFailed (the worker exits non-zero) if it never does."""
    for attempt in range(tries):
        try:
            client.ping()
            return
        except redis.RedisError as exc:
            if attempt == tries - 1:
                raise WorkerFailed(f"Could not reach Redis ({exc}). Start it, or fix REDIS_URL "
                                   "(and its password).") from exc
            time.sleep(1)


def run_celery(app: Celery, name: str, log_level: str) -> int:
    """Celery's worker loop on this worker's queues, until it stops; its exit code."""
    worker = app.Worker(hostname=f"{name}@{socket.gethostname()}", pool_cls="solo", concurrency=1,
                        prefetch_multiplier=1, queues=[SHARED_QUEUE, worker_queue(name)], without_gossip=True,
                        without_mingle=True, without_heartbeat=True, loglevel=log_level)
    worker.start()
    return int(worker.exitcode or 0)


def serve(config: WorkerConfig, redis_url: str, name: str, secret: str, *,
          max_message_bytes: int = DEFAULT_MAX_MESSAGE_MB * MB, remove_work_dir: bool = False) -> None:
    """Run a Celery worker for the bot's jobs in this process until it is stopped; then empty its work
    folder, and remove the folder too with `remove_work_dir` (one made for this worker's name alone).
    WorkerFailed when Redis cannot be reached at start, or Celery stopped on an error."""
    app = make_app(redis_url, max_message_bytes)
    body = CeleryWorker(config, name, redis_url, secret, max_message_bytes)
    try:
        wait_for_redis(body.redis)
    except WorkerFailed:
        body.worker.remove_files(folder_too=remove_work_dir)
        raise

    @app.task(name=TASK)
    def run_job(*args: Any, **kwargs: Any) -> None:  # any arguments: what is not one frame is refused
        body.run(args[0] if len(args) == 1 and not kwargs else None)

    def shutting_down(**_: Any) -> None:  # Celery's SIGTERM and SIGINT handler, on the main thread
        if not body.stopping.is_set():
            log.info("worker %s stopping; a job in progress stops at its next step", name)
        body.stopping.set()

    signals.worker_shutting_down.connect(shutting_down, weak=False)
    try:
        with stopped_by_signals():
            try:
                body.worker.prepare()  # load the model before taking the first job; the rest compiles meanwhile
            except StoppedDuringStart:
                log.info("worker %s stopped during its start", name)
                body.stopping.set()
                return
        body.start_heartbeat()
        log.info("worker %s on %s, queues %s and %s", name, config.device, SHARED_QUEUE, worker_queue(name))
        code = run_celery(app, name, config.log_level)  # Celery handles SIGTERM and SIGINT from here on
    finally:
        signals.worker_shutting_down.disconnect(shutting_down)
        body.stop(remove_work_dir=remove_work_dir)
    if code and not body.stopping.is_set():  # Celery's SIGINT stop says 1; asked to stop is a clean stop
        raise WorkerFailed(f"The worker stopped on an error (exit code {code}); the log above says why.")
    log.info("worker %s stopped", name)
