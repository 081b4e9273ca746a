"""The Celery backend: a real Redis server and real `python -m trainer worker` processes on the CPU.

The bot's scheduler and storage drive a `CeleryRunner`, as with JOB_BACKEND=celery.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, replace

import pytest

from bot.config import Settings
from bot.scheduler import Scheduler, adapter_key
from jobs import events, wire
from jobs.celery_protocol import worker_queue
from jobs.celery_runner import CeleryRunner
from jobs.payloads import GenerateOutput, TrainOutput
from jobs.requests import GenerateRequest
from jobs.signing import DEFAULT_MAX_MESSAGE_MB, MB
from storage import jobs_db
from storage.store import Storage
from tests.e2e.harness import finished_job
from tests.photos_factory import selfie
from tests.polling import wait_until
from tests.work_items import JOB_SECRET, generate_item, train_item

pytestmark = pytest.mark.slow

SECRET, CAP = JOB_SECRET.encode(), DEFAULT_MAX_MESSAGE_MB * MB


def job_frame(item, token: str, expires_in: float = 60.0) -> str:
    """A job as the bot signs it."""
    return wire.job_to_frame(wire.SignedJob(item, token, time.time() + expires_in), SECRET)


def read_job(frame) -> wire.SignedJob:
    return wire.job_from_frame(frame, SECRET, CAP)


def read_event(frame) -> wire.Envelope:
    return wire.envelope_from_frame(frame, SECRET, CAP)


def celery_worker(tmp_path, redis_url: str, name: str = "w9"):
    """The task body of a Celery worker, in this process."""
    from jobs.worker_config import WorkerConfig
    from trainer.celery_worker import CeleryWorker

    return CeleryWorker(WorkerConfig("tiny", "cpu", str(tmp_path / name), str(tmp_path / "c")), name, redis_url,
                        JOB_SECRET)


class Observed:
    """The scheduler's observer: every event per job, in order."""

    def __init__(self) -> None:
        self.events: dict[int, list[dict]] = {}

    async def job_updated(self, job, event) -> None:
        self.events.setdefault(job.id, []).append({**asdict(event), "progress": dict(job.progress)})

    async def job_finished(self, job, outcome) -> None:
        self.events.setdefault(job.id, []).append({"type": "finished", "state": job.state})


async def add_person(store: Storage, user_id: int, handle: str) -> None:
    from bot.photo_intake import accept_photo
    from photos.intake import IntakeLimits
    from storage import users_db

    await users_db.set_handle(store.db, user_id, handle, "person")
    for i in range(5):
        await accept_photo(store, user_id, selfie(i + user_id % 7), f"{i}.jpg", IntakeLimits(), max_photos=30)


@pytest.fixture
async def pool(tmp_path, redis_url, celery_workers):
    settings = replace(Settings(), data_dir=tmp_path / "bot", base_model="tiny", job_backend="celery",
                       redis_url=redis_url, job_secret=JOB_SECRET, train_steps=60, train_resolution=64, train_rank=4,
                       train_learning_rate=1e-3, class_images=2, train_checkpoint_every=4, train_preview_every=0)
    store = await Storage.open(settings.data_dir)
    runner, observed = CeleryRunner(redis_url, JOB_SECRET), Observed()
    scheduler = Scheduler(store, runner, settings, observed)
    for name in ("w1", "w2"):
        celery_workers.start(name)
    await scheduler.start()

    async def both_up():
        return len(runner.workers) == 2
    assert await wait_until(both_up, timeout=120), "the two workers never reported"
    try:
        yield store, runner, scheduler, observed, celery_workers
    finally:
        await scheduler.stop()
        await store.close()


