"""How the local runner lays workers out over the devices of one host, and what a worker process
tells the jobs it is sent."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
import threading
import time

import pytest

from jobs import events
from jobs.commands import Command, Run, Stop
from jobs.devices import NoSuchDevice, cpu_threads_per_worker, visible_devices
from jobs.local_runner import LocalProcessRunner
from jobs.payloads import GenerateOutput, WorkItem
from jobs.worker_config import WorkerConfig
from tests.polling import wait_until
from tests.work_items import generate_item, train_item
from trainer.start_news import (
    FIRST_PART,
    GPU_START_TAKES,
    OTHER_START_TAKES,
    STARTING_DETAIL,
    starting_detail,
)


def test_cpu_workers_share_the_cores_and_gpu_workers_keep_torch_defaults(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cpu_threads_per_worker(["cpu", "cpu"]) == 8
    assert cpu_threads_per_worker(["cpu"] * 32) == 1
    assert cpu_threads_per_worker(["cpu"]) == 0
    assert cpu_threads_per_worker(["cuda:0", "cuda:1"]) == 0


def test_cpu_workers_share_only_the_cores_the_process_is_pinned_to(monkeypatch):
    """A container given 4 of a 64-core host's cores: two CPU workers get 2 threads each, not 32."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {8, 9, 10, 11})
    assert cpu_threads_per_worker(["cpu", "cpu"]) == 2
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS and Windows have no affinity call
    assert cpu_threads_per_worker(["cpu", "cpu"]) == 32


def test_one_worker_per_visible_gpu_or_the_requested_number_of_cpu_workers(monkeypatch):
    monkeypatch.setattr("jobs.devices._cuda_device_count", lambda: 2)
    assert visible_devices("auto", 0) == ["cuda:0", "cuda:1"]
    assert visible_devices("cuda", 1) == ["cuda:0"]
    assert visible_devices("cpu", 2) == ["cpu", "cpu"]
    assert visible_devices("cuda:1", 0) == ["cuda:1"]
    with pytest.raises(NoSuchDevice, match=r"DEVICE=cuda:2, but this machine shows 2 GPUs, numbered from 0"):
        visible_devices("cuda:2", 0)  # every job on it would fail
    monkeypatch.setattr("jobs.devices._cuda_device_count", lambda: 0)
    assert visible_devices("auto", 0) == ["cpu"]
    with pytest.raises(NoSuchDevice, match="shows no GPU"):
        visible_devices("cuda:0", 0)


@pytest.mark.skipif(sys.platform == "darwin", reason="an Apple machine may well have MPS")
def test_mps_is_refused_at_start_on_a_machine_without_it(monkeypatch):
    """Asked in a child process, as the bot's own process never imports torch; every job on a
    missing device would fail."""
    with pytest.raises(NoSuchDevice, match="DEVICE=mps, but this machine shows no Apple GPU"):
        visible_devices("mps", 0)
    monkeypatch.setattr("jobs.devices._ask_torch", lambda question: question == "has_mps")
    assert visible_devices("mps", 2) == ["mps", "mps"]


class Pipe:
    """Stands in for a worker's command pipe."""

    def __init__(self) -> None:
        self.sent: list[Command] = []

    def send(self, message: Command) -> None:
        self.sent.append(message)


def pool(n: int) -> LocalProcessRunner:
    """A runner whose slots look started, without starting processes (placement logic only)."""
    runner = LocalProcessRunner([WorkerConfig("tiny", "cpu", f"/tmp/w{i}", "/tmp/c") for i in range(n)])
    for slot in runner._slots:
        slot.process, slot.commands = object(), Pipe()
    return runner


def item(job_id: int, kind: str, key: str | None = None) -> WorkItem:
    return train_item(job_id) if kind == "train" else generate_item(job_id, key=key, lora=b"L" if key else None)


async def place(runner: LocalProcessRunner, work: WorkItem) -> int:
    await runner.submit(work)
    return runner.slot_of(work.job_id)


async def finish(runner: LocalProcessRunner, job_id: int) -> None:
    slot = runner._slots[runner.slot_of(job_id)]
    runner._on_event = lambda *args: asyncio.sleep(0)
    await runner._deliver(slot, job_id, events.Done(GenerateOutput([])))


