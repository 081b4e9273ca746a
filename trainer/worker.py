"""The worker: owns a device, keeps the base model loaded and runs jobs on it.

`Worker` holds the logic that every backend runs in its own process: the local backend's child
(`trainer.worker_process`), a Celery worker (`trainer.celery_worker`) and the tests.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from jobs import events, png_parameters
from jobs.events import EventSink
from jobs.payloads import (
    GenerateInputs,
    GenerateOutput,
    GenerateParams,
    Picture,
    TrainInputs,
    TrainOutput,
    TrainParams,
    WorkItem,
)
from jobs.requests import GenerateRequest, TrainConfig
from jobs.train_defaults import FAMILY_TUNED
from jobs.worker_config import WorkerConfig
from trainer import compile_artifacts, gc_pauses, start_helpers
from trainer.background_compile import BackgroundCompile
from trainer.checkpoint_archive import CheckpointSaved, pack_path, unpack_to
from trainer.errors import BadCheckpoint, Cancelled, OutOfMemory, TrainerError
from trainer.failures import describe_failure
from trainer.start_news import FIRST_PART
from trainer.start_report import ARTIFACTS, MODEL, PartTime, StartReport
from trainer.upscale import upscale_job

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
def clear_folder(folder: Path) -> None:
    """Make `folder` exist and hold nothing."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


