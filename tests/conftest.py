"""Fixtures shared by the end-to-end tests: the fake Discord, a Redis server, Celery workers.

Their libraries are imported where they are used, so that tests needing none of them (the GPU tests
on a machine with only torch and diffusers, say) collect without them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.polling import wait_until_sync
from tests.work_items import JOB_SECRET


@pytest.fixture(autouse=True)
def restore_root_logger():
    """Code under test may set up logging (`common.logs.setup_logging`, called by the CLI's and the
    worker's entry points), which points the root handler at this test's captured stderr. Pytest
    closes that stream after the test, and every later test's log line would fail to write."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture
async def fake():
    """A fresh fake Discord server on loopback for one test."""
    from tests.fakediscord import FakeDiscord

    async with FakeDiscord() as server:
        yield server


@pytest.fixture
def redis_url(tmp_path):
    """A private Redis server on loopback (Debian's redis-server; `.ci/run` installs it)."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server); .ci/run installs it")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def answers() -> bool:
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    try:
        wait_until_sync(answers, interval=0.05)
        yield url
    finally:
        server.terminate()
        server.wait(10)


class CeleryWorkers:
    """`python -m trainer worker` processes on the CPU with the tiny model, as an operator starts them."""

    def __init__(self, redis_url: str, root: Path) -> None:
        self.redis_url, self.root = redis_url, root
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> None:
        """Its log (INFO and above) goes to `log(name)`; `args` go to `worker` after the fixture's own."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "JOB_SECRET": JOB_SECRET}
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log_file(name).open("a") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "trainer", "--log-level", "INFO", "worker", "--redis-url", self.redis_url,
                 "--model", "tiny", "--device", "cpu", "--name", name, "--work-dir", str(self.root / name),
                 "--class-cache", str(self.root / "class-cache"), *args], env=env, cwd=Path(__file__).parent.parent,
                stdout=log, stderr=subprocess.STDOUT)

    def log_file(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def log(self, name: str) -> str:
        return self.log_file(name).read_text()

    def kill(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait(10)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def celery_workers(redis_url, tmp_path):
    workers = CeleryWorkers(redis_url, tmp_path / "workers")
    try:
        yield workers
    finally:
        workers.stop()


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied before and after a test, so compile counts start from nothing."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (`pytestmark = pytest.mark.usefixtures(
    "one_thread")`): their ops are too small to gain from a second thread, a busy machine makes torch's
    spinning threads wait on each other, and one thread keeps float sums in one order."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
