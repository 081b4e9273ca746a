"""The intake pool (photos/sandbox.py): photos are decoded in capped child processes, a bomb costs
its child little, a child that dies or runs out of memory or time is replaced without losing the
next photo, and the event loop's threads stay free while photos are in flight (issue #27, F1/F2).

Nothing here measures time: memory is read from each child's own peak (VmHWM), and order from
which tasks are still running when another answer comes back.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from photos.intake import IntakeLimits, NormalisedPhoto, Refusal
from photos.sandbox import CPU_SECONDS, MEMORY_CAP_BYTES, ChildFailed, IntakePool
from tests.photos import bombs, sandbox_tasks
from tests.photos import intake_corpus as corpus
from tests.photos_factory import face_jpeg
from tests.polling import wait_until

BOMB_BUDGET_BYTES = 300 * 1024 * 1024
"""What a hostile upload may cost its child at most (issue #27): the 16-bit PNG that is kept takes
about 220 MB, every refused bomb what an idle child holds (60-120 MB)."""

REFUSED_BOMBS = [case for case in corpus.BOMBS if isinstance(case.expect, str)]


@pytest.fixture(scope="module")
def pool():
    """Two processes, as INTAKE_PROCESSES has by default, shared by this module's tests."""
    pool = IntakePool(2)
    pool.start()
    yield pool
    asyncio.run(pool.close())


def refusal(outcome: NormalisedPhoto | Refusal) -> str:
    assert isinstance(outcome, Refusal), "the photo was kept"
    return outcome.code


async def started_tasks(folder: Path, count: int) -> bool:
    return await wait_until(lambda: len(list(folder.glob("started-*"))) >= count)


@pytest.mark.slow
@pytest.mark.parametrize("case", corpus.BOMBS, ids=lambda case: case.name)
async def test_each_bomb_gets_its_outcome_within_the_memory_budget(pool, case):
    result = await pool.normalise(case.make(), case.limits)
    if isinstance(case.expect, str):
        assert refusal(result.outcome) == case.expect
    else:
        assert isinstance(result.outcome, NormalisedPhoto) and result.outcome.flags == case.expect
    assert result.peak_rss_bytes is not None
    assert result.peak_rss_bytes < BOMB_BUDGET_BYTES, f"{case.name}: {result.peak_rss_bytes / 2**20:.0f} MB"


@pytest.mark.slow
async def test_six_bombs_at_once_are_all_refused_and_a_selfie_beside_them_is_kept(pool):
    uploads = [(case.make(), case.limits) for case in REFUSED_BOMBS[:6]]
    assert len(uploads) == 6
    results = await asyncio.gather(*(pool.normalise(data, limits) for data, limits in uploads),
                                   pool.normalise(face_jpeg(), IntakeLimits()))
    *refused, selfie = results
    assert [refusal(r.outcome) for r in refused] == [case.expect for case in REFUSED_BOMBS[:6]]
    assert all(r.peak_rss_bytes is not None and r.peak_rss_bytes < BOMB_BUDGET_BYTES for r in refused)
    assert isinstance(selfie.outcome, NormalisedPhoto) and selfie.outcome.flags == ()


async def test_a_stuck_photo_holds_one_process_while_the_other_answers_everyone(pool, tmp_path):
    gate = tmp_path / "gate"
    stuck = asyncio.create_task(pool.run(sandbox_tasks.hold, str(gate), str(tmp_path / "started-0")))
    assert await started_tasks(tmp_path, 1)
    answers = await asyncio.gather(pool.normalise(bombs.cut_with_end_marker(face_jpeg()), IntakeLimits()),
                                   pool.normalise(face_jpeg(), IntakeLimits()))
    assert not stuck.done(), "the stuck task ended before the others were answered"
    assert refusal(answers[0].outcome) == "corrupt"
    assert isinstance(answers[1].outcome, NormalisedPhoto)
    gate.touch()
    assert (await stuck).value in pool.pids


async def test_the_event_loops_threads_stay_free_while_six_photos_are_in_flight(pool, tmp_path):
    """F2: intake once ran in the default thread pool, which also serves /forget, /photos and Redis;
    on a 2-core host it has six threads, and six slow photos left none."""
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(6))  # min(32, cores + 4) on 2 cores
    gate = tmp_path / "gate"
    six = [asyncio.create_task(pool.run(sandbox_tasks.hold, str(gate), str(tmp_path / f"started-{i}")))
           for i in range(6)]
    assert await started_tasks(tmp_path, pool.processes)
    answer = await asyncio.wait_for(asyncio.to_thread(lambda: "answered"), timeout=120)
    assert answer == "answered"
    assert not any(task.done() for task in six)
    gate.touch()
    assert {done.value for done in await asyncio.gather(*six)} <= set(pool.pids)


