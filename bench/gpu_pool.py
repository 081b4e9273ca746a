"""The worker pool on every GPU of one host: the bot's scheduler and local runner, without Discord.

Runs the real `Scheduler` over a real `Storage` (in a temporary folder) and `LocalProcessRunner`
with one worker process per visible GPU, on the full-size random SD1.5 architecture, in phases:

1. warm-up: one generation per worker (loads the model, fills the class-image cache for the class);
2. idle generation latency: `--requests` /imagine requests one after another (the baseline);
3. one training alone (the baseline for the next phase);
4. as many trainings as there are workers, at once, while /imagine requests keep arriving;
5. generation throughput: `--requests` requests queued at once, spread over the workers.

Per-GPU utilisation and memory are sampled with nvidia-smi throughout. Prints ratios against the
baselines measured in the same run, and writes everything to --json.

    python -m bench.gpu_pool --json pool.json                 # on a GPU host
    python -m bench.gpu_pool --model tiny --device cpu --workers 2 --steps 20 --requests 3   # CPU smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bot.config import Settings
from bot.scheduler import Scheduler
from jobs.devices import cpu_threads_per_worker, visible_devices
from jobs.events import Event, Progress, Stage
from jobs.local_runner import LocalProcessRunner
from jobs.requests import GenerateRequest
from jobs.worker_config import WorkerConfig
from storage import photos_db, users_db
from storage.jobs_db import Job
from storage.store import Storage

CLASS_WORD = "person"


class Waiter:
    """The scheduler's observer: resolves a future per job when it finishes, and keeps the phase each
    training last reported, so that a slow request can be traced to the phase it arrived in."""

    def __init__(self) -> None:
        self.done: dict[int, asyncio.Future[Job]] = {}
        self.trainings: set[int] = set()
        self.phase: dict[int, str] = {}

    def future(self, job_id: int) -> asyncio.Future[Job]:
        return self.done.setdefault(job_id, asyncio.get_running_loop().create_future())

    def phases_now(self) -> str:
        """The running trainings' phases ("training 120/400", "class_images", ...), joined by '+'."""
        return "+".join(self.phase[j] for j in sorted(self.phase)) or "not started"

    async def job_updated(self, job: Job, event: Event) -> None:
        if job.id not in self.trainings:
            return
        if isinstance(event, Stage):
            self.phase[job.id] = event.stage + (f" ({event.detail})" if event.detail else "")
        elif isinstance(event, Progress):
            self.phase[job.id] = f"{event.stage} {event.step}/{event.total}"

    async def job_finished(self, job: Job, outcome: dict[str, Any]) -> None:
        self.phase.pop(job.id, None)
        future = self.future(job.id)
        if not future.done():
            future.set_result(job)


class GpuSampler:
    """nvidia-smi sampling every `interval_ms` into memory; no-op without nvidia-smi."""

    def __init__(self, interval_ms: int = 250) -> None:
        self.interval_ms = interval_ms
        self.rows: list[tuple[float, int, float, float]] = []  # (time, gpu, util %, memory MiB)
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if shutil.which("nvidia-smi") is None:
            return
        self._process = await asyncio.create_subprocess_exec(
            "nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits",
            f"-lms={self.interval_ms}", stdout=subprocess.PIPE)
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        async for line in self._process.stdout:
            parts = [p.strip() for p in line.decode().split(",")]
            with contextlib.suppress(ValueError):
                self.rows.append((time.monotonic(), int(parts[0]), float(parts[1]), float(parts[2])))

    async def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            await self._process.wait()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def summary(self, start: float, end: float) -> dict[str, dict[str, float]]:
        """Per GPU: mean and peak utilisation, peak memory, over [start, end]."""
        out: dict[str, dict[str, float]] = {}
        for gpu in sorted({r[1] for r in self.rows}):
            rows = [r for r in self.rows if r[1] == gpu and start <= r[0] <= end]
            if rows:
                out[str(gpu)] = {"util_mean_pct": round(statistics.fmean(r[2] for r in rows), 1),
                                 "util_max_pct": max(r[2] for r in rows),
                                 "memory_max_mib": max(r[3] for r in rows)}
        return out


