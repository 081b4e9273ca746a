"""`python -m trainer worker` in a child process as an operator starts it, with the GPU work left out:
the model is never loaded (with TEST_SLOW_START, the start lasts ten minutes, and touches `starting`
in the working folder), a job's work returns no pictures at once, or, with `hold`, waits until the
file `hold` exists (stopping early if cancelled). The child writes its environment's names to
`env.json` in its working folder when it runs a job, and its log to `worker.log`."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.work_items import JOB_SECRET

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import json, os, sys, time
from pathlib import Path
from trainer.errors import Cancelled
from trainer.worker import Worker
from jobs.payloads import GenerateOutput

def run(self, item, emit, should_cancel, serve_riders=None):
    Path("env.json").write_text(json.dumps(sorted(os.environ)))
    hold = os.environ.get("TEST_HOLD")
    while hold and not Path(hold).exists():
        if should_cancel():
            raise Cancelled()
        time.sleep(0.05)
    return GenerateOutput([])

def prepare(self, on_part=None):
    if os.environ.get("TEST_SLOW_START"):  # as a GPU worker compiling for minutes
        Path("starting").touch()
        time.sleep(600)

Worker.prepare = prepare
Worker.run = run
from trainer.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    folder: Path

    @property
    def log(self) -> str:
        return (self.folder / "worker.log").read_text()

    @property
    def default_name(self) -> str:
        import socket

        return f"{socket.gethostname()}-{self.process.pid}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_worker(redis_url: str, folder: Path, *args: str, hold: Path | None = None,
                 env: dict[str, str] | None = None) -> WorkerProcess:
    """A worker working in `folder` (its `worker-data/`, its log); `args` go after `worker`."""
    folder.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": str(folder / "compiled"),
                   "JOB_SECRET": JOB_SECRET, **(env or {})}
    if hold is not None:
        environment["TEST_HOLD"] = str(hold)
    with (folder / "worker.log").open("a") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, "worker", "--redis-url", redis_url, "--model", "tiny", "--device", "cpu",
             "--class-cache", str(folder / "class-cache"), "--compile-cache", str(folder / "compiled"), *args],
            cwd=folder, env=environment, stdout=log, stderr=subprocess.STDOUT)
    return WorkerProcess(process, folder)