async def test_two_workers_share_the_jobs_and_each_person_gets_their_own_pictures(pool):
    store, runner, scheduler, observed, _ = pool
    await add_person(store, 1, "zqalice")
    await add_person(store, 2, "zqbobby")
    a, _ = await scheduler.enqueue_train(1)
    b, _ = await scheduler.enqueue_train(2)
    a, b = [await wait_until(lambda j=j: finished_job(store, j.id), timeout=300) for j in (a, b)]
    assert (a.state, b.state) == ("succeeded", "succeeded"), (a.error, b.error)
    assert a.started_at < b.finished_at and b.started_at < a.finished_at  # side by side on two workers

    jobs = [(await scheduler.enqueue_generate(user, GenerateRequest("on the moon", num_images=1, seed=5)))[0]
            for user in (1, 2)]
    done = [await wait_until(lambda j=j: finished_job(store, j.id), timeout=120) for j in jobs]
    assert [j.state for j in done] == ["succeeded", "succeeded"]
    from storage import generations_db

    pictures = [await generations_db.get_generation(store.db, j.result["generation_id"]) for j in done]
    assert [p.owner for p in pictures] == [1, 2]
    images = [store.files.read(p.paths[0], p.owner) for p in pictures]
    assert images[0] != images[1]  # same prompt and seed, each with their own LoRA

    # Alice's next picture goes to the worker that already holds her LoRA, without the file.
    key = adapter_key(pictures[0].model_id)
    [holder] = [name for name, known in runner._workers.items() if key in known.adapters]
    sent, send_task = [], runner.app.send_task

    def recording(*args, **kwargs):
        sent.append((kwargs["queue"], read_job(kwargs["args"][0]).item.inputs))
        return send_task(*args, **kwargs)

    runner.app.send_task = recording
    again, _ = await scheduler.enqueue_generate(1, GenerateRequest("on the moon", num_images=1, seed=6))
    assert (await wait_until(lambda: finished_job(store, again.id), timeout=120)).state == "succeeded"
    assert sent[0][0] == worker_queue(holder) and sent[0][1].lora is None


async def test_a_worker_killed_mid_training_hands_the_job_to_the_other_from_its_checkpoint(pool):
    store, runner, scheduler, observed, workers = pool
    await add_person(store, 1, "zqalice")
    job, _ = await scheduler.enqueue_train(1)

    async def checkpointed():
        current = await jobs_db.get_job(store.db, job.id)
        return current if current.checkpoint_path and current.state == "running" else None
    assert await wait_until(checkpointed, timeout=300)
    victim = runner._running_on[job.id]
    workers.kill(victim)

    finished = await wait_until(lambda: finished_job(store, job.id), timeout=300)
    assert finished.state == "succeeded" and finished.attempts == 2, finished.error
    resumed = [e for e in observed.events[job.id] if e.get("detail", "").startswith("resumed at step")]
    assert resumed, "the second attempt did not resume from the checkpoint"
    assert victim not in runner.workers and len(runner.workers) == 1  # its heartbeat stopped


async def test_a_picture_rides_on_a_training_when_every_worker_trains(pool):
    """As with the local runner, /imagine need not wait for someone else's training to end."""
    store, runner, scheduler, observed, _ = pool
    for user, handle in ((1, "zqalice"), (2, "zqbobby"), (3, "zqcarla")):
        await add_person(store, user, handle)
    first, _ = await scheduler.enqueue_train(1)
    assert (await wait_until(lambda: finished_job(store, first.id), timeout=300)).state == "succeeded"
    long = [(await scheduler.enqueue_train(user, steps=5000))[0] for user in (2, 3)]

    async def both_training():
        return len(runner._trainings_without_rider()) == 2
    assert await wait_until(both_training, timeout=120), "the two trainings never started"
    picture, _ = await scheduler.enqueue_generate(1, GenerateRequest("on the moon", num_images=1, seed=5))
    done = await wait_until(lambda: finished_job(store, picture.id), timeout=120)
    assert done.state == "succeeded", done.error
    assert [(await jobs_db.get_job(store.db, j.id)).state for j in long] == ["running", "running"]
    await scheduler.cancel_user_jobs(2)
    await scheduler.cancel_user_jobs(3)


async def test_a_rider_its_training_never_picked_up_is_sent_again_with_a_new_token(redis_url):
    """Bookkeeping of CeleryRunner alone: a training ends before it served the generation given to it."""
    from jobs.celery_protocol import rider_key, token_key
    from jobs.celery_runner import _Known

    runner, seen, sent = CeleryRunner(redis_url, JOB_SECRET), [], []

    async def on_event(job_id, event):
        seen.append((job_id, event.type))
    runner._on_event = on_event
    runner._workers = {"w1": _Known(adapters={"alice"})}
    runner.app.send_task = lambda *args, **kwargs: sent.append((kwargs["queue"], read_job(kwargs["args"][0])))
    assert runner.idle_capacity("train") == 1
    await runner.submit(train_item(1))
    token = runner._tokens[1]
    await runner._deliver(wire.Envelope(1, token, "w1", events.Claimed()))
    assert (runner.idle_capacity("train"), runner.idle_capacity("generate")) == (0, 1)

    await runner.submit(generate_item(2, key="alice", lora=b"file"))
    assert len(sent) == 1 and runner.idle_capacity("generate") == 0  # one rider per training
    rider = read_job(runner.redis.lpop(rider_key("w1")))
    old_token = rider.token
    assert rider.item.inputs.lora is None  # w1 holds Alice's LoRA already

    await runner._deliver(wire.Envelope(1, token, "w1", events.Done(TrainOutput(b"L", None, {}, 1, 0.0))))
    assert seen == [(1, "done")]
    [(queue, again)] = sent[1:]
    new_token = again.token
    # Now through the queues, to the idle worker that holds Alice's LoRA; the old entry's token is void.
    assert again.item.job_id == 2 and queue == worker_queue("w1") and again.item.inputs.lora is None
    assert new_token != old_token and runner.redis.get(token_key(2)).decode() == new_token
    assert runner._riders == {} and runner.idle_capacity("train") == 0