def random_photo(seed: int, size: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


async def add_person(store: Storage, user_id: int, photos: int, size: int) -> None:
    await users_db.ensure_user(store.db, user_id)
    # Written directly: the handle rules need wordfreq's large word lists, which GPU hosts lack.
    await store.db.execute("UPDATE users SET handle = ?, class_word = ? WHERE id = ?",
                           (f"zqbench{user_id}", CLASS_WORD, user_id))
    for i in range(photos):
        data = random_photo(user_id * 100 + i, size)
        path = store.files.write(user_id, "photos", data, ".png")
        await photos_db.add_photo(store.db, user_id, sha256=f"{user_id}-{i}", phash=user_id * 100 + i,
                                  path=path, byte_size=len(data), width=size, height=size)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix="gpu-pool-"))
    settings = replace(Settings(), data_dir=data, base_model=args.model, device=args.device,
                       workers=args.workers, train_steps=args.steps, class_images=args.class_images,
                       train_resolution=args.resolution, train_checkpoint_every=0, max_queued_generations=100,
                       # A load test, not a community: no quotas to stop its people's back-to-back jobs.
                       trainings_per_day=0, pictures_per_day=0, train_cooldown_min=0, server_trainings_per_day=0,
                       server_pictures_per_day=0, max_queued_jobs=10_000)
    devices = visible_devices(settings.device, settings.workers)
    runner = LocalProcessRunner([
        WorkerConfig(base_model=settings.base_model, device=d, work_dir=str(data / "work" / f"worker-{i}"),
                     class_cache_dir=str(data / "shared" / "class_images"), log_level="WARNING",
                     cpu_threads=cpu_threads_per_worker(devices), compile_training=args.compile_training,
                     train_rank=settings.train_rank)
        for i, d in enumerate(devices)])
    store = await Storage.open(data)
    waiter = Waiter()
    scheduler = Scheduler(store, runner, settings, waiter)
    sampler = GpuSampler()
    await sampler.start()
    await scheduler.start()
    request = GenerateRequest("portrait, studio light", num_images=1, seed=1, steps=25, face_pass=False)
    people = list(range(1, len(devices) + 2))  # one per worker, plus one who only generates
    report: dict[str, Any] = {"devices": devices, "model": args.model, "steps": args.steps,
                              "class_images": args.class_images, "resolution": args.resolution}
    try:
        for person in people:
            await add_person(store, person, 5, args.resolution)

        async def train(person: int) -> tuple[Job, float]:
            started = time.monotonic()
            job, _ = await scheduler.enqueue_train(person)
            waiter.trainings.add(job.id)
            finished = await waiter.future(job.id)
            if finished.state != "succeeded":
                raise RuntimeError(f"training {job.id} ended {finished.state}: {finished.error}")
            return finished, time.monotonic() - started

        async def imagine(person: int, seed: int) -> float:
            started = time.monotonic()
            job, _ = await scheduler.enqueue_generate(person, replace(request, seed=seed))
            finished = await waiter.future(job.id)
            if finished.state != "succeeded":
                raise RuntimeError(f"generation {job.id} ended {finished.state}: {finished.error}")
            return time.monotonic() - started

        # The generating person needs a model: their training also fills the class-image cache.
        t0 = time.monotonic()
        _, first = await train(people[-1])
        report["first_training_s_incl_model_load_and_class_images"] = round(first, 2)
        await asyncio.gather(*(imagine(people[-1], s) for s in range(len(devices) * 2)))  # warm every worker
        report["warmup_s"] = round(time.monotonic() - t0, 2)

        idle = [await imagine(people[-1], 100 + i) for i in range(args.requests)]
        report["idle_generation_s"] = {"p50": percentile(idle, 50), "p95": percentile(idle, 95)}

        t1 = time.monotonic()
        _, alone = await train(people[0])
        report["one_training_alone_s"] = round(alone, 2)
        report["gpu_during_one_training"] = sampler.summary(t1, time.monotonic())

        t2 = time.monotonic()
        trainings = asyncio.gather(*(train(p) for p in people[:-1]))
        during: list[float] = []
        arrived_in: list[str] = []  # the trainings' phase when each request was sent
        while not trainings.done():
            arrived_in.append(waiter.phases_now())
            during.append(await imagine(people[-1], 1000 + len(during)))
            await asyncio.sleep(args.request_gap)
        results = await trainings
        together = time.monotonic() - t2
        report["parallel_trainings"] = len(results)
        report["parallel_trainings_wall_s"] = round(together, 2)
        report["parallel_training_each_s"] = [round(s, 2) for _, s in results]
        report["parallel_over_alone"] = round(together / alone, 2)
        report["generation_during_trainings_s"] = {"n": len(during), "p50": percentile(during, 50),
                                                   "p95": percentile(during, 95), "all": during,
                                                   "arrived_in": arrived_in}
        report["gpu_during_parallel_trainings"] = sampler.summary(t2, time.monotonic())

        t3 = time.monotonic()
        burst = await asyncio.gather(*(imagine(people[i % len(people)], 5000 + i) for i in range(args.requests)))
        burst_wall = time.monotonic() - t3
        report["burst_generation"] = {"requests": args.requests, "wall_s": round(burst_wall, 2),
                                      "images_per_s": round(args.requests / burst_wall, 2),
                                      "p50": percentile(list(burst), 50), "p95": percentile(list(burst), 95)}
        report["gpu_during_burst"] = sampler.summary(t3, time.monotonic())
    finally:
        await scheduler.stop()
        await sampler.stop()
        await store.close()
        shutil.rmtree(data, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workers", type=int, default=0, help="0: one per visible GPU")
    parser.add_argument("--steps", type=int, default=300, help="training steps per job")
    parser.add_argument("--class-images", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--request-gap", type=float, default=0.5, help="seconds between /imagine during training")
    parser.add_argument("--no-compile-training", dest="compile_training", action="store_false",
                        help="workers train with plain stages and skip compiling the training at start (with a "
                             "cold inductor cache that compile takes about 7.5 minutes on an H200)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    print(json.dumps({k: v for k, v in report.items() if k != "generation_during_trainings_s"}, indent=1))
    during = report["generation_during_trainings_s"]
    print(f"generation while {report['parallel_trainings']} trainings ran: n={during['n']} "
          f"p50 {during['p50']:.2f} s p95 {during['p95']:.2f} s (idle p50 {report['idle_generation_s']['p50']:.2f} s)")
    slowest = sorted(zip(during["all"], during["arrived_in"], strict=True), reverse=True)[:5]
    print("slowest during the trainings: " + ", ".join(f"{s:.2f} s ({phase})" for s, phase in slowest))
    print(f"{report['parallel_trainings']} trainings at once took {report['parallel_over_alone']:.2f}x "
          "the time of one alone")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
