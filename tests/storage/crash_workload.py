"""The bot's storage work in an endless loop, for tests/storage/test_crash.py to kill -9 at any point.

    python -m tests.storage.crash_workload DATA_DIR SEED [CRASH_AT]

Runs the real code paths against a real data folder: a photo stored through the DM intake (its
decoding replaced by a ready result: the crash windows are in storing, not decoding), a photo
removed, a training's checkpoint and result (model row, LoRA files, older models dropped) and a
generation's result through the scheduler's event handler, /forget through the scheduler, and the
periodic picture expiry. Each operation is announced on stdout before and after, so the test can
choose when to kill. With CRASH_AT, the process kills itself at that exact point instead (see
CRASH_POINTS), to be sure every window between two steps is hit at least once.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bot import photo_intake
from bot.config import load_settings
from bot.scheduler import Scheduler
from jobs import events
from jobs.payloads import GenerateOutput, GenerateParams, Picture, TrainOutput, WorkItem, to_stored
from jobs.requests import GenerateRequest
from jobs.runner import EventHandler, JobRunner
from photos.intake import IntakeLimits, NormalisedPhoto, normalise_photo
from storage import jobs_db, models_db, photos_db, retention, users_db
from storage.files import FileStore
from storage.jobs_db import Job
from storage.retention import DAY_S
from storage.store import Storage
from tests.photos_factory import selfie

USERS = (101, 202, 303)
WORKER = "crash-test"
MARKER = "zqcrashmarker"  # in every handle and prompt


def say(*words: object) -> None:
    """One line for the test, which reads them as they come."""
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()


class IdleRunner(JobRunner):
    """No worker takes jobs; the workload plays the worker's events itself."""

    on_event: EventHandler

    async def start(self, on_event: EventHandler) -> None:
        self.on_event = on_event

    async def stop(self) -> None:
        pass

    def idle_capacity(self, kind: str | None = None) -> int:
        return 0

    def workers_online(self) -> int:
        return 1

    async def submit(self, item: WorkItem) -> None:
        raise AssertionError("nothing is handed to a worker here")

    async def cancel(self, job_id: int) -> None:
        pass

    async def forget_jobs(self, job_ids: Collection[int]) -> None:
        pass

    async def forget_adapter(self, key: str) -> None:
        pass


class ReadyIntake:
    """Stands in for the intake's process pool: a fresh photo each time (no duplicates), already
    decoded; decoding is not what is being tested."""

    def __init__(self, ready: NormalisedPhoto, rng: random.Random) -> None:
        self.ready, self.rng = ready, rng

    async def normalise(self, data: bytes, limits: IntakeLimits) -> SimpleNamespace:
        return SimpleNamespace(outcome=replace(self.ready, sha256=f"{self.rng.getrandbits(256):064x}",
                                               phash=self.rng.getrandbits(64)))


class Silent:
    async def job_updated(self, job: Job, event: events.Event) -> None:
        pass

    async def job_finished(self, job: Job, outcome: dict[str, Any]) -> None:
        pass


