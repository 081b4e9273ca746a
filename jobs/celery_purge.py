"""Finding and deleting jobs' messages in Redis: a person asked to be forgotten, or a worker is gone.

A job's bytes (photos, LoRA, checkpoint, pictures) may wait in Redis in four places: a Celery queue
(`avatar.jobs`, `avatar.worker.<name>`), kombu's hash of the messages workers have taken (`unacked`,
which keeps a killed worker's until the visibility timeout), a worker's rider list, and the events
list. Each entry is found by the job id it names in the clear (a task's id, a signed frame's head:
`jobs.celery_protocol`, `jobs.signing`), so nothing needs decoding.
"""

from __future__ import annotations

from typing import Any

import redis

from jobs.celery_protocol import (
    EVENTS,
    QUEUES_MATCH,
    UNACKED_KEYS,
    evict_key,
    job_of_message,
    rider_key,
    token_key,
    worker_queue,
)
from jobs.signing import job_id_of

_LIST = b"list"


def _job_of(item: Any) -> int | None:
    """The job an entry of a list belongs to: a signed frame (rider, event) or a task message."""
    job_id = job_id_of(item)
    return job_id if job_id is not None else job_of_message(item)


def _lists(client: redis.Redis) -> list[bytes]:
    """Every list a job's message may wait in (kombu names a queue's priority levels `<queue>\\x06\\x16<n>`)."""
    keys = {*client.scan_iter(match=QUEUES_MATCH), *client.scan_iter(match=rider_key("*")), EVENTS.encode()}
    return [key for key in keys if client.type(key) == _LIST]


def purge_jobs(client: redis.Redis, job_ids: set[int]) -> int:
    """Delete every message of `job_ids` that Redis holds, and their tokens; return how many went."""
    if not job_ids:
        return 0
    removed = 0
    for key in _lists(client):
        for item in client.lrange(key, 0, -1):
            if _job_of(item) in job_ids:
                removed += client.lrem(key, 1, item)  # type: ignore[arg-type]  # bytes, as LRANGE gave it
    unacked, index = UNACKED_KEYS
    for tag, message in client.hscan_iter(unacked):
        if job_of_message(message) in job_ids:
            with client.pipeline() as pipe:
                pipe.hdel(unacked, tag)
                pipe.zrem(index, tag)
                removed += pipe.execute()[0]
    client.delete(*(token_key(job_id) for job_id in job_ids))
    return removed


def remove_worker_lists(client: redis.Redis, name: str) -> None:
    """A gone worker's own queue, rider list and evictions: nobody else reads them."""
    client.delete(worker_queue(name), rider_key(name), evict_key(name))
