"""The Celery and Redis side of the job protocol: queue and key names, lifetimes, the Celery app.

Both sides import this one module: the bot's `jobs.celery_runner` and the workers'
`trainer.celery_worker`. Redis keys (all under `avatar:`):
- `avatar:events` — a list of `{"job_id", "token", "worker", "event"}` the bot pops;
- `avatar:worker:<name>` — a worker's heartbeat, refreshed every second, expiring after a few:
  the bot sees a worker die by its key expiring;
- `avatar:job:<id>:token` — the bot's token for the current attempt of a job. A worker runs a job
  only while its message carries that token, so a message that Redis re-delivers after its worker
  died, or an attempt the bot has since replaced, stops without running to completion twice. The bot
  deletes the token once the attempt ended (done, failed, cancelled, its worker lost), so a message
  re-delivered after that is dropped without running;
- `avatar:cancel:<id>` — set by the bot to cancel a job between steps;
- `avatar:evict:<name>` — LoRA keys this worker must forget (a person asked to be forgotten);
- `avatar:riders:<name>` — generations the bot gave a worker while it trains (riders): the training
  task pops and serves them between its steps, and serves any left when the training ends. Each
  carries its own token like any job.
"""

from __future__ import annotations

from celery import Celery

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
