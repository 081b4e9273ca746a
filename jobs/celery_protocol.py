"""The Celery and Redis side of the job protocol: queue and key names, lifetimes, the Celery app.

Both sides import this one module: the bot's `jobs.celery_runner` and the workers'
`trainer.celery_worker`. Redis keys (all under `avatar:`):
- `avatar.jobs` and `avatar.worker.<name>` — Celery's queues (the shared one, and each worker's own);
  kombu keeps a message a worker has taken, until the task ends, in the hash `unacked` (indexed in
  the sorted set `unacked_index`). A task's id names its job (`job-<id>-<random>`), so the bot can
  find a job's messages there;
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

Jobs, riders and events are frames signed with the shared JOB_SECRET (`jobs.signing`): write access
to Redis alone neither runs a job nor finishes one. Every message carries its expiry, and every key and
list the project writes has a TTL (kombu's own routing tables, `_kombu.binding*`, which hold no one's
data, keep none by kombu's design), so nothing personal outlives its use by long even if no one
deletes it; the bot deletes what it can sooner (a lost worker's lists, a forgotten person's messages).
"""

from __future__ import annotations

import re
import ssl
import uuid

from celery import Celery

from jobs.celery_transport import MAX_MESSAGE_BYTES_OPTION
from jobs.signing import DEFAULT_MAX_MESSAGE_MB, MB

TASK = "avatar.run_job"
SHARED_QUEUE = "avatar.jobs"
QUEUES_MATCH = "avatar.*"  # the shared queue and every worker's own (`worker_queue`)
EVENTS = "avatar:events"
HEARTBEAT_S = 1.0
WORKER_TTL_S = 5  # a worker silent this long is taken for dead
TOKEN_TTL_S = 7 * 24 * 3600
# Redis re-delivers an unacknowledged job after this long; longer than the longest training, so a
# job is re-delivered only when its worker died (the bot has usually re-queued it long before).
VISIBILITY_TIMEOUT_S = 6 * 3600
# How long a job's message is valid: a worker drops one older than this (a re-delivery after its
# worker died, say; the bot has sent the job again by then), and the queues and rider lists expire
# this long after their last message. The bot reports a job no worker took in this time as lost.
MESSAGE_TTL_S = VISIBILITY_TIMEOUT_S
EVENTS_TTL_S = 3600  # events the bot did not read this long after the last are of no use to it
EVICT_TTL_S = 3600  # a live worker takes its evictions within a second
UNACKED_KEYS = ("unacked", "unacked_index")  # kombu's names (Redis transport), where workers' jobs wait
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


def new_task_id(job_id: int) -> str:
    """A Celery task id that names its job (and nothing secret: Celery logs task ids)."""
    return f"job-{job_id}-{uuid.uuid4().hex[:12]}"


# The task id in a kombu message as JSON (a queue's item, or an `unacked` entry): the body is base64,
# so the only `"id": "job-` in a message is its header's.
_TASK_JOB_ID = re.compile(rb'"id": ?"job-(\d+)-')


def job_of_message(raw: bytes) -> int | None:
    """The job id of a task message as Redis holds it; None for anything else."""
    found = _TASK_JOB_ID.search(raw)
    return int(found.group(1)) if found else None


def make_app(redis_url: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_MB * MB) -> Celery:
    """The Celery app both sides use, with the settings long GPU jobs need. `max_message_bytes`: a
    worker drops a larger message without decoding it (`jobs.celery_transport`)."""
    app = Celery("avatar", broker=redis_url)
    app.conf.update(
        task_serializer="json", accept_content=["json"], task_default_queue=SHARED_QUEUE,
        task_acks_late=True,  # acknowledged when done: a worker that dies leaves its job in Redis
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a busy worker holds no other job hostage
        broker_transport="jobs.celery_transport:Transport",
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S,
                                  MAX_MESSAGE_BYTES_OPTION: max_message_bytes},
        # The transport is named, not taken from the URL's scheme, so a rediss:// URL must ask for TLS
        # itself: with the certificate checked (ssl_* parameters in the URL take this one's place).
        broker_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED} if redis_url.startswith("rediss://") else False,
        broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
        task_ignore_result=True,
        # Nothing is run by broadcast: Redis's pub/sub would otherwise let anyone who can write to it
        # stop workers or revoke jobs, and an item that is not JSON there stops a worker.
        worker_enable_remote_control=False,
    )
    return app
