"""The worker: one process that owns a device, keeps the base model loaded and runs jobs.

`process_main` is the child-process entry used by `trainer.runner.LocalProcessRunner`; `Worker`
holds the logic so that other backends (and tests) can run the same code in their own processes.
Commands arrive on one pipe (run, cancel, evict, stop) and are read by a thread, so a cancel
reaches a training between two steps; events go back on another pipe as `(job_id, event)`.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer import events, gc_pauses, start_helpers
from trainer.errors import BadCheckpoint, Cancelled, ModelUnavailable, OutOfMemory, TrainerError
from trainer.events import Event, EventSink
from trainer.jobs import WorkItem
from trainer.logs import setup_logging

if TYPE_CHECKING:
    from trainer.runner import WorkerConfig

log = logging.getLogger(__name__)

SAMPLE_PROMPTS = (
    "a portrait photo of {handle} {cls}, soft studio lighting, 85mm",
    "{handle} {cls} as an astronaut on the moon, digital art",
)
PROMPT_HINTS = (
    "a photo of {handle} {cls} hiking in the Alps at sunrise",
    "an oil painting of {handle} {cls} in the style of Rembrandt",
    "{handle} {cls} as a knight in shining armour, cinematic lighting",
)
# What a job that reaches a worker still starting up shows in its progress message, instead of a
# bare "Loading the model" for many minutes: on a GPU the start compiles and captures generation
# and the training step. With an empty compile cache that took an H200 about 6 minutes with start
# helpers (trainer.start_helpers) and more than 15 without (a GPU with less memory or a host with
# fewer CPUs has fewer helpers); a restart reads the code back in about 2.5 minutes. So the message says
# what the start is doing and for how long.
STARTING_DETAIL = "the GPU worker is still starting up"
START_TAKES = "on a GPU, a new install's first start takes 6 to 20 minutes, later ones 2-3"
# A start's first part, announced by `Worker.prepare` and told to jobs that arrive before it does.
FIRST_PART = "loading the base model"
# Seconds between two retellings of a start's news to the jobs waiting on it, so the minutes shown move.
START_NEWS_EVERY_S = 60.0


def starting_detail(part: str, elapsed_s: float) -> str:
    """A waiting job's progress detail while its worker starts: the part under way and the time so far."""
    minutes = int(elapsed_s // 60)
    so_far = "just begun" if minutes == 0 else f"{minutes} min in"
    return f"{STARTING_DETAIL}: {part}, {so_far}; {START_TAKES}"


def clear_folder(folder: Path) -> None:
    """Make `folder` exist and hold nothing."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def pack_path(path: Path) -> bytes:
    """A checkpoint (file or folder) as bytes, so it can travel to the bot and back."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                if file.is_file():
                    archive.write(file, file.relative_to(path).as_posix())
        else:
            archive.write(path, path.name)
    return buffer.getvalue()


def unpack_to(data: bytes, folder: Path) -> Path:
    """Undo `pack_path` into `folder`; returns the checkpoint path the trainer resumes from.
    A damaged or empty archive raises BadCheckpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            for name in names:
                target = (folder / name).resolve()
                if not target.is_relative_to(folder.resolve()):
                    raise ValueError("checkpoint archive escapes its folder")
            if not names:
                raise ValueError("empty checkpoint archive")
            archive.extractall(folder)
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise BadCheckpoint(f"The stored checkpoint cannot be unpacked ({exc}).") from exc
    return folder / names[0] if len(names) == 1 else folder


class Worker:
    """Runs work items on one device with a base pipeline that is loaded once."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.work_dir = Path(config.work_dir)
        self._pipeline: Any = None
        self._engine: Any = None
        # The folder is this worker's scratch space alone. What an earlier run left there (a killed
        # training's checkpoint and LoRA, cached LoRA files) may belong to people who have since
        # asked to be forgotten, and nothing in it outlives a run: the bot sends every job's files
        # again, so all of it goes.
        clear_folder(self.work_dir)
        # A cache of LoRA files for the engine; a new worker process holds no adapter.
        self._adapter_files = self.work_dir / "adapters"
        self._adapter_files.mkdir()
        if config.compile_cache_dir:
            # Read by inductor when it first compiles; an operator's own setting wins.
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", config.compile_cache_dir)

    @property
    def pipeline(self) -> Any:
        if self._pipeline is None:
            from trainer.models import load_pipeline, pick_device

            device = pick_device(self.config.device)
            started = time.perf_counter()
            self._pipeline = load_pipeline(self.config.base_model, device=device)
            log.info("loaded %s on %s in %.1f s", self.config.base_model, device,
                     time.perf_counter() - started)
        return self._pipeline

    def prepare(self, on_part: Callable[[str], None] = lambda part: None) -> None:
        """Load the base model and, on a GPU, compile and capture the generation graphs of the common
        picture shapes and compile the default training step, so the first jobs wait for none of it
        (the engine warms up only where it graphs, the trainer only where it compiles). `on_part`
        hears each part as it begins, in words for the people whose jobs wait on it.
        Start helpers (trainer.start_helpers) compile the parts after the first in processes of their
        own meanwhile, where the GPU and the host have room for them; this process then reads those
        parts back from the compile cache.
        What exists then lives as long as the worker, so it is frozen out of the garbage collector's
        walks, which would otherwise stall a job for half a second now and then (trainer.gc_pauses)."""
        gc_pauses.log_long_collections()
        on_part(FIRST_PART)
        engine = self.engine
        helped = self.helped_parts()
        with start_helpers.started(self.config, helped, str(self.pipeline.device)) as helpers:
            engine.warm_up(on_part=on_part, before_part=helpers.wait_for)
            if self.config.compile_training:
                on_part("compiling the training step")
                helpers.wait_for(start_helpers.TRAINING)
                self._warm_up_training()
        gc_pauses.freeze_long_lived()

    def helped_parts(self) -> list[str]:
        """The parts of this worker's start that compile, but the first: those a start helper may take."""
        from trainer.dreambooth import TrainConfig

        parts = self.engine.warm_up_parts()[1:]
        if self.config.compile_training and TrainConfig().compiles_on(self.pipeline.device.type):
            parts.append(start_helpers.TRAINING)
        return parts

    def compile_part(self, part: str) -> None:
        """Compile one part of the start (a start helper's work): the training step, or one of the
        engine's warm-up parts."""
        if part == start_helpers.TRAINING:
            _ = self.engine  # as in a worker's start, the engine sets the modules up first
            self._warm_up_training()
        elif part in self.engine.warm_up_parts():
            self.engine.warm_up(parts=[part])
        else:
            raise ValueError(f"no part of this worker's start is called {part!r}")

    def _warm_up_training(self) -> None:
        """Compile the default training step (trainer.dreambooth.warm_up); nothing on a CPU."""
        from trainer.dreambooth import TrainConfig, warm_up

        scratch = Path(tempfile.mkdtemp(prefix="warm-up-", dir=self.work_dir))
        try:
            warm_up(self.pipeline, TrainConfig(rank=self.config.train_rank), scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    @property
    def engine(self) -> Any:
        if self._engine is None:
            from trainer.engine import GenerationEngine

            self._engine = GenerationEngine(self.pipeline, max_loaded_adapters=self.config.max_adapters,
                                            compile_blocks=None if self.config.compile_generation else False,
                                            static_shapes=self.config.compile_static_shapes)
        return self._engine

    def run(self, item: WorkItem, emit: EventSink, should_cancel: Any,
            between_steps: Callable[[], None] | None = None) -> dict[str, Any]:
        """Run one item; a training calls `between_steps` between its steps and phases (see process_main)."""
        if item.kind == "train":
            return self._train(item, emit, should_cancel, between_steps)
        if item.kind == "generate":
            return self._generate(item, emit, should_cancel)
        raise TrainerError(f"Unknown job kind {item.kind!r}.", "bad_job")

    def execute(self, item: WorkItem, emit: EventSink, should_cancel: Callable[[], bool],
                between_steps: Callable[[], None] | None = None, *,
                stopping: Callable[[], bool] = lambda: False) -> bool:
        """Run `item` and report its outcome through `emit`: `done`, or an `error` a person can read.

        False when `stopping()` says the worker is shutting down: then nothing is reported, the job
        stays running for the bot, which resumes it from its checkpoint later or elsewhere.
        """
        try:
            if should_cancel():
                raise Cancelled()
            emit(events.done(self.run(item, emit, should_cancel, between_steps)))
        except BaseException as exc:  # noqa: BLE001 - every failure becomes the job's error event
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            if stopping():
                log.info("job %d interrupted by shutdown; it resumes from its checkpoint", item.job_id)
                return False
            emit(describe_failure(exc))
        return True

    def _train(self, item: WorkItem, emit: EventSink, should_cancel: Any,
               between_steps: Callable[[], None] | None) -> dict[str, Any]:
        from trainer.dreambooth import train

        params = item.params
        emit(events.stage("loading_model"))
        pipeline = self.pipeline
        scratch = Path(tempfile.mkdtemp(prefix=f"job{item.job_id}-", dir=self.work_dir))
        try:
            resume_from = None
            if item.blobs.get("checkpoint"):
                try:
                    resume_from = unpack_to(item.blobs["checkpoint"], scratch / "resume")
                except BadCheckpoint as exc:
                    log.warning("job %d: %s Training from the first step.", item.job_id, exc.message)

            def forward(event: Event) -> None:
                if event["type"] == "checkpoint":  # the bot keeps checkpoints: send the bytes
                    event = {**event, "data": pack_path(Path(event["path"]))}
                    event.pop("path")
                emit(event)

            def run(resume: Path | None) -> Any:
                return train(
                    item.blobs["photos"], params["handle"], params["class_word"],
                    self._train_config(params["config"]), pipeline=pipeline, base_model=self.config.base_model,
                    out_dir=scratch / "out", work_dir=scratch / "checkpoints",
                    class_cache_dir=Path(self.config.class_cache_dir), device=self.config.device,
                    on_event=forward, should_cancel=should_cancel, resume_from=resume, between_steps=between_steps,
                )

            try:
                result = run(resume_from)
            except OutOfMemory as exc:  # the trainer's advice is for whoever sets the training up
                raise OutOfMemory("The GPU ran out of memory while training your model. Please try again "
                                  "later; if it keeps happening, the server's operator can lower "
                                  "TRAIN_RESOLUTION or TRAIN_RANK.") from exc
            except BadCheckpoint as exc:
                if resume_from is None:
                    raise
                # Damaged, or made for another base model (the operator changed BASE_MODEL) or another
                # kind of device: its progress is lost, the job is not.
                log.warning("job %d: its checkpoint cannot be used (%s); training from the first step",
                            item.job_id, exc.message)
                emit(events.stage("preparing", "the saved progress could not be used; starting again"))
                result = run(None)
            try:
                samples = self._samples(item, result.lora_path, emit, should_cancel, between_steps)
            except Cancelled:
                raise
            except Exception:  # the model is whole: it is kept, without its sample pictures
                log.warning("job %d: drawing the sample pictures failed; the model is kept without them",
                            item.job_id, exc_info=True)
                samples = []
            return {
                "lora": result.lora_path.read_bytes(),
                "kohya": result.kohya_path.read_bytes() if result.kohya_path else None,
                "metadata": result.metadata,
                "steps": result.steps,
                "final_loss": result.final_loss,
                "samples": samples,
                "hints": [h.format(handle=params["handle"], cls=params["class_word"]) for h in PROMPT_HINTS],
            }
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _train_config(self, settings: dict[str, Any]) -> Any:
        """The job's training settings, with this worker's choice about compiling."""
        from trainer.dreambooth import TrainConfig

        config = TrainConfig(**settings)
        return config if self.config.compile_training else replace(config, compiled_stages=False)

    def _samples(self, item: WorkItem, lora_path: Path, emit: EventSink, should_cancel: Any,
                 between_steps: Callable[[], None] | None) -> list[dict]:
        """A few images of the person made with the fresh LoRA, to show in the 'done' message.

        Waiting generations (`between_steps`) are served before each sample: the job's owner waits
        for their own pictures anyway, someone else's /imagine should not wait for all of them.
        """
        from trainer.engine import GenerateRequest

        params = item.params
        key = f"train-{item.job_id}"
        emit(events.stage("generating", "sample images"))
        samples = []
        try:
            for i, template in enumerate(SAMPLE_PROMPTS[: params.get("samples", 2)]):
                if between_steps is not None:
                    between_steps()
                prompt = template.format(handle=params["handle"], cls=params["class_word"])
                request = GenerateRequest(prompt=prompt, seed=params.get("seed", 0) + i,
                                          steps=params.get("sample_steps", 25))
                images = self.engine.generate(request, adapter_key=key, lora_path=lora_path,
                                              handle=params["handle"], class_word=params["class_word"],
                                              should_cancel=should_cancel)
                samples += [{"png": im.png, "seed": im.seed, "prompt": prompt} for im in images]
        finally:
            self.engine.evict(key)
        return samples

    def _generate(self, item: WorkItem, emit: EventSink, should_cancel: Any) -> dict[str, Any]:
        from trainer.engine import GenerateRequest

        params = item.params
        key = params.get("adapter_key")
        lora_path = None
        if key:
            lora_path = self.adapter_file(key)
            if item.blobs.get("lora"):
                lora_path.write_bytes(item.blobs["lora"])
                emit({"type": "adapter_loaded", "key": key})
            elif not lora_path.exists():
                raise TrainerError("The worker lost this model's file; please try again.", "missing_lora")
        emit(events.stage("generating"))
        images = self.engine.generate(
            GenerateRequest(**params["request"]), adapter_key=key, lora_path=lora_path,
            handle=params.get("handle"), class_word=params.get("class_word"), on_event=emit,
            should_cancel=should_cancel, init_image=item.blobs.get("init_image"),
        )
        return {"images": [{"png": im.png, "seed": im.seed} for im in images]}

    def remove_files(self, *, folder_too: bool = False) -> None:
        """Delete everything this worker keeps in its work folder (scratch space, cached LoRA files) as
        it stops: a worker whose next run uses another folder never clears this one, and the people
        whose files are here may ask to be forgotten meanwhile. The class image cache is elsewhere and
        holds no one's data. `folder_too`: the folder was made for this run alone and goes as well."""
        clear_folder(self.work_dir)
        if folder_too:
            try:
                self.work_dir.rmdir()
            except OSError as exc:  # something in it could not be deleted: the log says so, the stop goes on
                log.warning("could not remove the work folder %s: %s", self.work_dir, exc)

    def adapter_file(self, key: str) -> Path:
        return self._adapter_files / f"{uuid.uuid5(uuid.NAMESPACE_OID, key).hex}.safetensors"

    def evict(self, key: str) -> None:
        """Unload a person's adapter and delete its file (called between jobs: the engine is busy in one)."""
        if self._engine is not None:
            self._engine.evict(key)
        self.adapter_file(key).unlink(missing_ok=True)


def describe_failure(exc: BaseException) -> Event:
    """Turn any exception from a job into an error event a person can read."""
    if isinstance(exc, ModelUnavailable):  # the operator's to mend: the details (paths, hints) go to the log
        log.error("the base model is unavailable: %s", exc.message)
        return events.error("The GPU worker could not load its base model, so it cannot run jobs until the "
                            "server's operator fixes that (the details are in the worker's log).", exc.code)
    if isinstance(exc, TrainerError):
        return events.error(exc.message, exc.code)
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        oom = OutOfMemory("The GPU ran out of memory. Try fewer or smaller pictures at once; if it keeps "
                          "happening, tell the server's operator.")
        return events.error(oom.message, oom.code)
    if isinstance(exc, OSError) and exc.errno == 28:
        return events.error("The server's disk is full; the operator has to free some space.", "disk_full")
    reference = uuid.uuid4().hex[:8]
    log.exception("job failed unexpectedly (reference %s)", reference)
    return events.error(f"Something went wrong on the GPU worker (reference {reference}).", "internal")


class Inbox:
    """What the command thread hands the job thread: items to run, adapter keys to evict, or None (stop).

    Entries are taken in order, except that a training takes waiting generations and evictions out of
    turn between its steps, so that a person's /imagine does not wait for someone else's training.
    """

    def __init__(self) -> None:
        self._entries: collections.deque[WorkItem | str | None] = collections.deque()
        self._ready = threading.Condition()

    def put(self, entry: WorkItem | str | None) -> None:
        with self._ready:
            self._entries.append(entry)
            self._ready.notify()

    def get(self) -> WorkItem | str | None:
        with self._ready:
            self._ready.wait_for(lambda: self._entries)
            return self._entries.popleft()

    def waiting_jobs(self) -> list[int]:
        """The ids of the jobs waiting here, oldest first."""
        with self._ready:
            return [entry.job_id for entry in self._entries if isinstance(entry, WorkItem)]

    def take_between_steps(self) -> WorkItem | str | None:
        """The oldest waiting generation or eviction, or None when there is none."""
        with self._ready:
            for entry in self._entries:
                if isinstance(entry, str) or (isinstance(entry, WorkItem) and entry.kind == "generate"):
                    self._entries.remove(entry)
                    return entry
        return None


def end_process() -> None:
    """End this worker process at once, from any thread, skipping the interpreter's clean-up."""
    os._exit(0)


def process_main(commands: Connection, event_pipe: Connection, config: WorkerConfig) -> None:
    """Child-process entry: read commands on a thread, run jobs one at a time on this thread.

    While a training runs, generations sent to this worker are served between its steps and its
    phases (the runner sends at most one such generation per training), on the same loaded model.
    """
    setup_logging(config.log_level)
    if config.cpu_threads:
        import torch

        torch.set_num_threads(config.cpu_threads)
    worker = Worker(config)
    inbox = Inbox()
    cancelled: set[int] = set()
    # Set when the bot stops or goes away: the running job stops at its next step and reports
    # nothing, so it stays `running` in the database and is re-queued (from its last checkpoint)
    # when the bot starts again.
    stopping = threading.Event()
    # Set until `worker.prepare()` returns: jobs sent meanwhile wait in the inbox, and are told why,
    # with the start's news (`start_part`) as each part begins and every START_NEWS_EVERY_S. The
    # lock keeps that news and a job's arrival in order, and none of it after the start ends.
    starting = threading.Event()
    starting.set()
    start_lock = threading.Lock()
    start_began = time.monotonic()
    start_part = FIRST_PART
    send_lock = threading.Lock()

    def send(job_id: int, event: Event) -> None:
        with send_lock:
            event_pipe.send((job_id, event))

    def tell_start(job_ids: list[int]) -> None:
        """Under `start_lock`: what the start is doing, to these waiting jobs."""
        if starting.is_set():
            news = events.stage("loading_model", starting_detail(start_part, time.monotonic() - start_began))
            for job_id in job_ids:
                send(job_id, news)

    def start_moved_on(part: str) -> None:
        nonlocal start_part
        with start_lock:
            start_part = part
            tell_start(inbox.waiting_jobs())

    def retell_start() -> None:
        while starting.is_set():
            time.sleep(START_NEWS_EVERY_S)
            with start_lock:
                tell_start(inbox.waiting_jobs())

    def stop() -> None:
        """The bot asked this worker to stop, or went away."""
        if starting.is_set():
            # Before `prepare()` returns no job has run, so there is nothing to finish or report: end
            # at once rather than compile for many more minutes beside the worker a restarted bot
            # starts (inductor writes its cache files whole, so what was compiled so far is kept).
            log.info("worker stopping during its start")
            end_process()
        stopping.set()
        inbox.put(None)

    def read_commands() -> None:
        while True:
            try:
                message = commands.recv()
            except (EOFError, OSError):
                stop()
                return
            op = message["op"]
            if op == "run":
                item = message["item"]
                with start_lock:  # told before the item is queued, so the job's own events follow it
                    tell_start([item.job_id])
                    inbox.put(item)
            elif op == "cancel":
                cancelled.add(message["job_id"])
            elif op == "evict":
                # The file goes at once (the person may be waiting on /forget); the loaded weights go
                # as soon as no job may be using them.
                worker.adapter_file(message["key"]).unlink(missing_ok=True)
                inbox.put(message["key"])
            elif op == "stop":
                stop()
                return

    def serve_waiting() -> None:
        while (entry := inbox.take_between_steps()) is not None:
            if isinstance(entry, str):
                worker.evict(entry)
            else:
                execute(entry)

    def execute(item: WorkItem) -> bool:
        """Run one item and report its outcome; False when a shutdown cut it short."""
        job_id = item.job_id

        def should_cancel() -> bool:
            return job_id in cancelled or stopping.is_set()

        try:
            return worker.execute(item, lambda event: send(job_id, event), should_cancel,
                                  between_steps=serve_waiting if item.kind == "train" else None,
                                  stopping=stopping.is_set)
        finally:
            cancelled.discard(job_id)

    threading.Thread(target=read_commands, name="commands", daemon=True).start()
    threading.Thread(target=retell_start, name="start-news", daemon=True).start()
    try:
        worker.prepare(on_part=start_moved_on)
    except Exception as exc:  # the first job reports it to its owner
        log.error("could not load the base model or warm up yet: %s", exc)
    finally:
        with start_lock:
            starting.clear()
    while (entry := inbox.get()) is not None and not stopping.is_set():
        if isinstance(entry, str):
            worker.evict(entry)
        elif not execute(entry):
            break
    log.info("worker stopping")