async def test_a_picture_sent_to_a_worker_that_goes_away_before_taking_it_is_reported_lost(redis_url):
    """Bookkeeping of CeleryRunner alone: a generation goes to the own queue of the idle worker that
    holds the person's LoRA; that worker stops before taking it. Nobody else reads that queue, so
    the job must be reported lost (the scheduler sends it again), and the worker's place freed."""
    from jobs.celery_runner import _Known

    runner, seen, sent = CeleryRunner(redis_url, JOB_SECRET), [], []

    async def on_event(job_id, event):
        seen.append((job_id, event.type))
    runner._on_event = on_event
    runner._workers = {"w1": _Known(), "w2": _Known(adapters={"alice"})}
    runner._live_names = lambda: {"w1"}  # w2's heartbeat has expired
    runner.app.send_task = lambda *args, **kwargs: sent.append(kwargs["queue"])
    await runner.submit(generate_item(5, key="alice", lora=b"file"))
    assert sent == [worker_queue("w2")]
    await runner.submit(generate_item(6, key="alice", lora=b"file"))
    assert sent[1] != worker_queue("w2")  # w2 has a job waiting for it already
    await runner._refresh_workers()
    assert seen == [(5, "worker_lost")]
    assert 5 not in runner._tokens and runner.workers == ["w1"]


def test_an_idle_worker_unloads_a_forgotten_persons_lora_at_its_next_heartbeat(redis_url, tmp_path):
    """After /forget, a worker with no task to run must not keep the person's weights loaded until its
    next task; a worker in a task unloads them once the task ends (the engine is busy meanwhile)."""
    from jobs.celery_protocol import evict_key

    worker = celery_worker(tmp_path, redis_url)
    unloaded: list[str] = []
    worker.worker.evict = unloaded.append
    worker.worker.adapter_file("model-7").write_bytes(b"lora")
    worker.redis.rpush(evict_key("w9"), "model-7")
    worker.beat_once()
    assert unloaded == ["model-7"] and not worker.worker.adapter_file("model-7").exists()

    with worker._busy:  # a task is running
        worker.worker.adapter_file("model-8").write_bytes(b"lora")
        worker.redis.rpush(evict_key("w9"), "model-8")
        worker.beat_once()
        assert unloaded == ["model-7"] and not worker.worker.adapter_file("model-8").exists()
    worker.beat_once()
    assert unloaded == ["model-7", "model-8"]
    worker.stop()


