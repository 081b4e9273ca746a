"""kill -9 at random points of storing photos, training results, pictures and /forget: after a restart
(Storage.open and the start-up sweep) the data folder and the database agree, and nothing of a person
whose /forget had begun is left.

Each round runs tests/storage/crash_workload.py in a child process against one real data folder,
kept from round to round, and kills it: after a seeded random number of operations plus a seeded
random pause (random rounds), or at an exact point between two steps (the child kills itself there).
What is asserted never depends on where the kill landed.
"""

from __future__ import annotations

import logging
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.atomic import TMP_PREFIX, TMP_SUFFIX
from storage.store import DB_NAME, Storage
from storage.sweep import SweepReport, referenced_paths, sweep_data_dir
from tests.storage.crash_workload import CRASH_POINTS, MARKER

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger(__name__)
RANDOM_ROUNDS = 20
TABLES = {"users": "id", "photos": "owner", "jobs": "owner", "models": "owner", "generations": "owner"}

pytestmark = pytest.mark.slow


def _start(data_dir: Path, seed: int, crash_at: str | None = None) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "tests.storage.crash_workload", str(data_dir), str(seed)]
    # One pipe for both: a child writing much to a second, unread pipe would block, and this reader with it.
    return subprocess.Popen([*args, *([crash_at] if crash_at else [])], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _read_until(child: subprocess.Popen[str], done: int) -> list[str]:
    """Lines the child printed until `done` operations were done (or it ended)."""
    assert child.stdout is not None
    lines = []
    while (line := child.stdout.readline()) and sum(x.startswith("done") for x in lines) < done:
        lines.append(line.strip())
    return lines


def _kill_at_random(data_dir: Path, rng: random.Random, seed: int) -> list[str]:
    child = _start(data_dir, seed)
    try:
        lines = _read_until(child, rng.randint(0, 8))
        time.sleep(rng.uniform(0, 0.05))
        assert child.poll() is None, "the workload ended by itself:\n" + "\n".join(lines)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(30)
    return lines


def _crash_at(data_dir: Path, point: str, seed: int) -> None:
    child = _start(data_dir, seed, point)
    try:
        err, _ = child.communicate(timeout=300)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGKILL, f"{point}: the workload did not die there:\n{err}"


def _tombstones(data_dir: Path) -> set[int]:
    """Whose /forget had begun when the process died (read before anything finishes them)."""
    with sqlite3.connect(data_dir / DB_NAME) as conn:
        return {row[0] for row in conn.execute("SELECT user_id FROM forgotten")}


async def _restart_and_check(data_dir: Path, forgetting: set[int]) -> SweepReport:
    store = await Storage.open(data_dir)
    try:
        report = await sweep_data_dir(store)
        db = store.db
        assert (await db.fetchone("PRAGMA integrity_check"))[0] == "ok"
        assert await db.fetchall("PRAGMA foreign_key_check") == []
        assert await db.fetchall("SELECT * FROM forgotten") == []  # every interrupted forget finished
        for user in forgetting:
            for table, column in TABLES.items():
                assert (await db.fetchone(f"SELECT count(*) FROM {table} WHERE {column} = ?", (user,)))[0] == 0
            assert not store.files.user_dir(user).exists()
        on_disk = {p.relative_to(data_dir).as_posix() for p in (data_dir / "users").rglob("*") if p.is_file()}
        named = await referenced_paths(store)
        assert on_disk - named == set(), "files no row names"
        assert named - on_disk == set(), "rows naming missing files"
        leftovers = [p for p in data_dir.rglob(f"{TMP_PREFIX}*{TMP_SUFFIX}")]
        assert leftovers == []
    finally:
        await store.close()
    return report


async def test_kill_9_at_random_points_leaves_a_consistent_data_folder(tmp_path):
    data_dir = tmp_path / "data"
    rng = random.Random(27)
    operations = forgotten = interrupted = swept = 0
    for round_ in range(RANDOM_ROUNDS):
        lines = _kill_at_random(data_dir, rng, seed=round_)
        operations += sum(line.startswith("done") for line in lines)
        forgotten += sum(line.startswith("forgot") for line in lines)
        forgetting = _tombstones(data_dir)
        interrupted += len(forgetting)
        report = await _restart_and_check(data_dir, forgetting)
        swept += report.orphans + report.temporary
    assert operations > RANDOM_ROUNDS  # the rounds did work before they were killed
    assert forgotten > 0
    # Where the kills landed depends on timing: reported, not asserted.
    log.info("measured: %d rounds, %d operations, %d forgets, %d interrupted forgets finished, %d files swept",
             RANDOM_ROUNDS, operations, forgotten, interrupted, swept)


@pytest.mark.parametrize("point", CRASH_POINTS)
async def test_kill_9_between_two_steps_leaves_a_consistent_data_folder(tmp_path, point):
    data_dir = tmp_path / "data"
    _crash_at(data_dir, point, seed=1)
    forgetting = _tombstones(data_dir)
    if point.startswith("forget"):
        assert forgetting == {101}  # marked first: the crash came after the tombstone
        files_before = [p for p in (data_dir / "users/101").rglob("*") if p.is_file()]
        assert point == "forget-before-rows" or files_before  # ... and before all files were gone
    await _restart_and_check(data_dir, forgetting)
    if point.startswith("forget"):
        db = b"".join(p.read_bytes() for p in data_dir.glob(f"{DB_NAME}*"))
        assert MARKER.encode() not in db  # their handle and prompts are gone from the database files
