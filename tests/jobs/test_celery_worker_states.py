"""What the Celery runner tells the operator of its workers: the live ones, and the jobs meant for each."""

from __future__ import annotations

import asyncio

from jobs import wire
from jobs.celery_protocol import worker_key
from jobs.celery_runner import CeleryRunner
from jobs.events import Claimed, Done
from jobs.payloads import GenerateOutput
from tests.work_items import JOB_SECRET, generate_item, train_item


async def test_each_live_worker_is_listed_with_the_jobs_it_took_or_that_wait_in_its_own_queue(redis_url):
    runner = CeleryRunner(redis_url, JOB_SECRET)  # not started: the test plays the heartbeats and events
    runner._on_event = lambda job_id, event: asyncio.sleep(0)
    for name in ("w1", "w2"):
        runner.redis.set(worker_key(name), 1, ex=60)
    await runner._refresh_workers()
    assert [(w.name, w.where, w.state, w.jobs) for w in runner.worker_states()] == [
        ("w1", "remote", "idle", ()), ("w2", "remote", "idle", ())]

    await runner.submit(train_item(1))  # to the shared queue: no worker's yet
    assert all(w.jobs == () for w in runner.worker_states())
    await runner._deliver(wire.Envelope(1, runner._tokens[1], "w1", Claimed()))
    runner._workers["w2"].adapters.add("model-5")
    await runner.submit(generate_item(2, key="model-5", lora=b"lora"))  # to w2's own queue
    assert [(w.name, w.state, w.jobs) for w in runner.worker_states()] == [("w1", "busy", (1,)), ("w2", "busy", (2,))]

    await runner._deliver(wire.Envelope(1, runner._tokens[1], "w1", Done(GenerateOutput([]))))
    runner.redis.delete(worker_key("w2"))
    await runner._refresh_workers()  # w2 is gone, and its job with it
    assert [(w.name, w.state, w.jobs) for w in runner.worker_states()] == [("w1", "idle", ())]