async def test_an_attempt_that_ended_is_void_for_a_worker_that_gets_its_message_later(redis_url, tmp_path):
    """Redis re-delivers an unacknowledged message hours later (its worker died, even after reporting):
    whether the job was done, failed, cancelled or lost its worker, the bot has voided the attempt's
    token by then, so the worker that gets the message drops it without running it. So is a job
    cancelled while queued (no attempt in flight here: one from before a restart, say)."""
    from jobs.celery_protocol import EVENTS, token_key
    from jobs.celery_runner import _Known

    runner, sent = CeleryRunner(redis_url, JOB_SECRET), []

    async def on_event(job_id, event):
        pass
    runner._on_event = on_event
    runner._workers = {"w1": _Known()}
    runner.app.send_task = lambda *args, **kwargs: sent.append(kwargs["args"])
    endings = {1: events.Done(GenerateOutput([])), 2: events.Error("x", "internal"),
               3: events.Error("The job was cancelled.", "cancelled")}
    for job_id, ending in endings.items():
        await runner.submit(generate_item(job_id))
        token = runner._tokens[job_id]
        await runner._deliver(wire.Envelope(job_id, token, "w1", events.Claimed()))
        await runner._deliver(wire.Envelope(job_id, token, "w1", ending))
    await runner.submit(train_item(4))
    await runner._deliver(wire.Envelope(4, runner._tokens[4], "w1", events.Claimed()))
    runner._live_names = lambda: set()  # w1's heartbeat expired
    await runner._refresh_workers()
    runner.redis.set(token_key(5), "from-before-a-restart")
    sent.append([job_frame(train_item(5), "from-before-a-restart")])
    await runner.cancel(5)  # the scheduler cancels a queued job
    assert [runner.redis.get(token_key(j)) for j in (1, 2, 3, 4)] == [None] * 4

    worker = celery_worker(tmp_path, redis_url)
    ran: list[int] = []
    worker.worker.run = lambda item, *args, **kwargs: ran.append(item.job_id)
    for [frame] in sent:
        worker.run(frame)
    assert ran == []
    assert [read_event(e).event.type for e in runner.redis.lrange(EVENTS, 0, -1)] == ["claimed", "error"]
    worker.stop()


def test_a_forgotten_persons_lora_is_unloaded_between_the_steps_of_a_training(redis_url, tmp_path):
    """A training may last an hour: the LoRA of a person who asks to be forgotten meanwhile must not stay
    loaded on the GPU until it ends."""
    from jobs.celery_protocol import evict_key, token_key

    worker = celery_worker(tmp_path, redis_url)
    unloaded: list[str] = []
    worker.worker.evict = unloaded.append
    loaded_during_training: list[list[str]] = []

    def training(item, emit, should_cancel, serve_riders=None, **kwargs):
        worker.redis.rpush(evict_key("w9"), "model-7")  # the person asks to be forgotten
        worker.beat_once()  # the heartbeat takes the eviction; the engine is busy with the training
        serve_riders()
        loaded_during_training.append(list(unloaded))
        return True

    worker.worker.execute = training
    worker.redis.set(token_key(1), "t1")
    worker.run(job_frame(train_item(1), "t1"))
    assert loaded_during_training == [["model-7"]] and unloaded == ["model-7"]
    worker.stop()


