"""LoRA DreamBooth: teach a base model a person from a handful of photos.

The recipe is DreamBooth (Ruiz et al., 2022) with LoRA adapters (Hu et al., 2021) on the UNet's
attention projections, as in diffusers' `train_dreambooth_lora.py`, reorganised for speed:
the photos, their mirror images and the class images are VAE-encoded once and the prompts are encoded
once, so the loop runs only the UNet; frozen weights sit in bf16/fp16, the optimiser updates fp32
LoRA weights (under bf16 the LoRA layers compute with a bf16 copy of them); on CUDA the UNet's
forward and backward replay CUDA graphs, captured from its stages compiled by inductor; losses stay
on the device and are read back only when progress is reported.

Every random draw of the loop comes from one seeded `torch.Generator` on the training device, in a
fixed order per step (instance rows, class rows, latent sample, noise, offset noise, timesteps), and
checkpoints carry that generator's state: a resumed run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image, UnidentifiedImageError

from jobs import events
from jobs.events import EventSink
from jobs.requests import DEFAULT_BASE_MODEL, TrainConfig
from jobs.train_defaults import for_family
from trainer import compiled_blocks, flux_kohya, lora_io, offload, quantization, resume, training_loop
from trainer.borrowed_pipeline import borrowed, lend
from trainer.checkpoint_archive import CheckpointSaved
from trainer.class_images import ensure_class_images
from trainer.dataset import PhotoInput, instance_pixels
from trainer.errors import BadCheckpoint as BadCheckpoint  # re-exported: train raises it
from trainer.errors import BadPhoto, OutOfMemory, TooFewPhotos
from trainer.errors import Cancelled as Cancelled  # re-exported: train raises it
from trainer.family import Family, family_of
from trainer.flow_matching import FlowMatchingStep
from trainer.pipelines import load_pipeline, pick_device, pick_dtype
from trainer.trainable import ADAPTER, Trainable, add_trainable
from trainer.training_data import cache_training_data
from trainer.training_loop import TrainingProgress
from trainer.training_step import TrainingStep

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"
COMPILING = ("compiling the training step for this GPU: the first training of its kind since the "
             "worker started takes a few minutes longer")


@dataclass
class TrainResult:
    lora_path: Path  # diffusers-format pytorch_lora_weights.safetensors
    kohya_path: Path | None  # <handle>.safetensors for A1111/ComfyUI
    steps: int
    final_loss: float  # mean loss of the last 20 steps (one step's loss depends on its random timestep)
    losses: list[float] = field(default_factory=list)  # every step's loss
    metadata: dict[str, str] = field(default_factory=dict)  # the LoRA file's safetensors metadata


def instance_prompt(handle: str, class_word: str) -> str:
    return f"a photo of {handle} {class_word}"


def class_prompt(class_word: str) -> str:
    return f"a photo of a {class_word}"


def resolve_dtype(mixed_precision: str, device: str, current: torch.dtype | None) -> torch.dtype:
    """The dtype frozen weights train in: explicit choice, else the pipeline's own, else the device's best."""
    explicit = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
    if mixed_precision in explicit:
        return explicit[mixed_precision]
    return current if current is not None else pick_dtype(device)


def train(photos: Sequence[PhotoInput], handle: str, class_word: str, config: TrainConfig, *,
          pipeline: DiffusionPipeline | None = None, base_model: str = DEFAULT_BASE_MODEL, out_dir: Path,
          work_dir: Path, class_cache_dir: Path, device: str = "auto", on_event: EventSink = events.ignore,
          should_cancel: Callable[[], bool] = lambda: False, resume_from: Path | None = None,
          serve_riders: Callable[[], None] | None = None,
          compile_backend: compiled_blocks.Backend = "inductor",
          compile_when: Callable[[], bool] | None = None, quantize: str = "none") -> TrainResult:
    """Train a LoRA of the person in `photos`, called `handle`, a `class_word` ("woman", "man", ...).

    `pipeline` reuses a base model already in memory (it is restored afterwards: our adapter removed,
    dtypes and modes as they were); otherwise `base_model` is loaded. `base_model` also names the
    class-image cache and the LoRA metadata. Settings `config` leaves to the base model
    (`TrainConfig.family_defaults`) take its family's values once it is loaded (jobs.train_defaults).
    Checkpoints go to `work_dir`; `resume_from` continues one.
    `serve_riders` is called between training steps, and within the job's other phases, with the
    pipeline usable for inference (a worker serves waiting generations there); adapters and modes
    are put back before the training goes on (TrainingRun.serve_riders). `compile_backend` is
    torch.compile's for `config.compiled_stages` (tests pass a cheap one); `compile_when` lets a
    training that starts uncompiled switch to the compiled step once its code is ready
    (trainer.training_step.TrainingStep). `quantize` is how `base_model` is loaded when no `pipeline`
    is given (trainer.quantization: "int8" keeps a Flux transformer's weights in int8).
    Raises TooFewPhotos, BadPhoto, OutOfMemory, ModelUnavailable, DiskFull, Cancelled, BadCheckpoint.
    """
    if len(photos) < config.min_photos:
        raise TooFewPhotos(f"Training needs at least {config.min_photos} photos of you; I have {len(photos)}. "
                           "Send a few more (different angles, lighting and expressions help).")
    run = TrainingRun(photos, handle.strip(), class_word.strip(), config, base_model=base_model,
                      out_dir=Path(out_dir), work_dir=Path(work_dir), class_cache_dir=Path(class_cache_dir),
                      on_event=on_event, should_cancel=should_cancel, resume_from=resume_from,
                      serve_riders=serve_riders, compile_backend=compile_backend, compile_when=compile_when,
                      quantize=quantize)
    try:
        with run.session(pipeline, device):
            run.loop()
            return run.save()
    except torch.OutOfMemoryError:
        log.warning("training ran out of GPU memory")
    # Past the except block the failed step's tensors are unreachable, so their memory can be returned.
    del run
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise OutOfMemory("The GPU ran out of memory while training. Lower the resolution, the batch size or "
                      "the LoRA rank, turn on gradient checkpointing, or turn off text-encoder training.")


def warm_up(pipeline: DiffusionPipeline, config: TrainConfig, scratch: Path, *,
            compile_backend: compiled_blocks.Backend = "inductor") -> float:
    """Compile the training step for `config`'s shapes now (a worker does it before taking jobs), so
    that no one's training waits minutes for it; returns the seconds spent, 0.0 where nothing compiles.

    One step of a throwaway training on a grey picture, with one quickly drawn class image when the
    config uses prior preservation (which doubles the batch). `scratch` holds its files;
    `compile_backend` is torch.compile's.
    """
    if not config.compiles_on(pipeline.device.type) or not family_of(pipeline).graphs_and_compiling:
        return 0.0
    log.info("compiling the training step: minutes the first time, far less once inductor's cache holds it")
    started = time.monotonic()
    cfg = replace(for_family(config, family_of(pipeline).name), steps=1, num_class_images=1, class_image_steps=2,
                  class_image_batch=1, checkpoint_every=0, preview_every=0, min_photos=1)
    grey = Image.new("RGB", (cfg.resolution, cfg.resolution), (128, 128, 128))
    run = TrainingRun([grey], "warmup", "person", cfg, base_model="warm-up", out_dir=scratch / "out",
                      work_dir=scratch / "work", class_cache_dir=scratch / "classes", on_event=events.ignore,
                      should_cancel=lambda: False, resume_from=None, compile_backend=compile_backend)
    with run.session(pipeline):
        run.train_step()
    elapsed = time.monotonic() - started
    log.info("compiled the training step in %.1f s", elapsed)
    return elapsed


class TrainingRun:
    """One training, as the outline of its phases; `train` drives it, benchmarks step it one by one.

    Inside `session()` the pipeline is ready (class images made, latents and prompts cached, adapters
    added, optimiser built, checkpoint restored); `train_step()` runs one optimisation step, `loop()`
    runs the remaining steps with events, checkpoints and cancellation, and `save()` writes the files.
    The phases' work is done elsewhere: trainer.borrowed_pipeline (the shared pipeline, frozen and
    lent back to generation), trainer.training_data (the cache), trainer.trainable (adapters and
    optimiser), trainer.training_step, trainer.training_loop (steps, progress, previews) and
    trainer.resume (checkpoints); each gets what it needs passed in.
    """

    def __init__(self, photos: Sequence[PhotoInput], handle: str, class_word: str, config: TrainConfig, *,
                 base_model: str, out_dir: Path, work_dir: Path, class_cache_dir: Path, on_event: EventSink,
                 should_cancel: Callable[[], bool], resume_from: Path | None,
                 serve_riders: Callable[[], None] | None = None,
                 compile_backend: compiled_blocks.Backend = "inductor",
                 compile_when: Callable[[], bool] | None = None, quantize: str = "none") -> None:
        self.photos, self.handle, self.class_word, self.config = photos, handle, class_word, config
        self.base_model, self.out_dir, self.work_dir = base_model, out_dir, work_dir
        self.class_cache_dir, self.on_event, self.should_cancel = class_cache_dir, on_event, should_cancel
        self.resume_from = resume_from
        self._serve_riders = serve_riders
        self.compile_backend = compile_backend
        self.compile_when = compile_when
        self.quantize = quantize  # how `base_model` is loaded when no pipeline is given
        self.trainable: Trainable | None = None  # once the adapters are added
        self._step: TrainingStep | None = None
        self.progress = TrainingProgress()
        self._stage_detail = ""  # of the training stage, as the person last saw it

    # ---- preparation -------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, pipeline: DiffusionPipeline | None, device: str = "auto") -> Iterator[None]:
        """Prepare everything the loop needs; on exit the pipeline is restored. `device` is used only
        when no pipeline is given (a given pipeline trains where it is)."""
        self.on_event(events.Stage("preparing"))
        if pipeline is None:
            dev = pick_device(device)
            self.on_event(events.Stage("loading_model"))
            pipeline = load_pipeline(self.base_model, device=dev,
                                     dtype=resolve_dtype(self.config.mixed_precision, dev, None),
                                     quantize=self.quantize)
        self.pipe = pipeline
        self.family: Family = family_of(pipeline)
        # What was left to the base model (its resolution, say) is known now that the model is.
        self.config = cfg = for_family(self.config, self.family.name)
        if not cfg.gradient_checkpointing and quantization.holds_quantized(self.family.denoiser(pipeline)):
            log.info("int8 weights: training with gradient checkpointing, which keeps no 16-bit copy of "
                     "each layer's weight for the backward pass")
            self.config = cfg = replace(cfg, gradient_checkpointing=True)
        state = None
        if self.resume_from is not None:
            state = resume.load_resumable(self.resume_from, self._settings())
        try:
            pixels = instance_pixels(self.photos, cfg.resolution)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise BadPhoto("One of the photos could not be read as an image. Remove it and try again.") from exc
        self.device = pipeline.device
        self.dtype = resolve_dtype(cfg.mixed_precision, self.device.type, self.family.denoiser(pipeline).dtype)
        with borrowed(pipeline, self.family, self.dtype, cfg.gradient_checkpointing, ADAPTER):
            class_paths = []
            if cfg.prior_preservation:
                self.on_event(events.Stage("class_images"))
                class_paths = ensure_class_images(
                    pipeline, self.base_model, class_prompt(self.class_word), cfg.resolution,
                    cfg.num_class_images, self.class_cache_dir, steps=cfg.class_image_steps,
                    batch_size=cfg.class_image_batch, on_event=self.on_event,
                    should_cancel=self.should_cancel, serve_riders=self.serve_riders).paths
            self.on_event(events.Stage("caching"))
            prompts = (instance_prompt(self.handle, self.class_word), class_prompt(self.class_word))
            data = cache_training_data(pipeline, self.family, cfg, self.device, pixels, class_paths, prompts,
                                       self.serve_riders)
            self.trainable = add_trainable(pipeline, self.family, cfg, self.dtype, self.device)
            step_class = FlowMatchingStep if self.family.flow_matching else TrainingStep
            self._step = step_class(pipeline, self.family, cfg, self.device, self.dtype, data,
                                    self.trainable, compile_backend=self.compile_backend,
                                    on_compiling=self._compiling, compile_when=self.compile_when)
            if state is not None:
                self.progress = resume.restore(state, self.trainable, self._step.generator)
            else:
                self.progress = TrainingProgress()
            # With the prompts' embeddings cached, the text encoders and the VAE wait off the GPU
            # (trainer.offload); pictures drawn meanwhile bring them back for their length.
            park = self.family.park_while_training and data.cached_cond is not None
            with offload.parked(self._frozen_modules() if park else [], self.device):
                yield

    def _settings(self) -> dict[str, Any]:
        """What a checkpoint records of this training's settings, and a resumed one must match."""
        return {**self.config.to_dict(), "base_model": self.base_model}

    # ---- the steps ---------------------------------------------------------------------------
    def train_step(self) -> torch.Tensor:
        """One optimisation step; returns the loss, still on the device (reading it forces a sync)."""
        loss = self._step()
        self.progress.step += 1
        return loss

    @property
    def compiles(self) -> bool:
        """Whether the step runs the UNet's stages compiled (now: it may switch to them midway; never a
        Flux transformer's: trainer.flow_matching)."""
        return self._step.compiles if self._step is not None else self.config.compiles_on(self.device.type)

    @property
    def capture_s(self) -> float | None:
        """Seconds the first step spent capturing CUDA graphs (compiling included), once per run;
        None before, and where the step is not graphed."""
        return self._step.capture_s if self._step is not None else None

    @capture_s.setter
    def capture_s(self, seconds: float | None) -> None:
        self._step.capture_s = seconds

    def _compiling(self, busy: bool) -> None:
        """Tell the person why their training sits at its first step for minutes, and take it back."""
        self.on_event(events.Stage("training", COMPILING if busy else self._stage_detail))

    def loop(self) -> None:
        """Train up to `config.steps`, reporting progress, writing checkpoints and honouring cancel."""
        step = self.progress.step
        self._stage_detail = f"resumed at step {step}" if step else ""
        self.on_event(events.Stage("training", self._stage_detail))
        training_loop.run_steps(self.progress, self.config, self.train_step, capture_s=lambda: self.capture_s,
                                checkpoint=self._checkpoint, preview=self._send_preview,
                                serve_riders=self.serve_riders, should_cancel=self.should_cancel,
                                on_event=self.on_event, clock=time.monotonic)

    def serve_riders(self) -> None:
        """Let the worker serve the generations riding on this training now: between steps, and within
        the job's other phases (after each batch of class images and of cached latents, between a
        preview's denoising steps, after the last step), so that a picture asked for at any time waits
        for one step or one batch, not a whole phase. Then the training state is restored
        (trainer.borrowed_pipeline.lend).
        """
        if self._serve_riders is None:
            return
        trained = self.trainable.modules if self.trainable is not None else {}
        lend(self.pipe, self.family, trained, self._serve_riders)

    def _checkpoint(self) -> None:
        path = self.work_dir / CHECKPOINT_NAME
        resume.write_checkpoint(path, self.progress, self.trainable, self._step.generator, self._settings())
        self.on_event(CheckpointSaved(self.progress.step, str(path)))

    def _send_preview(self) -> None:
        training_loop.send_preview(self.progress.step, self._preview, self.device, self.on_event)

    def _frozen_modules(self) -> list[torch.nn.Module]:
        """The text encoders and the VAE: what a training's steps do not run once the cache is made."""
        return [getattr(self.pipe, name) for name in (*self.family.text_encoder_names, "vae")]

    def _preview(self) -> bytes:
        prompt = instance_prompt(self.handle, self.class_word)
        with offload.unparked(self._frozen_modules()):
            return training_loop.render_preview(self.pipe, prompt, self.config, self.device, self.serve_riders)

    # ---- output ------------------------------------------------------------------------------
    def save(self) -> TrainResult:
        """Write the diffusers and kohya LoRA files into `out_dir`."""
        cfg, step, losses = self.config, self.progress.step, self.progress.losses
        self.on_event(events.Stage("saving"))
        states = self.trainable.lora_states()
        metadata = {
            "handle": self.handle, "class_word": self.class_word, "base_model": self.base_model,
            "family": self.family.name, "steps": str(step), "rank": str(cfg.rank),
            "alpha": str(cfg.lora_alpha), "resolution": str(cfg.resolution),
            "instance_prompt": instance_prompt(self.handle, self.class_word),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "format_version": lora_io.FORMAT_VERSION,
        }
        lora_path = lora_io.save_diffusers(self.out_dir, self.family, states, self.trainable.lora_configs,
                                           metadata)
        kohya_path: Path | None = self.out_dir / f"{lora_io.safe_file_stem(self.handle)}.safetensors"
        try:
            lora_io.save_kohya(kohya_path, self.family, states, cfg.lora_alpha, metadata,
                               denoiser=self.family.denoiser(self.pipe))
        except flux_kohya.UnmappedLayer as exc:
            # Targets chosen beyond the recipe's (a Flux embedder, say): the diffusers file holds them all.
            log.warning("no kohya file for this LoRA: %s", exc)
            kohya_path = None
        tail = losses[-20:]
        return TrainResult(lora_path=lora_path, kohya_path=kohya_path, steps=step,
                           final_loss=sum(tail) / len(tail) if tail else math.nan, losses=list(losses),
                           metadata=metadata)