async def test_a_killed_process_is_replaced_and_the_next_photo_is_kept(pool, tmp_path):
    gate, started = tmp_path / "gate", tmp_path / "started-0"
    task = asyncio.create_task(pool.run(sandbox_tasks.hold, str(gate), str(started)))
    assert await started_tasks(tmp_path, 1)
    victim = int(started.read_text())
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(ChildFailed) as failed:
        await task
    assert failed.value.reason == "died"
    assert victim not in pool.pids
    results = await asyncio.gather(*(pool.normalise(face_jpeg(), IntakeLimits()) for _ in range(pool.processes)))
    assert all(isinstance(r.outcome, NormalisedPhoto) for r in results)


def ended(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie until its parent reaps it, or gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_a_process_killed_while_idle_costs_no_photo(pool):
    idle = [pid for pid in pool.pids if pid is not None]
    for pid in idle:
        os.kill(pid, signal.SIGKILL)
    assert await wait_until(lambda: all(ended(pid) for pid in idle))
    results = await asyncio.gather(*(pool.normalise(face_jpeg(), IntakeLimits()) for _ in range(pool.processes)))
    assert all(isinstance(r.outcome, NormalisedPhoto) for r in results)


async def test_a_bug_in_a_task_is_an_error_not_a_refusal_and_the_pool_carries_on(pool):
    with pytest.raises(RuntimeError, match="ValueError"):
        await pool.run(sandbox_tasks.fail)
    assert isinstance((await pool.normalise(face_jpeg(), IntakeLimits())).outcome, NormalisedPhoto)


async def test_children_run_capped_with_one_thread_each(pool):
    report = (await pool.run(sandbox_tasks.report)).value
    assert str(report["name"]).startswith("intake-")
    assert report["address_space"] == MEMORY_CAP_BYTES
    assert 0 < float(report["cpu_soft"]) - float(report["cpu_used"]) <= CPU_SECONDS + 1
    assert report["core"] == 0
    assert (report["omp"], report["cv2_threads"]) == ("1", 1)


@pytest.mark.slow
async def test_running_out_of_memory_refuses_that_photo_kindly_and_the_next_is_kept():
    """A child capped at 520 MB of address space (an idle one maps about 310 MB): a selfie fits, a
    100 MP 16-bit PNG allowed in by raised limits does not."""
    pool = IntakePool(1, memory_bytes=520 * 1024 * 1024)
    try:
        with pytest.raises(ChildFailed) as failed:
            await pool.run(sandbox_tasks.allocate, 1024 * 1024 * 1024)
        assert failed.value.reason == "memory"
        huge = IntakeLimits(max_pixels=200_000_000, max_decode_bytes=2 * 1024 * 1024 * 1024)
        result = await pool.normalise(bombs.gray16_png(10_000), huge)
        assert refusal(result.outcome) == "too_costly"
        assert isinstance((await pool.normalise(face_jpeg(), IntakeLimits())).outcome, NormalisedPhoto)
    finally:
        await pool.close()


@pytest.mark.slow
async def test_a_photo_over_its_cpu_or_wall_clock_time_is_stopped_and_the_process_replaced(tmp_path):
    pool = IntakePool(1, cpu_seconds=1, timeout_s=5)
    try:
        first = (await pool.run(sandbox_tasks.report)).value["pid"]
        with pytest.raises(ChildFailed) as over_cpu:
            await pool.run(sandbox_tasks.spin)
        with pytest.raises(ChildFailed) as over_time:
            await pool.run(sandbox_tasks.hold, str(tmp_path / "never"))
        assert (over_cpu.value.reason, over_time.value.reason) == ("timeout", "timeout")
        last = (await pool.run(sandbox_tasks.report)).value["pid"]
        assert len({first, last}) == 2
    finally:
        await pool.close()


async def test_a_closed_pool_has_no_processes_and_takes_no_photos():
    pool = IntakePool(1)
    pid = (await pool.run(sandbox_tasks.report)).value["pid"]
    assert pool.pids == [pid]
    await pool.close()
    assert pool.pids == [None]
    with pytest.raises(RuntimeError, match="closed"):
        await pool.run(sandbox_tasks.report)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the child's environment from /proc")
async def test_intake_processes_start_without_the_bots_secrets(monkeypatch):
    """A photo's decoder is the code most exposed to strangers' bytes: it must not find the bot's
    token (or Redis's password) in its environment."""
    monkeypatch.setenv("DISCORD_TOKEN", "MTIz.the-bots-token")
    monkeypatch.setenv("REDIS_URL", "redis://:password@localhost:6379/0")
    pool = IntakePool(1)
    try:
        pid = (await pool.run(sandbox_tasks.report)).value["pid"]
        with open(f"/proc/{pid}/environ", "rb") as environ:
            names = {entry.split(b"=", 1)[0] for entry in environ.read().split(b"\0") if entry}
        assert b"PATH" in names and not {b"DISCORD_TOKEN", b"REDIS_URL"} & names
        assert os.environ["DISCORD_TOKEN"] == "MTIz.the-bots-token"
    finally:
        await pool.close()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_a_childs_peak_is_its_own_however_large_its_parent():
    """A photo's cost is measured in its child alone: a large bot (or test run) does not inflate it."""
    done = subprocess.run([sys.executable, "-m", "tests.photos.big_parent"], cwd=Path(__file__).parents[2],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) < BOMB_BUDGET_BYTES