def test_a_worker_leaves_no_ones_files_behind_when_it_stops(redis_url, tmp_path, monkeypatch):
    """A worker without --work-dir gets a folder of its own name (host and process id by default), which
    no later run clears: when it stops, the folder goes with the cached LoRA files in it. With
    --work-dir, the work folder is emptied. The class image cache (no one's data) stays."""
    from trainer import celery_worker, cli
    from trainer.celery_worker import default_name
    from trainer.worker import Worker

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compiled"))
    monkeypatch.setenv("JOB_SECRET", JOB_SECRET)
    monkeypatch.setattr(Worker, "prepare", lambda self, on_part=None: None)

    def serve_until_stopped(app, name, log_level):  # instead of Celery's loop: a job caches a person's LoRA
        [adapters] = [p for p in tmp_path.rglob("adapters") if p.is_dir()]
        (adapters / "alice.safetensors").write_bytes(b"lora")
        (adapters.parent / "job9-scratch").mkdir()
        return 0
    monkeypatch.setattr(celery_worker, "run_celery", serve_until_stopped)
    class_cache = tmp_path / "class-cache"
    class_cache.mkdir()
    (class_cache / "class-0.png").write_bytes(b"png")
    common = ["worker", "--redis-url", redis_url, "--model", "tiny", "--device", "cpu",
              "--class-cache", str(class_cache), "--compile-cache", str(tmp_path / "compiled")]

    assert cli.run(common) == [f"worker {default_name()} stopped"]
    assert list((tmp_path / "worker-data").iterdir()) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the operator's")
    monkeypatch.setenv("JOB_SECRET", JOB_SECRET)  # the first run took it out of the environment
    cli.run([*common, "--name", "gpu1", "--work-dir", str(tmp_path / "mine")])
    assert list((tmp_path / "mine" / "work").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt", "work"]  # its lock file went
    assert list(class_cache.iterdir()) == [class_cache / "class-0.png"]


async def test_a_jobs_message_names_the_job_not_its_prompt(redis_url):
    """The message's headers (`argsrepr`, which Celery's log lines and monitoring tools show) say which
    job it is; the prompt, handle and token travel only in its body."""
    import base64
    import json

    from jobs.celery_protocol import SHARED_QUEUE

    runner = CeleryRunner(redis_url, JOB_SECRET)
    await runner.submit(generate_item(7, prompt="zqalice on the moon", handle="zqalice"))
    message = json.loads(runner.redis.lpop(SHARED_QUEUE))
    headers = json.dumps(message["headers"])
    assert message["headers"]["argsrepr"] == "<job 7>"
    assert "zqalice" not in headers and runner._tokens[7] not in headers
    assert b"zqalice" in base64.b64decode(message["body"])  # the worker still gets the job whole


async def test_a_worker_at_debug_level_logs_no_prompt_and_takes_its_folder_away_when_stopped(redis_url, tmp_path):
    """`python -m trainer --log-level DEBUG worker`, run as an operator does (no name, no work folder
    given), the GPU work left out: Celery's debug lines would show each job's message; the worker's log
    must not. Stopped (SIGTERM), it leaves no folder of its own behind."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from jobs.celery_protocol import EVENTS, worker_key

    script = ("import sys\n"
              "from trainer.worker import Worker\n"
              "Worker.prepare = lambda self, on_part=None: None\n"
              "from jobs.payloads import GenerateOutput\n"
              "Worker.run = lambda self, item, *args, **kwargs: GenerateOutput([])\n"
              "from trainer.__main__ import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "compiled"), "JOB_SECRET": JOB_SECRET}
    log_file = tmp_path / "worker.log"
    with log_file.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", script, "--log-level", "DEBUG", "worker", "--redis-url", redis_url,
             "--model", "tiny", "--device", "cpu", "--class-cache", str(tmp_path / "class-cache"),
             "--compile-cache", str(tmp_path / "compiled")], cwd=tmp_path, env=env, stdout=log, stderr=log)
    runner = CeleryRunner(redis_url, JOB_SECRET)
    try:
        async def up():
            return list(runner.redis.scan_iter(match=worker_key("*")))
        assert await wait_until(up), log_file.read_text()
        await runner.submit(generate_item(7, prompt="zqalice on the moon", handle="zqalice"))

        async def done():
            return any(read_event(e).event.type == "done" for e in runner.redis.lrange(EVENTS, 0, -1))
        assert await wait_until(done), log_file.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    written = log_file.read_text()
    assert "Task avatar.run_job[" in written and "zqalice" not in written and runner._tokens[7] not in written
    # Nor any debug line of Celery's or kombu's: one shows the job's message whole, cut at 1,024 characters.
    assert not re.search(r"DEBUG +\S+ (celery|kombu)\b", written)
    assert process.returncode == 0 and list((tmp_path / "worker-data").iterdir()) == []


async def test_a_job_no_worker_took_in_time_is_lost_one_too_large_is_never_sent_and_a_stop_voids_the_rest(
        redis_url):
    """A message expires after MESSAGE_TTL_S (Celery drops it unread then): the bot reports such a job
    lost, so the scheduler sends it again. A job whose message would be over the workers' cap fails
    here instead of never reaching one. Stopping voids every attempt in flight."""
    from jobs.celery_protocol import MESSAGE_TTL_S, token_key
    from jobs.celery_runner import JobTooLarge, _Known

    runner, seen, sent = CeleryRunner(redis_url, JOB_SECRET, max_message_bytes=64 * 1024), [], []

    async def on_event(job_id, event):
        seen.append((job_id, event.type))
    runner._on_event = on_event
    runner._workers = {"w1": _Known(), "w2": _Known()}
    runner._live_names = lambda: {"w1", "w2"}
    runner.app.send_task = lambda *args, **kwargs: sent.append(kwargs)
    await runner.submit(generate_item(1))
    await runner.submit(generate_item(2))
    assert [k["expires"] for k in sent] == [MESSAGE_TTL_S] * 2
    assert [k["task_id"].split("-")[:2] for k in sent] == [["job", "1"], ["job", "2"]]
    runner._sent_at[1] -= MESSAGE_TTL_S + 1
    await runner._refresh_workers()
    assert seen == [(1, "worker_lost")] and list(runner._tokens) == [2] and not runner.redis.exists(token_key(1))

    with pytest.raises(JobTooLarge):
        await runner.submit(train_item(3, photos=[b"x" * 60_000]))
    assert len(sent) == 2 and 3 not in runner._tokens and not runner.redis.exists(token_key(3))

    await runner.stop()
    assert runner._tokens == {} and not runner.redis.exists(token_key(2))  # its worker drops it, or stops it
