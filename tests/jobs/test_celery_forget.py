"""/forget reaches Redis and a killed worker's disk: nothing of the person stays in any key, list or hash,
nor in the scratch folder of a worker killed while it held their job."""

from __future__ import annotations

import base64
import signal
from dataclasses import replace

import pytest
import redis

from bot.config import Settings
from bot.scheduler import Scheduler
from jobs import wire
from jobs.celery_protocol import UNACKED_KEYS, rider_key, worker_key, worker_queue
from jobs.celery_runner import CeleryRunner, _Known
from jobs.events import Claimed
from jobs.requests import GenerateRequest
from storage import models_db, photos_db, users_db
from storage.store import Storage
from tests.jobs.test_celery import Observed, add_person
from tests.jobs.worker_process import start_worker
from tests.polling import wait_until
from tests.work_items import JOB_SECRET, generate_item, train_item

pytestmark = pytest.mark.slow

PHOTO_MARKER = b"zq-marker-of-alices-photos-0123456789abcdef"
LORA_MARKER = b"zq-marker-of-bobbys-lora-fedcba9876543210"


def base64_forms(data: bytes) -> set[bytes]:
    """How `data` shows inside base64 text, at any offset there: the characters that depend on it alone."""
    forms = set()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + data)
        forms.add(encoded[-(-8 * offset // 6):-4])
    return forms


def traces(data: bytes) -> set[bytes]:
    """`data` as it is, in base64 (JSON's bytes), and in base64 of that (a Celery task's body)."""
    once = base64_forms(data)
    return {data, *once, *(twice for form in once for twice in base64_forms(form))}


def everything_in(client: redis.Redis) -> list[tuple[bytes, bytes]]:
    """Every key of the Redis database with each value it holds."""
    found = []
    for key in client.scan_iter():
        kind = client.type(key)
        values = (client.lrange(key, 0, -1) if kind == b"list" else
                  [v for pair in client.hgetall(key).items() for v in pair] if kind == b"hash" else
                  client.smembers(key) if kind == b"set" else
                  client.zrange(key, 0, -1) if kind == b"zset" else [client.get(key)])
        found += [(key, value) for value in values]
    return found


def holding(client: redis.Redis, marker: bytes) -> list[bytes]:
    """The keys whose values hold `marker`, in any of its forms."""
    forms = traces(marker)
    return sorted({key for key, value in everything_in(client) if any(form in value for form in forms)})


async def test_forget_removes_a_persons_messages_from_redis_and_a_killed_workers_folder(redis_url, tmp_path):
    """Alice trains on w1; Bobby's picture rides on that training, his LoRA in w1's rider list; w1 is
    killed (kill -9) before the bot notices. /forget for both: no key holds their bytes any more (Alice's
    photos were in kombu's hash of the messages in progress). The next worker to start on the host
    removes w1's folder."""
    release = tmp_path / "release"
    first = start_worker(redis_url, tmp_path / "host", hold=release)  # named <host>-<pid>, as by default
    settings = replace(Settings(), data_dir=tmp_path / "bot", base_model="tiny", job_backend="celery",
                       redis_url=redis_url, job_secret=JOB_SECRET)
    store = await Storage.open(settings.data_dir)
    runner = CeleryRunner(redis_url, JOB_SECRET)
    scheduler = Scheduler(store, runner, settings, Observed())
    try:
        await add_person(store, 1, "zqalice")
        for photo in await photos_db.list_photos(store.db, 1):  # PNG readers skip what follows the end
            with store.files.resolve(photo.path, 1).open("ab") as file:
                file.write(PHOTO_MARKER)
        await users_db.set_handle(store.db, 2, "zqbobby", "person")
        lora = store.files.write(2, "models", b"LORA" + LORA_MARKER + b"LORA", ".safetensors")
        await models_db.add_model(store.db, 2, None, lora, "tiny", {"handle": "zqbobby", "class_word": "person"})
        await scheduler.start()
        w1 = first.default_name
        assert await wait_until(lambda: runner.workers == [w1], timeout=60), first.log
        await scheduler.enqueue_train(1)
        assert await wait_until(lambda: runner._trainings_without_rider() == [w1], timeout=60), first.log
        await scheduler.enqueue_generate(2, GenerateRequest("on the moon", num_images=1))
        assert await wait_until(lambda: runner.redis.llen(rider_key(w1)), timeout=60)

        runner._liveness.cancel()  # the bot has not noticed w1's death yet when the people ask
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
        assert holding(runner.redis, PHOTO_MARKER) == [b"unacked"]
        assert holding(runner.redis, LORA_MARKER) == [rider_key(w1).encode()]
        scratch = tmp_path / "host" / "worker-data" / w1
        (scratch / "work" / "job1-scratch").mkdir()  # as a training leaves its checkpoints
        (scratch / "work" / "job1-scratch" / "checkpoint.safetensors").write_bytes(b"weights")

        await scheduler.forget(1)
        await scheduler.forget(2)
        assert holding(runner.redis, PHOTO_MARKER) == [] and holding(runner.redis, LORA_MARKER) == []
        assert not any(key.startswith(b"avatar:job:") for key, _ in everything_in(runner.redis))  # tokens too

        second = start_worker(redis_url, tmp_path / "host")
        try:
            assert await wait_until(lambda: runner.redis.exists(worker_key(second.default_name)), timeout=60), \
                second.log
            assert not scratch.exists()
            assert (tmp_path / "host" / "worker-data" / second.default_name).is_dir()  # its own stays
        finally:
            second.stop()
    finally:
        release.touch()
        await scheduler.stop()
        await store.close()
        first.stop()


async def test_a_gone_workers_rider_list_and_message_leave_redis_when_the_bot_notices(redis_url, tmp_path):
    """Without any /forget: when a worker's heartbeat stops, its rider list, its own queue and the
    message of the job it ran go at once (the jobs are sent again elsewhere), not hours later."""
    release = tmp_path / "release"
    worker = start_worker(redis_url, tmp_path / "w", "--name", "w1", hold=release)
    runner, lost = CeleryRunner(redis_url, JOB_SECRET), []

    async def on_event(job_id, event):
        lost.append((job_id, event.type))
    runner._on_event = on_event
    client = runner.redis
    try:
        assert await wait_until(lambda: client.exists(worker_key("w1")), timeout=60), worker.log
        await runner._refresh_workers()
        runner._workers["w2"] = _Known(adapters={"model-5"})
        await runner.submit(train_item(1, photos=[PHOTO_MARKER]))
        assert await wait_until(lambda: client.hlen(UNACKED_KEYS[0]), timeout=60), worker.log
        await runner._deliver(wire.Envelope(1, runner._tokens[1], "w1", Claimed()))
        await runner.submit(generate_item(2, key="model-5", lora=LORA_MARKER))  # w2's own queue
        await runner.submit(generate_item(3, key="model-6", lora=LORA_MARKER))  # rides on w1's training
        assert client.llen(rider_key("w1")) == 1 and client.llen(worker_queue("w2")) == 1
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait(10)
        client.delete(worker_key("w1"))  # as its heartbeat expires
        await runner._refresh_workers()
        assert sorted(lost) == [(1, "worker_lost"), (2, "worker_lost"), (3, "worker_lost")]
        assert holding(client, PHOTO_MARKER) == [] and holding(client, LORA_MARKER) == []
    finally:
        release.touch()
        worker.stop()