class Workload:
    def __init__(self, store: Storage, scheduler: Scheduler, runner: IdleRunner, rng: random.Random) -> None:
        self.store, self.scheduler, self.runner, self.rng = store, scheduler, runner, rng
        self.intake = ReadyIntake(normalise_photo(selfie(rng.randrange(7))), rng)

    async def _ready(self, user: int) -> None:
        await users_db.set_handle(self.store.db, user, f"{MARKER}{user}", "person")

    async def photo(self, user: int) -> None:
        async with self.scheduler.user_lock(user):
            await self._ready(user)
            outcome = await photo_intake.accept_photo(self.store, user, b"", "selfie.jpg", IntakeLimits(),
                                                      max_photos=8, pool=self.intake)
        if outcome.error:  # the maximum: make room
            await self.remove_photo(user)

    async def remove_photo(self, user: int) -> None:
        photos = await photos_db.list_photos(self.store.db, user)
        if photos:
            await photos_db.delete_photo(self.store, user, self.rng.choice(photos).id)

    async def _claimed(self, user: int, kind: str, params: dict[str, Any]) -> Job | None:
        await jobs_db.create_job(self.store.db, kind, user, params)
        return await jobs_db.claim_next_job(self.store.db, WORKER, 600, kinds=(kind,))

    async def train(self, user: int) -> None:
        await self._ready(user)
        job = await self._claimed(user, "train", {})
        if job is None:
            return
        await self.runner.on_event(job.id, events.Checkpoint(10, os.urandom(256 * 1024)))
        metadata = {"handle": f"{MARKER}{job.owner}", "class_word": "person", "base_model": "tiny"}
        result = TrainOutput(os.urandom(self.rng.randint(1, 3) * 2**20), os.urandom(2**20), metadata, 20, 0.1)
        await self.runner.on_event(job.id, events.Done(result))

    async def generate(self, user: int) -> None:
        model = await models_db.get_active_model(self.store.db, user)
        if model is None:
            return await self.train(user)
        params = GenerateParams(GenerateRequest(f"{MARKER} on the moon"), model.id, f"model-{model.id}",
                                f"{MARKER}{user}", "person")
        job = await self._claimed(user, "generate", to_stored(params))
        if job is None:
            return
        pictures = [Picture(os.urandom(200 * 1024), seed) for seed in range(self.rng.randint(1, 4))]
        await self.runner.on_event(job.id, events.Done(GenerateOutput(pictures)))

    async def forget(self, user: int) -> None:
        say("forget-start", user)
        await self.scheduler.forget(user)
        say("forgot", user)

    async def expire(self, user: int) -> None:
        await retention.expire_pictures(self.store, 1, time.time() + self.rng.uniform(0, 2) * DAY_S)

    async def expire_all(self, user: int) -> None:
        await retention.expire_pictures(self.store, 1, time.time() + 2 * DAY_S)


OPERATIONS = ("photo", "photo", "photo", "remove_photo", "train", "generate", "generate", "forget", "expire")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_crash_point(name: str) -> list[tuple[str, int]]:
    """Make the process kill itself at `name`; return the operations that lead there."""
    user = USERS[0]
    if name in ("forget-mid-files", "forget-before-rows"):
        real = FileStore.delete_user_files

        def delete_user_files(self: FileStore, user_id: int) -> tuple[int, int]:
            if name == "forget-mid-files":  # a few files gone, the rest and every row still there
                next(p for p in self.user_dir(user_id).rglob("*") if p.is_file()).unlink()
                _die()
            real(self, user_id)
            _die()
            raise AssertionError

        FileStore.delete_user_files = delete_user_files
        return [("photo", user), ("train", user), ("generate", user), ("forget", user)]
    if name == "photo-before-row":
        photos_db.add_photo = lambda *args, **kwargs: _die()
        return [("photo", user)]
    if name == "model-before-row":
        retention.save_model = lambda *args, **kwargs: _die()
        return [("train", user)]
    if name in ("old-model-files", "old-picture-files"):
        real_delete = retention._delete_files

        async def delete_files(storage: Storage, files: list[tuple[int, str]]) -> None:
            if files:
                _die()
            await real_delete(storage, files)

        retention._delete_files = delete_files
        if name == "old-model-files":  # the third model drops the first
            return [("train", user), ("train", user), ("train", user)]
        return [("train", user), ("generate", user), ("expire_all", user)]
    if name == "checkpoint-after-finish":
        real_finish = jobs_db.finish_job

        async def finish_job(*args: Any, **kwargs: Any) -> bool:
            await real_finish(*args, **kwargs)
            _die()
            raise AssertionError

        jobs_db.finish_job = finish_job
        return [("train", user)]
    raise ValueError(f"unknown crash point {name!r}")


CRASH_POINTS = ("forget-mid-files", "forget-before-rows", "photo-before-row", "model-before-row",
                "old-model-files", "old-picture-files", "checkpoint-after-finish")


async def main(data_dir: Path, seed: int, crash_at: str | None) -> None:
    rng = random.Random(seed)
    script = _install_crash_point(crash_at) if crash_at else []
    store = await Storage.open(data_dir)
    runner = IdleRunner()
    settings = load_settings({"DISCORD_TOKEN": "t" * 30, "DATA_DIR": str(data_dir), "MIN_PHOTOS": "1"},
                             env_file=None)
    scheduler = Scheduler(store, runner, settings, Silent(), worker_id=WORKER)
    await scheduler.start()
    workload = Workload(store, scheduler, runner, rng)
    say("ready")
    count = 0
    while True:
        operation, user = script.pop(0) if script else (rng.choice(OPERATIONS), rng.choice(USERS))
        await getattr(workload, operation)(user)
        count += 1
        say("done", count, operation, user)


if __name__ == "__main__":
    try:
        asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None))
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # at once: a database thread left running would keep the process, and the test, waiting