async def test_generations_ride_along_trainings_spread_over_them_and_trainings_need_a_free_worker():
    runner = pool(2)
    assert (runner.idle_capacity("train"), runner.idle_capacity("generate")) == (2, 2)
    assert await place(runner, item(1, "train")) == 0
    assert await place(runner, item(2, "train")) == 1
    assert (runner.idle_capacity("train"), runner.idle_capacity("generate")) == (0, 2)
    with pytest.raises(RuntimeError):
        await runner.submit(item(3, "train"))
    runner._slots[1].adapters.add("model-7")
    held = item(4, "generate", "model-7")
    assert await place(runner, held) == 1  # the worker that holds the LoRA, which is not sent again
    assert runner._slots[1].commands.sent[-1] == Run(held.without_lora())
    assert runner.idle_capacity("generate") == 1  # one generation per training at a time
    await finish(runner, 4)
    assert runner.idle_capacity("generate") == 2
    assert await place(runner, item(5, "generate", "model-7")) == 0  # that training has had fewer
    assert runner.idle_capacity() == 1
    await finish(runner, 1)  # the training ends; its rider still runs there
    assert runner.idle_capacity("train") == 1 and runner.slot_of(5) == 0


def test_workers_are_online_once_started():
    runner = LocalProcessRunner([WorkerConfig("tiny", "cpu", f"/tmp/w{i}", "/tmp/c") for i in range(2)])
    assert runner.workers_online() == 0
    assert pool(2).workers_online() == 2


async def test_a_free_worker_is_preferred_to_riding_along_a_training():
    runner = pool(2)
    await place(runner, item(1, "train"))
    assert await place(runner, item(2, "generate")) == 1
    assert await place(runner, item(3, "generate")) == 0
    assert [m.item.job_id for m in runner._slots[0].commands.sent] == [1, 3]


