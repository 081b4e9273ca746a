"""A hostile Redis: whoever can write to it pushes garbage, forged jobs and events, and huge messages.
The worker and the bot drop each (logged), keep serving, and the next real job completes; nothing the
project writes to Redis lasts for ever."""

from __future__ import annotations

import logging

import pytest

from jobs import wire
from jobs.celery_protocol import (
    EVENTS,
    SHARED_QUEUE,
    TASK,
    UNACKED_KEYS,
    cancel_key,
    evict_key,
    rider_key,
    token_key,
    worker_key,
    worker_queue,
)
from jobs.celery_runner import CeleryRunner, _Known
from jobs.events import Claimed, Done, Event
from jobs.payloads import GenerateInputs, GenerateOutput, GenerateParams, Picture, WorkItem
from jobs.requests import GenerateRequest
from jobs.signing import MB, seal
from tests.jobs.worker_process import start_worker
from tests.polling import wait_until
from tests.work_items import JOB_SECRET, generate_item, train_item

pytestmark = pytest.mark.slow

OTHER_SECRET = b"not-the-bots-secret-" + b"x" * 20


async def started(redis_url: str, seen: list[tuple[int, Event]], **kwargs) -> CeleryRunner:
    runner = CeleryRunner(redis_url, JOB_SECRET, **kwargs)

    async def on_event(job_id: int, event: Event) -> None:
        seen.append((job_id, event))
    await runner.start(on_event)
    return runner


async def test_garbage_forged_and_oversize_items_are_dropped_and_the_next_real_job_completes(
        redis_url, caplog, celery_workers):
    """A real worker (the tiny model on the CPU) and the bot's runner."""
    caplog.set_level(logging.INFO, "jobs.celery_runner")
    celery_workers.start("w1", "--max-message-mb", "1")
    seen: list[tuple[int, Event]] = []
    runner = await started(redis_url, seen, max_message_bytes=1 * MB)
    try:
        assert await wait_until(lambda: runner.workers == ["w1"], timeout=300), celery_workers.log("w1")
        queue, client = SHARED_QUEUE, runner.redis
        # The job queue: items kombu could not read, then well-formed task messages the bot did not sign.
        for item in (b"not json", b"[]", b'{"body": 1}', b"{" + b" " * (2 * MB) + b"}"):
            client.lpush(queue, item)
        runner.app.send_task(TASK, args=["not a frame"], queue=queue)
        runner.app.send_task(TASK, args=[seal(OTHER_SECRET, wire.JOB, 5, "{}")], queue=queue)
        runner.app.send_task(TASK, args=["x", "y"], queue=queue)
        runner.app.send_task("some.other.task", args=[], queue=queue)
        # The events list: garbage, an oversize item, and a forged result for a job that the bot runs.
        for item in (b"not json", b"1." + b"0" * 64 + b".{}", b"x" * (2 * MB)):
            client.rpush(EVENTS, item)
        await runner.submit(picture(7))
        forged = wire.Envelope(7, runner._tokens[7], "w1", Done(GenerateOutput([Picture(b"FORGED", 1)])))
        client.rpush(EVENTS, seal(OTHER_SECRET, wire.EVENT, 7, wire.envelope_to_frame(forged, OTHER_SECRET)
                                  .split(".", 2)[2]))

        assert await wait_until(lambda: any(isinstance(e, Done) for _, e in seen), timeout=120), \
            celery_workers.log("w1")
        [done] = [e for _, e in seen if isinstance(e, Done)]
        [image] = done.result.images  # the worker's picture, not the forged one
        assert image.png.startswith(b"\x89PNG") and image.png != b"FORGED"
        assert celery_workers.processes["w1"].poll() is None
        log = celery_workers.log("w1")
        assert log.count("dropped an item of queue avatar.jobs: it is not JSON") == 1
        assert log.count("dropped an item of queue avatar.jobs: it is not a message") == 2
        assert "dropped an item of queue avatar.jobs: it is 2.0 MB, over the cap of 1 MB" in log
        assert log.count("refused a job message: it is not a signed frame") == 2  # also the one of two arguments
        assert "refused a job message: its signature is not valid" in log
        assert "Received unregistered task of type 'some.other.task'" in log  # Celery's own refusal
        assert "raised unexpected" not in log  # no task failed on what it was given
        dropped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropped")]
        assert dropped == ["dropped an item of the events list: it is not a signed frame",
                           "dropped an item of the events list: its signature is not valid (not signed with this "
                           "JOB_SECRET)",
                           "dropped an item of the events list: it is 2.0 MB, over the cap of 1 MB "
                           "(MAX_JOB_MESSAGE_MB)",
                           "dropped an item of the events list: its signature is not valid (not signed with this "
                           "JOB_SECRET)"]
        # Every message was acknowledged: none waits to be delivered again.
        assert client.llen(queue) == 0 and client.hlen(UNACKED_KEYS[0]) == 0

        # And both sides go on.
        await runner.submit(picture(8))
        assert await wait_until(lambda: (8, "done") in [(j, e.type) for j, e in seen], timeout=120), \
            celery_workers.log("w1")
    finally:
        await runner.stop()
        celery_workers.stop()
    assert celery_workers.processes["w1"].returncode == 0, celery_workers.log("w1")


def picture(job_id: int) -> WorkItem:
    """A plain picture, small and quick on the tiny model."""
    return WorkItem(job_id, GenerateParams(GenerateRequest("a lighthouse", num_images=1, steps=4, seed=1)),
                    GenerateInputs())


async def test_every_key_and_list_the_project_writes_expires(redis_url, tmp_path):
    """Scanned while a training runs with a picture riding on it, one more waiting in a worker's own
    queue, an eviction and a cancel pending and events unread: everything has a TTL but kombu's routing
    tables (which hold no one's data and keep no TTL by kombu's design)."""
    release = tmp_path / "release"
    worker = start_worker(redis_url, tmp_path / "w", "--name", "w1", hold=release)
    runner = CeleryRunner(redis_url, JOB_SECRET)  # not started: the events stay on their list
    client = runner.redis
    try:
        assert await wait_until(lambda: client.exists(worker_key("w1")), timeout=60), worker.log
        runner._workers = {"w1": _Known(), "ghost": _Known(adapters={"model-5"})}
        await runner.submit(train_item(1))

        def claimed() -> bool:
            return any(wire.envelope_from_frame(e, JOB_SECRET.encode(), 1 << 30).job_id == 1
                       for e in client.lrange(EVENTS, 0, -1))
        assert await wait_until(claimed, timeout=60), worker.log
        await runner._deliver(wire.Envelope(1, runner._tokens[1], "w1", Claimed()))
        await runner.submit(generate_item(2, key="model-5", lora=b"lora"))  # to ghost's own queue
        await runner.submit(generate_item(3, key="model-5", lora=b"lora"))  # rides on w1's training
        await runner.forget_adapter("model-9")
        await runner.cancel(4)

        keys = {key.decode(errors="replace"): client.ttl(key) for key in client.scan_iter()}
        written = {k: ttl for k, ttl in keys.items() if not k.startswith("_kombu.binding")}
        assert {worker_key("w1"), token_key(1), token_key(2), token_key(3), cancel_key(4), EVENTS, rider_key("w1"),
                worker_queue("ghost"), evict_key("ghost"), *UNACKED_KEYS} <= set(written), sorted(keys)
        assert all(ttl > 0 for ttl in written.values()), written
    finally:
        release.touch()
        worker.stop()
