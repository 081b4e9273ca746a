"""Start helpers (trainer.start_helpers, trainer.start_helper_process): how many start, which parts
each takes, how the worker waits for them, and that they end with it. Nothing compiles on a CPU, so
fake helpers stand in for the protocol's tests; a real helper runs on the tiny model to check its
entry point."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from jobs.worker_config import WorkerConfig
from trainer import start_helpers
from trainer.start_helper_process import exit_when_closed
from trainer.start_helpers import TRAINING, groups, helper_command, helper_count
from trainer.start_report import MODEL, PartTime, helper_compiled
from trainer.worker import Worker

# A helper in a few lines: reports each part as the real one does ("broken" fails, at "vanishes" it
# dies, leaving behind a process that holds its stdout, as inductor's compile workers may, its id
# written to the file $LEFTOVER_PID names), then, unlike the real one, stays until the worker closes
# its stdin.
FAKE_HELPER = """
import os, pathlib, subprocess, sys
for part in sys.argv[1:]:
    if part == "vanishes":
        leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        pathlib.Path(os.environ["LEFTOVER_PID"]).write_text(str(leftover.pid))
        sys.exit(3)
    print(("failed " if part == "broken" else "done ") + part, flush=True)
sys.stdin.read()
"""


def config(tmp_path: Path, helpers: int) -> WorkerConfig:
    return WorkerConfig("tiny", "cpu", str(tmp_path / "work"), str(tmp_path / "classes"), start_helpers=helpers)


@pytest.fixture()
def fake_helpers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[tuple[WorkerConfig, list[str]]]]:
    """Helpers started run FAKE_HELPER; each one's configuration and parts are listed here. A
    leftover process that one of them left behind is ended afterwards."""
    launched: list[tuple[WorkerConfig, list[str]]] = []
    leftover = tmp_path / "leftover.pid"
    monkeypatch.setenv("LEFTOVER_PID", str(leftover))

    def command(own: WorkerConfig, parts: Sequence[str]) -> list[str]:
        launched.append((own, list(parts)))
        assert Path(own.work_dir).is_dir()
        return [sys.executable, "-c", FAKE_HELPER, *parts]

    monkeypatch.setattr(start_helpers, "helper_command", command)
    yield launched
    if leftover.exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(leftover.read_text()), signal.SIGKILL)


def test_helpers_start_only_where_the_gpu_and_the_cpus_have_room() -> None:
    assert helper_count(-1, 3, cpus=16, free_gpu_gib=130) == 3  # the H200 host: one per group
    assert helper_count(-1, 3, cpus=8, free_gpu_gib=130) == 1  # 4 CPUs for each process
    assert helper_count(-1, 3, cpus=16, free_gpu_gib=12.5) == 1  # 6 GiB each, the worker's share kept
    assert helper_count(-1, 3, cpus=16, free_gpu_gib=11.9) == 0
    assert helper_count(-1, 3, cpus=2, free_gpu_gib=130) == 0  # this project's CI machine
    assert helper_count(-1, 2, cpus=64, free_gpu_gib=500) == 2  # never more than there are groups
    assert helper_count(0, 3, cpus=16, free_gpu_gib=130) == 0  # START_HELPERS=0
    assert helper_count(2, 3, cpus=2, free_gpu_gib=0) == 2  # asked for: as many, whatever fits
    assert helper_count(5, 1, cpus=2, free_gpu_gib=0) == 1


def test_the_longest_parts_go_to_helpers_first_and_the_squares_stay_together() -> None:
    parts = ["during-training", "square-1", "square-4", TRAINING]
    assert groups(parts) == [[TRAINING], ["square-1", "square-4"], ["during-training"]]
    assert groups(["during-training", "square-1"]) == [["square-1"], ["during-training"]]
    assert groups([]) == []


def test_each_part_ends_done_or_failed_even_when_its_helper_dies(
        tmp_path: Path, fake_helpers: list[tuple[WorkerConfig, list[str]]]) -> None:
    parts = ["vanishes", "broken", TRAINING, "left-to-the-worker"]
    heard: list[str] = []
    all_ended = threading.Event()

    def on_end(part: str) -> None:
        heard.append(part)
        if len(heard) == 3:
            all_ended.set()

    helpers = start_helpers.start(config(tmp_path, 3), parts, "cpu", on_end=on_end)
    try:
        assert [owned for _own, owned in fake_helpers] == [[TRAINING], ["vanishes"], ["broken"]]
        # Each helper has a folder of its own under the worker's, and starts no helpers itself.
        folders = {own.work_dir for own, _parts in fake_helpers}
        assert len(folders) == 3 and all(Path(f).parent == tmp_path / "work" for f in folders)
        assert {own.start_helpers for own, _parts in fake_helpers} == {0}
        assert not helpers.owns("left-to-the-worker") and not helpers.ended("left-to-the-worker")
        # Each part ends, once, whether its helper finished it, failed it or died ...
        assert all_ended.wait(timeout=120)
        assert sorted(heard) == sorted([TRAINING, "broken", "vanishes"])
        assert helpers.compiled(TRAINING)
        assert helpers.ended("broken") and not helpers.compiled("broken")
        assert helpers.ended("vanishes") and not helpers.compiled("vanishes")
        # ... and the dead helper's part did not wait for its leftover process, which holds its stdout.
        leftover = int((tmp_path / "leftover.pid").read_text())
        os.kill(leftover, 0)  # still running: raises ProcessLookupError once it has ended
        processes = list(helpers._processes)
    finally:
        helpers.close()
    # Closing ended the helpers still waiting on their stdin, and removed their folders.
    assert [p.returncode for p in processes] == [0, 3, 0]
    assert not any(Path(f).exists() for f in folders)
    assert len(heard) == 3


def test_no_helper_starts_where_none_is_asked_for_or_nothing_compiles(
        tmp_path: Path, fake_helpers: list[tuple[WorkerConfig, list[str]]]) -> None:
    with contextlib.closing(start_helpers.start(config(tmp_path, 0), [TRAINING, "square-1"], "cpu")) as helpers:
        assert not helpers.owns(TRAINING)
    start_helpers.start(config(tmp_path, -1), [TRAINING, "square-1"], "cpu").close()  # a CPU has no GPU memory to spare
    start_helpers.start(config(tmp_path, 2), [], "cpu").close()
    assert fake_helpers == []


def test_a_worker_serves_at_once_and_switches_to_each_part_as_it_is_ready(
        tmp_path: Path, fake_helpers: list[tuple[WorkerConfig, list[str]]]) -> None:
    ran: list[str] = []

    class Engine:
        def warm_up_parts(self) -> list[str]:
            return ["any-shape", "during-training", "square-1", "square-4"]

        def warm_up(self, parts: list[str]) -> float:
            ran.extend(parts)
            return 1.0

    worker = Worker(config(tmp_path, 1))
    worker._engine = Engine()
    heard: list[PartTime] = []
    report = worker.prepare(on_timed=heard.append)
    assert report.parts[0].part == MODEL  # what the worker waited for before serving
    assert worker.wait_compiled(timeout=120)
    # On a CPU no training step compiles, so the parts are the engine's; with one helper, it takes
    # the squares, the worker compiles the rest while idle, and the squares' code is switched to
    # only after the code for any shape.
    assert [owned for _own, owned in fake_helpers] == [["square-1", "square-4"]]
    assert ran == ["any-shape", "square-1", "square-4", "during-training"]
    # The start reports every part as it ends (and each helper's part as the helper finishes it),
    # with the seconds as measured, never below zero, and when each ended.
    assert [name for name in report.names() if not name.startswith("compiled by")] == [MODEL, *ran]
    assert {helper_compiled("square-1"), helper_compiled("square-4")} <= set(report.names())
    assert heard == report.parts
    assert all(t.seconds >= 0 and t.at >= 0 for t in report.parts)


def test_a_helper_ends_when_the_worker_closes_its_stdin_or_goes_away() -> None:
    read_end, write_end = os.pipe()
    ended = threading.Event()
    watcher = threading.Thread(target=exit_when_closed, args=(read_end, ended.set))
    watcher.start()
    os.write(write_end, b"anything the worker might send is not an end")
    assert not ended.wait(0.2)
    os.close(write_end)
    watcher.join(10)
    os.close(read_end)
    assert ended.is_set()


@pytest.mark.slow
def test_a_real_helper_reports_each_part_and_refuses_parts_it_does_not_know(tmp_path: Path) -> None:
    """The entry point end to end on the tiny model: on a CPU the training step compiles nothing,
    and the engine has no part that compiles."""
    log_file = tmp_path / "helper.log"
    with log_file.open("wb") as log_out:
        # stdin stays open, as the worker holds it: the helper ends on its own once its parts are done.
        helper = subprocess.Popen(helper_command(config(tmp_path, 0), [TRAINING, "square-1"]),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_out)
        assert helper.stdout is not None and helper.stdin is not None
        reported = helper.stdout.read().decode().splitlines()
        assert helper.wait(timeout=60) == 0
        helper.stdin.close()
    assert reported == [f"done {TRAINING}", "failed square-1"]
    assert "no part of this worker's start is called 'square-1'" in log_file.read_text()