def test_a_worker_keeps_compiled_kernels_in_its_cache_folder_and_passes_the_compile_setting_on(
        monkeypatch, tmp_path):
    from trainer import engine
    from trainer.worker import Worker

    made: list[dict] = []
    monkeypatch.setattr(engine, "GenerationEngine", lambda pipe, **options: made.append(options) or pipe)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    for compile_generation, static_shapes, expected in ((True, True, None), (False, True, False),
                                                        (True, False, None)):
        worker = Worker(WorkerConfig("tiny", "cpu", str(tmp_path / "w"), str(tmp_path / "c"),
                                     compile_generation=compile_generation, compile_static_shapes=static_shapes,
                                     compile_cache_dir=str(tmp_path / "compiled")))
        worker._pipeline = "pipe"
        assert worker.engine == "pipe"
        assert made[-1]["compile_blocks"] is expected  # None: wherever it pays (a GPU with graphs)
        assert made[-1]["static_shapes"] is static_shapes
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compiled")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/operators/choice")
    Worker(WorkerConfig("tiny", "cpu", str(tmp_path / "w"), str(tmp_path / "c"), compile_cache_dir="/elsewhere"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/operators/choice"


def test_failures_a_person_cannot_mend_are_told_plainly_and_detailed_in_the_log(caplog):
    import torch

    from trainer.errors import ModelUnavailable
    from trainer.failures import describe_failure

    unavailable = describe_failure(ModelUnavailable("The model folder /srv/models/sd15 does not exist."))
    assert unavailable.code == "model_unavailable" and "/srv/models" not in unavailable.message
    assert "operator" in unavailable.message and "/srv/models/sd15" in caplog.text
    oom = describe_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert oom.code == "out_of_memory" and "TRAIN_RESOLUTION" not in oom.message
    unexpected = describe_failure(KeyError("unet"))
    assert unexpected.code == "internal" and "KeyError" not in unexpected.message


def test_a_new_worker_removes_what_a_killed_one_left_in_its_folder(tmp_path):
    """A worker killed mid-training (OOM killer, power cut) leaves the person's checkpoint and LoRA in
    its scratch folder; the next worker on that folder removes them, and leaves other folders alone."""
    from trainer.worker import Worker

    work = tmp_path / "w"
    (work / "job7-abc" / "out").mkdir(parents=True)
    (work / "job7-abc" / "out" / "zqalice_kohya.safetensors").write_bytes(b"lora")
    (work / "adapters").mkdir()
    (work / "adapters" / "model-3.safetensors").write_bytes(b"lora")
    (work / "stray.tmp").write_bytes(b"x")
    (tmp_path / "classes").mkdir()
    (tmp_path / "classes" / "woman-0.png").write_bytes(b"png")
    worker = Worker(WorkerConfig("tiny", "cpu", str(work), str(tmp_path / "classes")))
    assert [p.relative_to(work).as_posix() for p in work.rglob("*")] == ["adapters"]
    assert worker._adapter_files.is_dir() and (tmp_path / "classes" / "woman-0.png").exists()


def test_a_job_sent_while_its_worker_starts_up_is_told_so_and_runs_once_the_worker_is_ready(
        monkeypatch, tmp_path):
    from jobs import events
    from trainer import worker_process as worker_module

    compiling, next_part, ready = threading.Event(), threading.Event(), threading.Event()

    def prepare(self, on_part):  # a start of two parts, each going on until the test moves it along
        on_part("compiling the first part")
        compiling.set()
        next_part.wait(30)
        on_part("compiling the second part")
        ready.wait(30)

    monkeypatch.setattr(worker_module, "setup_logging", lambda level: None)  # keep the test's logging
    monkeypatch.setattr(worker_module.Worker, "prepare", prepare)
    monkeypatch.setattr(worker_module, "end_process", lambda: None)  # this worker is a thread of the tests

    def execute(self, work, emit, should_cancel, serve_riders=None, *, stopping=lambda: False):
        emit(events.Done({"ran": work.job_id}))
        return True

    monkeypatch.setattr(worker_module.Worker, "execute", execute)
    bot_commands, worker_commands = multiprocessing.Pipe()
    bot_events, worker_events = multiprocessing.Pipe()
    config = WorkerConfig("tiny", "cpu", str(tmp_path / "w"), str(tmp_path / "c"))
    process = threading.Thread(target=worker_module.process_main, args=(worker_commands, worker_events, config))
    process.start()

    def next_event() -> tuple[int, dict]:
        assert bot_events.poll(30), "the worker sent nothing"
        return bot_events.recv()

    def starting(part: str) -> dict:
        return events.Stage("loading_model", worker_module.starting_detail(part, 0.0, OTHER_START_TAKES))  # a CPU worker's words

    try:
        assert compiling.wait(30)
        bot_commands.send(Run(item(1, "generate")))
        assert next_event() == (1, starting("compiling the first part"))
        assert not bot_events.poll(0.2)  # it waits for the start to finish
        next_part.set()
        assert next_event() == (1, starting("compiling the second part"))  # the waiting job hears the news
        assert not bot_events.poll(0.2)
        ready.set()
        assert next_event() == (1, events.Done({"ran": 1}))
        bot_commands.send(Run(item(2, "generate")))
        assert next_event() == (2, events.Done({"ran": 2}))  # started: nothing more to explain
    finally:
        next_part.set()
        ready.set()
        bot_commands.send(Stop())
        process.join(30)
    assert not process.is_alive()


def test_jobs_waiting_on_a_start_hear_its_news_again_until_it_ends(monkeypatch, tmp_path):
    """A part can take minutes: its news is retold every START_NEWS_EVERY_S, so the minutes shown
    move, and stops with the start, before the job's own events."""
    from jobs import events
    from trainer import worker_process as worker_module

    compiling, ready = threading.Event(), threading.Event()

    def prepare(self, on_part):
        on_part("compiling the only part")
        compiling.set()
        ready.wait(30)

    monkeypatch.setattr(worker_module, "setup_logging", lambda level: None)
    monkeypatch.setattr(worker_module, "START_NEWS_EVERY_S", 0.05)
    monkeypatch.setattr(worker_module.Worker, "prepare", prepare)
    monkeypatch.setattr(worker_module, "end_process", lambda: None)
    monkeypatch.setattr(worker_module.Worker, "execute",
                        lambda self, work, emit, *args, **kwargs: emit(events.Done({"ran": work.job_id})) or True)
    bot_commands, worker_commands = multiprocessing.Pipe()
    bot_events, worker_events = multiprocessing.Pipe()
    config = WorkerConfig("tiny", "cpu", str(tmp_path / "w"), str(tmp_path / "c"))
    process = threading.Thread(target=worker_module.process_main, args=(worker_commands, worker_events, config))
    process.start()
    news = events.Stage("loading_model", worker_module.starting_detail("compiling the only part", 0.0,
                                                                             OTHER_START_TAKES))
    try:
        assert compiling.wait(30)
        bot_commands.send(Run(item(1, "generate")))
        heard = []
        while len(heard) < 4:
            assert bot_events.poll(30), "the worker sent nothing"
            heard.append(bot_events.recv())
        assert heard == [(1, news)] * 4  # told on arrival, then again and again
        ready.set()
        while (event := bot_events.recv()) == (1, news):
            pass  # retold before the start ended
        assert event == (1, events.Done({"ran": 1}))
        assert not bot_events.poll(0.3)  # nothing about the start once it has ended
    finally:
        ready.set()
        bot_commands.send(Stop())
        process.join(30)
    assert not process.is_alive()


def test_a_start_says_what_it_is_doing_and_for_how_long():
    takes = GPU_START_TAKES
    assert starting_detail("compiling the training step", 59.0, takes) == (
        f"{STARTING_DETAIL}: compiling the training step, just begun; {takes}")
    assert starting_detail("compiling the training step", 61.0, takes).endswith(f"step, 1 min in; {takes}")
    assert starting_detail("loading the base model", 17 * 60 + 5, takes).startswith(
        f"{STARTING_DETAIL}: loading the base model, 17 min in;")


def test_a_start_speaks_of_the_device_it_is_on():
    """GPU start times are for CUDA workers, which compile; elsewhere a start is the model's load."""
    from trainer.start_news import start_takes

    assert start_takes("cuda:1") == GPU_START_TAKES and "GPU" in GPU_START_TAKES
    assert start_takes("cpu") == start_takes("mps") == OTHER_START_TAKES and "GPU" not in OTHER_START_TAKES


def _worker_with_a_long_start(commands, events, config) -> None:
    """A worker process whose start compiles for two minutes (run in a spawned process)."""
    from trainer import worker_process as worker_module

    worker_module.Worker.prepare = lambda self, on_part: time.sleep(120)
    worker_module.process_main(commands, events, config)


@pytest.mark.parametrize("how", ["stop", "gone"])
def test_a_worker_told_to_stop_or_left_by_the_bot_while_starting_ends_at_once(tmp_path, how):
    """No job has run before the start ends, so nothing is lost, and a restarted bot's new worker does
    not compile beside an old one for minutes."""
    from jobs import events

    ctx = multiprocessing.get_context("spawn")
    worker_commands, bot_commands = ctx.Pipe(duplex=False)
    bot_events, worker_events = ctx.Pipe(duplex=False)
    config = WorkerConfig("tiny", "cpu", str(tmp_path / "w"), str(tmp_path / "c"))
    process = ctx.Process(target=_worker_with_a_long_start, args=(worker_commands, worker_events, config))
    process.start()
    worker_commands.close()
    worker_events.close()
    try:
        bot_commands.send(Run(item(1, "generate")))
        assert bot_events.poll(60), "the worker sent nothing"
        assert bot_events.recv() == (1, events.Stage(  # still starting, as it says
            "loading_model", starting_detail(FIRST_PART, 0.0, OTHER_START_TAKES)))
        if how == "stop":
            bot_commands.send(Stop())
        else:
            bot_commands.close()  # the bot's process ended
        process.join(30)
        assert not process.is_alive() and process.exitcode == 0
    finally:
        process.kill()
        process.join()


def wait_for_stop(commands, event_pipe, config) -> None:
    """A worker process's entry that does nothing until it is told to stop."""
    while not isinstance(commands.recv(), Stop):
        pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the child's environment from /proc")
async def test_worker_processes_start_without_the_bots_secrets_in_their_environment(monkeypatch):
    """A process's starting environment stays readable (/proc/<pid>/environ) while it runs: the bot's
    token, the job secret and Redis's URL must not be in a worker's. The bot's own stays as it was."""
    monkeypatch.setenv("DISCORD_TOKEN", "MTIz.the-bots-token")
    monkeypatch.setenv("JOB_SECRET", "s" * 40)
    monkeypatch.setenv("REDIS_URL", "redis://:password@localhost:6379/0")
    monkeypatch.setattr("jobs.local_runner.WORKER_ENTRY", "tests.jobs.test_local_runner:wait_for_stop")
    runner = LocalProcessRunner([WorkerConfig("tiny", "cpu", "/tmp/w0", "/tmp/c")])

    async def ignore(job_id, event):
        pass
    await runner.start(ignore)
    def environ_names() -> set[bytes]:
        """The worker's starting variables; empty while none can be read (a process that has just
        exited reads as empty, and the runner replaces it: the next read is of its successor)."""
        [pid] = runner.worker_pids
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                return {entry.split(b"=", 1)[0] for entry in environ.read().split(b"\0") if entry}
        except (FileNotFoundError, ProcessLookupError):
            return set()

    try:
        names = await wait_until(environ_names)
        assert b"PATH" in names and not {b"DISCORD_TOKEN", b"JOB_SECRET", b"REDIS_URL"} & names
        assert os.environ["DISCORD_TOKEN"] == "MTIz.the-bots-token" and os.environ["JOB_SECRET"] == "s" * 40
    finally:
        await runner.stop()


async def test_the_workers_tell_the_operator_which_jobs_each_runs():
    runner = pool(2)
    await place(runner, item(1, "train"))
    await place(runner, item(2, "train"))
    await place(runner, item(3, "generate"))  # rides on a training
    states = runner.worker_states()
    assert [(w.name, w.where, w.state) for w in states] == [("worker-0", "cpu", "busy"), ("worker-1", "cpu", "busy")]
    assert sorted(states[0].jobs + states[1].jobs) == [1, 2, 3] and len(states[0].jobs + states[1].jobs) == 3
    await finish(runner, 3)
    await finish(runner, 2)
    assert [(w.jobs, w.state) for w in runner.worker_states()] == [((1,), "busy"), ((), "idle")]
    assert [w.state for w in LocalProcessRunner([WorkerConfig("tiny", "cpu", "/tmp/w0", "/tmp/c")]).worker_states()] \
        == ["down"]  # not started