class Worker:
    """Runs work items on one device with a base pipeline that is loaded once."""

    def __init__(self, config: WorkerConfig, *, shared_artifacts: compile_artifacts.Store | None = None,
                 secret: bytes | None = None) -> None:
        """`shared_artifacts`: where the workers of one bot share their compiled code (Redis with Celery),
        besides this worker's compile cache folder; `secret` signs and checks it there
        (trainer.compile_artifacts)."""
        self.config = config
        self._artifact_stores: list[compile_artifacts.Store] = [
            *([compile_artifacts.FolderStore(Path(config.compile_cache_dir) / "artifacts")]
              if config.compile_cache_dir else []),
            *([shared_artifacts] if shared_artifacts is not None else [])]
        self._secret = secret
        self.work_dir = Path(config.work_dir)
        self._pipeline: Any = None
        self._engine: Any = None
        self._checker: Any = None
        self._checker_tried = False
        # Held while a job runs; the background compile switches parts only when it can take it.
        self._job_lock = threading.RLock()
        self._background: BackgroundCompile | None = None
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
            # torch, diffusers and transformers load their modules here, many of them lazily.
            with gc_pauses.collector_paused():
                from trainer.pipelines import load_pipeline, pick_device

                device = pick_device(self.config.device)
                started = time.perf_counter()
                self._pipeline = load_pipeline(self.config.base_model, device=device,
                                               quantize=self.config.quantize)
            log.info("loaded %s on %s in %.1f s", self.config.base_model, device,
                     time.perf_counter() - started)
        return self._pipeline

    def prepare(self, on_part: Callable[[str], None] = lambda part: None,
                on_timed: Callable[[PartTime], None] = lambda timed: None) -> StartReport:
        """Load the base model (and the image checker), then return: the worker serves from now on.

        What compiles (on a GPU: generation's stages and blocks, the square pictures' static-shape
        code, the default training step) is compiled in the background meanwhile, by start helpers
        where the GPU and the host have room for them, and switched to part by part between jobs
        (trainer.background_compile); `wait_compiled` waits for all of it. `on_part` hears the
        start's part in words for the people whose jobs wait on it; `on_timed` hears each part's time
        as it ends (the model's now, each compiled part's as it is switched to), and the report of
        them all, filled in as they end, is returned (trainer.start_report).
        What exists then lives as long as the worker, so it is frozen out of the garbage collector's
        walks, which would otherwise stall a job for half a second now and then (trainer.gc_pauses)."""
        gc_pauses.log_long_collections()
        report = StartReport(on_timed)
        on_part(FIRST_PART)
        with report.timed(MODEL):
            pipeline = self.pipeline
        _ = self.checker  # loaded now: one that cannot be had is logged as the worker starts
        parts = self.compile_parts()
        if parts:
            from trainer.engine import ANY_SHAPE

            key = compile_artifacts.artifact_key(self.config, str(pipeline.device), parts)
            if self._artifact_stores:
                # Before anything compiles: helpers and this process then read the code from the cache.
                with report.timed(ARTIFACTS):
                    compile_artifacts.load(self._artifact_stores, key, self._secret)

            background = BackgroundCompile(
                parts, self.compile_part, self._job_lock, report,
                after=lambda part: ANY_SHAPE if part.startswith("square-") else None,
                # Reading a part back leaves thousands of long-lived objects (compiled code, guards):
                # frozen at once, they add nothing to the collector's walks during the next jobs.
                on_adopted=gc_pauses.freeze_long_lived,
                on_finished=lambda: compile_artifacts.save(self._artifact_stores, key, self._secret))
            background.start(start_helpers.start(self.config, parts, str(pipeline.device),
                                                 on_end=background.heard_end))
            self._background = background
        gc_pauses.freeze_long_lived()
        return report

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Block until every compiled part is in use (at once where nothing compiles); False on `timeout`."""
        return self._background is None or self._background.wait(timeout)

    def stop_compiling(self) -> None:
        """Switch to no more compiled parts and end the start helpers (the worker is stopping)."""
        if self._background is not None:
            self._background.stop()

    @property
    def checker(self) -> Any:
        """The image checker run on every picture (trainer.safety_checker), None without one."""
        if not self._checker_tried:
            self._checker_tried = True
            if self.config.safety_checker is not None:
                from trainer.safety_checker import load_checker

                self._checker = load_checker(self.config.safety_checker, self.config.base_model,
                                             str(self.pipeline.device))
        return self._checker

    def checked(self, pictures: list[Picture]) -> list[Picture]:
        """`pictures` with the image checker's verdicts (unchanged without a checker)."""
        if self.checker is None:
            return pictures
        verdicts = self.checker.flags([p.png for p in pictures])
        return [replace(p, flagged=v) for p, v in zip(pictures, verdicts, strict=True)]

    @property
    def compile_backend(self) -> Any:
        """torch.compile's backend for this worker's compiled parts (WorkerConfig.compile_backend)."""
        from trainer.compiled_blocks import backend_from_spec

        return backend_from_spec(self.config.compile_backend)

    def _compiles_everywhere(self) -> bool:
        """Whether compiling happens off CUDA too: a backend other than inductor was named."""
        return self.config.compile_backend != "inductor"

    def _training_compiles(self, config: TrainConfig) -> bool:
        """Whether a training with `config` runs its step compiled on this worker, once its code is ready."""
        if not self.config.compile_training:
            return False
        if self._pipeline is not None:
            from trainer.family import family_of

            # A Flux training step runs eagerly (trainer.flow_matching): nothing of it to compile.
            if not family_of(self._pipeline).graphs_and_compiling:
                return False
        if config.compiled_stages is not None:
            return config.compiled_stages
        from trainer.pipelines import pick_device

        return config.graphs_on(pick_device(self.config.device).split(":")[0]) or self._compiles_everywhere()

    def compile_parts(self) -> list[str]:
        """The parts of this worker's start that compile, in the order they are wanted: the engine's
        warm-up parts, then the default training step."""
        parts = self.engine.warm_up_parts()
        if self._training_compiles(TrainConfig()):
            parts.append(start_helpers.TRAINING)
        return parts

    def compile_part(self, part: str) -> None:
        """Compile one part of the start, or read it back from the compile cache where a start helper
        compiled it: the training step, or one of the engine's warm-up parts. The worker then uses it."""
        if part == start_helpers.TRAINING:
            _ = self.engine  # as in a worker's start, the engine sets the modules up first
            self._warm_up_training()
        elif part in self.engine.warm_up_parts():
            self.engine.warm_up(parts=[part])
        else:
            raise ValueError(f"no part of this worker's start is called {part!r}")

    def _warm_up_training(self) -> None:
        """Compile the default training step (trainer.dreambooth.warm_up)."""
        from trainer.dreambooth import warm_up

        scratch = Path(tempfile.mkdtemp(prefix="warm-up-", dir=self.work_dir))
        try:
            # At the base model's resolution (jobs.train_defaults), as the bot's trainings ask by default.
            config = TrainConfig(rank=self.config.train_rank, family_defaults=FAMILY_TUNED,
                                 compiled_stages=True if self._compiles_everywhere() else None)
            warm_up(self.pipeline, config, scratch, compile_backend=self.compile_backend)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    @property
    def engine(self) -> Any:
        if self._engine is None:
            from trainer.engine import GenerationEngine

            # None: where it pays (with CUDA graphs); a backend other than inductor compiles everywhere.
            compile_blocks: bool | None = False
            if self.config.compile_generation:
                compile_blocks = True if self._compiles_everywhere() else None
            self._engine = GenerationEngine(self.pipeline, max_loaded_adapters=self.config.max_adapters,
                                            compile_blocks=compile_blocks, compile_backend=self.compile_backend,
                                            static_shapes=self.config.compile_static_shapes,
                                            model_name=png_parameters.model_name(self.config.base_model),
                                            compiled_after_warm_up=True)
        return self._engine

    def run(self, item: WorkItem, emit: EventSink, should_cancel: Callable[[], bool],
            serve_riders: Callable[[], None] | None = None) -> TrainOutput | GenerateOutput:
        """Run one item; a training calls `serve_riders` between its steps and phases."""
        if isinstance(item.params, TrainParams) and isinstance(item.inputs, TrainInputs):
            return self._train(item.job_id, item.params, item.inputs, emit, should_cancel, serve_riders)
        if isinstance(item.params, GenerateParams) and isinstance(item.inputs, GenerateInputs):
            return self._generate(item.params, item.inputs, emit, should_cancel)
        raise TrainerError(f"Unknown job kind {item.kind!r}.", "bad_job")

    def execute(self, item: WorkItem, emit: EventSink, should_cancel: Callable[[], bool],
                serve_riders: Callable[[], None] | None = None, *,
                stopping: Callable[[], bool] = lambda: False) -> bool:
        """Run `item` and report its outcome through `emit`: `done`, or an `error` a person can read.

        False when `stopping()` says the worker is shutting down: then nothing is reported, the job
        stays running for the bot, which resumes it from its checkpoint later or elsewhere.
        """
        try:
            if should_cancel():
                raise Cancelled()
            with self._job_lock:  # parts compiled in the background are switched to between jobs
                output = self.run(item, emit, should_cancel, serve_riders)
            emit(events.Done(output))
        except BaseException as exc:  # noqa: BLE001 - every failure becomes the job's error event
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            if stopping():
                log.info("job %d interrupted by shutdown; it resumes from its checkpoint", item.job_id)
                return False
            emit(describe_failure(exc))
        return True

    def _train(self, job_id: int, params: TrainParams, inputs: TrainInputs, emit: EventSink,
               should_cancel: Callable[[], bool], serve_riders: Callable[[], None] | None) -> TrainOutput:
        from trainer.dreambooth import train

        emit(events.Stage("loading_model"))
        pipeline = self.pipeline
        scratch = Path(tempfile.mkdtemp(prefix=f"job{job_id}-", dir=self.work_dir))
        try:
            resume_from = None
            if inputs.checkpoint:
                try:
                    resume_from = unpack_to(inputs.checkpoint, scratch / "resume")
                except BadCheckpoint as exc:
                    log.warning("job %d: %s Training from the first step.", job_id, exc.message)

            def forward(event: Any) -> None:
                if isinstance(event, CheckpointSaved):  # the bot keeps checkpoints: send the bytes
                    event = events.Checkpoint(event.step, pack_path(Path(event.path)))
                elif isinstance(event, events.Preview) and self.checker is not None:
                    event = replace(event, flagged=self.checker.flags([event.png])[0])
                emit(event)

            config, compile_when = self._train_config(params.config)

            def attempt(resume: Path | None) -> Any:
                return train(
                    inputs.photos, params.handle, params.class_word, config,
                    pipeline=pipeline, base_model=self.config.base_model,
                    out_dir=scratch / "out", work_dir=scratch / "checkpoints",
                    class_cache_dir=Path(self.config.class_cache_dir), device=self.config.device,
                    on_event=forward, should_cancel=should_cancel, resume_from=resume, serve_riders=serve_riders,
                    compile_backend=self.compile_backend, compile_when=compile_when,
                )

            def run(resume: Path | None) -> Any:
                # A GPU too small for the fast step (SDXL at 1024 px on a 24 GB card, say) trains with
                # gradient checkpointing: slower, far less memory. The class images made are kept.
                nonlocal config
                try:
                    return attempt(resume)
                except OutOfMemory:
                    if config.gradient_checkpointing:
                        raise
                log.warning("job %d: out of GPU memory; training again with gradient checkpointing", job_id)
                emit(events.Stage("preparing", "the GPU is short of memory: trying a slower way that needs less"))
                config = replace(config, gradient_checkpointing=True)
                return attempt(resume)

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
                            job_id, exc.message)
                emit(events.Stage("preparing", "the saved progress could not be used; starting again"))
                result = run(None)
            try:
                samples = self._samples(job_id, params, result.lora_path, emit, should_cancel, serve_riders)
            except Cancelled:
                raise
            except Exception:  # the model is whole: it is kept, without its sample pictures
                log.warning("job %d: drawing the sample pictures failed; the model is kept without them",
                            job_id, exc_info=True)
                samples = []
            return TrainOutput(
                lora=result.lora_path.read_bytes(),
                kohya=result.kohya_path.read_bytes() if result.kohya_path else None,
                metadata=result.metadata, steps=result.steps, final_loss=result.final_loss, samples=samples,
                hints=[h.format(handle=params.handle, cls=params.class_word) for h in PROMPT_HINTS],
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _train_config(self, config: TrainConfig) -> tuple[TrainConfig, Callable[[], bool] | None]:
        """The job's training settings with this worker's choice about compiling: compiled if the
        training step's compiled code is in use here already; uncompiled if it is still compiling in
        the background, with what tells the training, before each step, that it may switch to it."""
        compiles = self._training_compiles(config)
        background = self._background
        if not compiles or background is None or background.adopted(start_helpers.TRAINING):
            return replace(config, compiled_stages=compiles), None
        return replace(config, compiled_stages=False), lambda: background.compiled(start_helpers.TRAINING)

    def _samples(self, job_id: int, params: TrainParams, lora_path: Path, emit: EventSink,
                 should_cancel: Callable[[], bool], serve_riders: Callable[[], None] | None) -> list[Picture]:
        """A few images of the person made with the fresh LoRA, to show in the 'done' message.

        Riders are served before each sample: the job's owner waits for their own pictures anyway,
        someone else's /imagine should not wait for all of them.
        """
        key = f"train-{job_id}"
        emit(events.Stage("generating", "sample images"))
        samples = []
        try:
            for i, template in enumerate(SAMPLE_PROMPTS[: params.samples]):
                if serve_riders is not None:
                    serve_riders()
                prompt = template.format(handle=params.handle, cls=params.class_word)
                request = GenerateRequest(prompt=prompt, seed=params.seed + i, steps=params.sample_steps)
                images = self.engine.generate(request, adapter_key=key, lora_path=lora_path,
                                              handle=params.handle, class_word=params.class_word,
                                              should_cancel=should_cancel)
                samples += [replace(im, prompt=prompt) for im in self.checked(images)]
        finally:
            self.engine.evict(key)
        return samples

    def _generate(self, params: GenerateParams, inputs: GenerateInputs, emit: EventSink,
                  should_cancel: Callable[[], bool]) -> GenerateOutput:
        key = params.adapter_key
        lora_path = None
        if key:
            lora_path = self.adapter_file(key)
            if inputs.lora:
                lora_path.write_bytes(inputs.lora)
                emit(events.AdapterLoaded(key))
            elif not lora_path.exists():
                raise TrainerError("The worker lost this model's file; please try again.", "missing_lora")
        if params.upscale_of is not None:
            return GenerateOutput(self.checked(upscale_job(self.engine, params, inputs, lora_path, emit,
                                                           should_cancel)))
        emit(events.Stage("generating"))
        images = self.engine.generate(
            params.request, adapter_key=key, lora_path=lora_path, handle=params.handle,
            class_word=params.class_word, on_event=emit, should_cancel=should_cancel,
            init_image=inputs.init_image,
        )
        return GenerateOutput(self.checked(images))

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

