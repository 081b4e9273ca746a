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
import io
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from PIL import Image, UnidentifiedImageError

from jobs import events
from jobs.events import EventSink
from jobs.requests import DEFAULT_BASE_MODEL, TrainConfig
from trainer import adapters, compiled_blocks, lora_io
from trainer.checkpoint import TrainState, load_checkpoint, save_checkpoint
from trainer.checkpoint_archive import CheckpointSaved
from trainer.class_images import ensure_class_images
from trainer.dataset import (
    ENCODE_BATCH,
    LatentCache,
    PhotoInput,
    class_pixels,
    encode_latents,
    instance_pixels,
)
from trainer.errors import BadCheckpoint, BadPhoto, Cancelled, MissingDependency, OutOfMemory, TooFewPhotos
from trainer.family import Conditioning, Family, family_of
from trainer.pipelines import cast_module, load_pipeline, pick_device, pick_dtype

log = logging.getLogger(__name__)

ADAPTER = "dreambooth"
CHECKPOINT_NAME = "checkpoint.safetensors"
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# Fields that must match between a checkpoint and the run resuming from it; the others (steps,
# checkpoint and preview intervals) may change, so a finished training can be extended.
RESUME_FIELDS = ("learning_rate", "rank", "alpha", "train_text_encoder", "text_encoder_lr",
                 "prior_preservation", "prior_loss_weight", "num_class_images", "resolution", "batch_size",
                 "snr_gamma", "noise_offset", "seed", "lora_targets", "adam_weight_decay", "max_grad_norm")
REPORT_EVERY_S = 1.0
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
          compile_backend: compiled_blocks.Backend = "inductor") -> TrainResult:
    """Train a LoRA of the person in `photos`, called `handle`, a `class_word` ("woman", "man", ...).

    `pipeline` reuses a base model already in memory (it is restored afterwards: our adapter removed,
    dtypes and modes as they were); otherwise `base_model` is loaded. `base_model` also names the
    class-image cache and the LoRA metadata. Checkpoints go to `work_dir`; `resume_from` continues one.
    `serve_riders` is called between training steps, and within the job's other phases, with the
    pipeline usable for inference (a worker serves waiting generations there); adapters and modes
    are put back before the training goes on (TrainingRun.serve_riders). `compile_backend` is
    torch.compile's for `config.compiled_stages` (tests pass a cheap one).
    Raises TooFewPhotos, BadPhoto, OutOfMemory, ModelUnavailable, DiskFull, Cancelled, BadCheckpoint.
    """
    if len(photos) < config.min_photos:
        raise TooFewPhotos(f"Training needs at least {config.min_photos} photos of you; I have {len(photos)}. "
                           "Send a few more (different angles, lighting and expressions help).")
    run = TrainingRun(photos, handle.strip(), class_word.strip(), config, base_model=base_model,
                      out_dir=Path(out_dir), work_dir=Path(work_dir), class_cache_dir=Path(class_cache_dir),
                      on_event=on_event, should_cancel=should_cancel, resume_from=resume_from,
                      serve_riders=serve_riders, compile_backend=compile_backend)
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
    if not config.compiles_on(pipeline.device.type):
        return 0.0
    log.info("compiling the training step: minutes the first time, far less once inductor's cache holds it")
    started = time.monotonic()
    cfg = replace(config, steps=1, num_class_images=1, class_image_steps=2, class_image_batch=1,
                  checkpoint_every=0, preview_every=0, min_photos=1)
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
    """One training and the state its phases share; `train` drives it, benchmarks step it one by one.

    Inside `session()` the pipeline is ready (class images made, latents and prompts cached, adapters
    added, optimiser built, checkpoint restored); `train_step()` runs one optimisation step, `loop()`
    runs the remaining steps with events, checkpoints and cancellation, and `save()` writes the files.
    """

    def __init__(self, photos: Sequence[PhotoInput], handle: str, class_word: str, config: TrainConfig, *,
                 base_model: str, out_dir: Path, work_dir: Path, class_cache_dir: Path, on_event: EventSink,
                 should_cancel: Callable[[], bool], resume_from: Path | None,
                 serve_riders: Callable[[], None] | None = None,
                 compile_backend: compiled_blocks.Backend = "inductor") -> None:
        self.photos, self.handle, self.class_word, self.config = photos, handle, class_word, config
        self.base_model, self.out_dir, self.work_dir = base_model, out_dir, work_dir
        self.class_cache_dir, self.on_event, self.should_cancel = class_cache_dir, on_event, should_cancel
        self.resume_from = resume_from
        self._serve_riders = serve_riders
        self.compile_backend = compile_backend
        self.trained: dict[str, torch.nn.Module] = {}  # the modules that train an adapter, once added
        self._graphed: Callable[..., Any] | None = None
        self.capture_s: float | None = None  # time spent capturing CUDA graphs, once per run
        self._stage_detail = ""  # of the training stage, as the person last saw it

    # ---- orchestration -------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, pipeline: DiffusionPipeline | None, device: str = "auto") -> Iterator[None]:
        """Prepare everything the loop needs; on exit the pipeline is restored. `device` is used only
        when no pipeline is given (a given pipeline trains where it is)."""
        cfg = self.config
        self.on_event(events.Stage("preparing"))
        resume = self._load_resume()
        try:
            pixels = instance_pixels(self.photos, cfg.resolution)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise BadPhoto("One of the photos could not be read as an image. Remove it and try again.") from exc
        if pipeline is None:
            dev = pick_device(device)
            self.on_event(events.Stage("loading_model"))
            pipeline = load_pipeline(self.base_model, device=dev,
                                     dtype=resolve_dtype(cfg.mixed_precision, dev, None))
        self.pipe = pipeline
        self.family: Family = family_of(pipeline)
        self.device = pipeline.device
        self.dtype = resolve_dtype(cfg.mixed_precision, self.device.type, pipeline.unet.dtype)
        with _prepared_pipeline(pipeline, self.family, self.dtype, cfg.gradient_checkpointing):
            class_paths = []
            if cfg.prior_preservation:
                self.on_event(events.Stage("class_images"))
                class_paths = ensure_class_images(
                    pipeline, self.base_model, class_prompt(self.class_word), cfg.resolution,
                    cfg.num_class_images, self.class_cache_dir, steps=cfg.class_image_steps,
                    batch_size=cfg.class_image_batch, on_event=self.on_event,
                    should_cancel=self.should_cancel, serve_riders=self.serve_riders).paths
            self.on_event(events.Stage("caching"))
            self._cache(pixels, class_paths)
            self._add_adapters()
            self._build_optimizer()
            if resume is not None:
                self._restore(resume)
            else:
                self.step, self.losses = 0, []
            yield

    def _load_resume(self) -> TrainState | None:
        if self.resume_from is None:
            return None
        state = load_checkpoint(Path(self.resume_from))
        mine = {**self.config.to_dict(), "base_model": self.base_model}
        # Checkpoints from before the base model was recorded have none: those are taken as they were.
        fields = RESUME_FIELDS + (("base_model",) if "base_model" in state.config else ())
        different = [k for k in fields if state.config.get(k) != mine.get(k)]
        if different:
            raise BadCheckpoint("The checkpoint was made with different settings "
                                f"({', '.join(different)}), so the training cannot continue from it.")
        return state

    # ---- data --------------------------------------------------------------------------------
    def _cache(self, pixels: torch.Tensor, class_paths: list[Path]) -> None:
        """Encode every image and both prompts once; the loop only indexes into these tensors."""
        cfg = self.config
        # Batch by batch, decoding class images as they are needed, serving generations in between.
        parts = [encode_latents(self.pipe.vae, pixels, serve_riders=self.serve_riders)]
        for start in range(0, len(class_paths), ENCODE_BATCH):
            batch = class_pixels(class_paths[start:start + ENCODE_BATCH], cfg.resolution)
            parts.append(encode_latents(self.pipe.vae, batch, serve_riders=self.serve_riders))
        self.latents = LatentCache.cat(parts)
        self.n_instance = parts[0].mean.shape[0]
        self.n_class = len(class_paths)
        self.scaling = self.pipe.vae.config.scaling_factor
        prompts = [instance_prompt(self.handle, self.class_word), class_prompt(self.class_word)]
        self.token_ids = self.family.token_ids(self.pipe, prompts, self.device)
        # Row i of the batch uses prompt 0 (instance) for the first half, prompt 1 (class) for the rest.
        rows = [0] * cfg.batch_size + ([1] * cfg.batch_size if class_paths else [])
        self.prompt_rows = torch.tensor(rows, device=self.device)
        self.cached_cond: Conditioning | None = None
        if not cfg.train_text_encoder:
            with torch.no_grad():
                self.cached_cond = self.family.encode(self.pipe, self.token_ids, cfg.resolution).select(
                    self.prompt_rows)

    def _conditioning(self) -> Conditioning:
        if self.cached_cond is not None:
            return self.cached_cond
        return self.family.encode(self.pipe, self.token_ids, self.config.resolution).select(self.prompt_rows)

    # ---- model and optimiser -----------------------------------------------------------------
    def _add_adapters(self) -> None:
        cfg = self.config
        common = {"r": cfg.rank, "lora_alpha": cfg.lora_alpha, "init_lora_weights": "gaussian"}
        self.lora_configs = {"unet": LoraConfig(**common, target_modules=list(cfg.lora_targets))}
        if cfg.train_text_encoder:
            for name in self.family.text_encoder_names:
                self.lora_configs[name] = LoraConfig(**common, target_modules=list(TEXT_LORA_TARGETS))
        self.trained = {name: getattr(self.pipe, name) for name in self.lora_configs}
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed)  # LoRA's gaussian init draws from the global generator
            for name, module in self.trained.items():
                adapters.add_lora(module, self.lora_configs[name], ADAPTER)
        cast_training_params(list(self.trained.values()), dtype=torch.float32)
        in_modules = {f"{name}.{p_name}": p for name, module in self.trained.items()
                      for p_name, p in module.named_parameters() if p.requires_grad}
        # The optimiser's parameters: fp32 always. Under bf16 the LoRA layers compute in bf16 like the
        # frozen weights they sit on (fp32 LoRA weights would turn every LoRA product into an fp32
        # GEMM plus casts of its activations: a fifth of a step's GPU time), and the optimiser keeps
        # fp32 master copies that are copied back after each step. fp16 keeps fp32 LoRA weights:
        # its loss scaler unscales fp32 gradients only.
        self._lora_weights: list[torch.nn.Parameter] | None = None
        if self.dtype == torch.bfloat16:
            self.params = {k: torch.nn.Parameter(p.detach().clone()) for k, p in in_modules.items()}
            for master in self.params.values():
                master.grad = torch.zeros_like(master)
            for weight in in_modules.values():
                weight.data = weight.data.to(torch.bfloat16)
            self._lora_weights = list(in_modules.values())
        else:
            self.params = in_modules
        self.param_list = list(self.params.values())
        if cfg.gradient_checkpointing:
            self.pipe.unet.enable_gradient_checkpointing()
            for name, module in self.trained.items():
                if name != "unet":
                    module.gradient_checkpointing_enable()
        self.pipe.unet.train()

    def _build_optimizer(self) -> None:
        cfg = self.config
        unet_params = [p for k, p in self.params.items() if k.startswith("unet.")]
        text_params = [p for k, p in self.params.items() if not k.startswith("unet.")]
        groups: list[dict[str, Any]] = [{"params": unet_params, "lr": cfg.learning_rate}]
        if text_params:
            groups.append({"params": text_params, "lr": cfg.text_encoder_lr})
        kwargs = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": cfg.adam_weight_decay}
        if cfg.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError as exc:
                raise MissingDependency("8-bit Adam needs the bitsandbytes package (CUDA only): "
                                        "pip install bitsandbytes, or turn use_8bit_adam off.") from exc
            self.optimizer: torch.optim.Optimizer = bnb.optim.AdamW8bit(groups, **kwargs)
        elif self.device.type == "cuda":
            self.optimizer = torch.optim.AdamW(groups, fused=True, **kwargs)
        else:
            self.optimizer = torch.optim.AdamW(groups, foreach=True, **kwargs)
        # fp16 activations underflow in backward without loss scaling; bf16 and fp32 need none.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        acp = self.noise_scheduler.alphas_cumprod.to(self.device)
        self.snr = acp / (1 - acp)
        self.prediction_type = self.noise_scheduler.config.prediction_type

    def _restore(self, state: TrainState) -> None:
        missing = set(self.params) ^ set(state.params)
        if missing or any(param.shape != state.params[key].shape for key, param in self.params.items()):
            raise BadCheckpoint("The checkpoint does not match this model's LoRA layers, so the training "
                                "cannot continue from it.")
        try:
            self.generator.set_state(state.rng)
        except (RuntimeError, ValueError) as exc:  # a CPU generator's state on a GPU, or the reverse
            raise BadCheckpoint("The checkpoint was made on another kind of device, so the training cannot "
                                "continue from it.") from exc
        with torch.no_grad():
            for key, param in self.params.items():
                param.copy_(state.params[key])
        self._copy_masters_to_lora()
        self.optimizer.load_state_dict(state.optimizer)
        if self.scaler is not None and state.scaler:
            self.scaler.load_state_dict(state.scaler)
        self.step, self.losses = state.step, list(state.losses)
        log.info("resuming training at step %d", self.step)

    # ---- the loop ----------------------------------------------------------------------------
    def train_step(self) -> torch.Tensor:
        """One optimisation step; returns the loss, still on the device (reading it forces a sync)."""
        cfg = self.config
        if self._graphable():
            noisy, timesteps, target = self._draw()
            if self._graphed is None:
                with self._compiled_stages():
                    self._graphed = self._capture(noisy, timesteps, target)
            loss = self._graphed(noisy, timesteps, target)
        else:
            with self._compiled_stages():
                loss = self._loss()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.param_list, cfg.max_grad_norm, foreach=True)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self._copy_grads_to_masters()
            torch.nn.utils.clip_grad_norm_(self.param_list, cfg.max_grad_norm, foreach=True)
            self.optimizer.step()
            self._copy_masters_to_lora()
        if self._lora_weights is None:
            self.optimizer.zero_grad(set_to_none=True)  # master gradients are overwritten instead
        self.step += 1
        return loss.detach().clone()  # a graph's output is overwritten by its next replay

    def _copy_grads_to_masters(self) -> None:
        """Hand the LoRA layers' bf16 gradients to the fp32 masters the optimiser steps (bf16 runs only)."""
        if self._lora_weights is not None:
            grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in self._lora_weights]
            torch._foreach_copy_([m.grad for m in self.param_list], grads)
            for weight in self._lora_weights:
                weight.grad = None

    @torch.no_grad()
    def _copy_masters_to_lora(self) -> None:
        """Round the fp32 master weights into the LoRA layers' bf16 weights (bf16 runs only)."""
        if self._lora_weights is not None:
            torch._foreach_copy_(self._lora_weights, self.param_list)

    def _graphable(self) -> bool:
        return self.config.graphs_on(self.device.type)

    @property
    def compiles(self) -> bool:
        """Whether the step runs the UNet's stages compiled."""
        return self.config.compiles_on(self.device.type)

    @contextlib.contextmanager
    def _compiled_stages(self) -> Iterator[None]:
        """The UNet's stages compiled for the length of the block, if `config.compiled_stages` says so.

        Only the step's forward (and the backward it records) runs inside: the graphs keep the
        compiled kernels, and generations served between steps never meet the training's variant.
        The first time in the process for this kind of step, the person is told why their training
        sits at its first step for minutes.
        """
        if not self.compiles:
            yield
            return
        regions = compiled_blocks.for_training(self.pipe, self.compile_backend, fuse_linears=self.config.fused_linears)
        kind = ("training", self.config.batch_size * (2 if self.n_class else 1), self.config.rank,
                self.config.lora_targets, self.dtype, self.config.resolution)
        first = kind not in regions.compiled_for
        if first:
            self.on_event(events.Stage("training", COMPILING))
        with regions.installed(whole_stages=True):
            yield
        if first:
            regions.compiled_for.add(kind)
            self.on_event(events.Stage("training", self._stage_detail))

    def _capture(self, noisy: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor) -> Callable[..., Any]:
        """Graph the step's UNet forward and backward; random draws and the optimiser stay outside."""
        started = time.monotonic()
        module = _StepLoss(self).train()
        sample = tuple(t.detach().clone() for t in (noisy, timesteps, target))
        graphed = torch.cuda.make_graphed_callables(module, sample, num_warmup_iters=3, allow_unused_input=True)
        self.capture_s = time.monotonic() - started
        log.info("captured the training step as CUDA graphs in %.1f s", self.capture_s)
        return graphed

    def _loss(self) -> torch.Tensor:
        """One step's loss; draws from the generator in the documented order."""
        return self._forward(*self._draw())

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's noisy latents, timesteps and target, drawn from the generator in the documented order."""
        cfg, g, dev = self.config, self.generator, self.device
        index = torch.randint(0, self.n_instance, (cfg.batch_size,), generator=g, device=dev)
        if self.n_class:
            class_index = torch.randint(0, self.n_class, (cfg.batch_size,), generator=g, device=dev)
            index = torch.cat([index, class_index + self.n_instance])
        latents = self.latents.sample(index, g) * self.scaling
        noise = torch.randn(latents.shape, generator=g, device=dev)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=g, device=dev)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=g, device=dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(
            latents, noise, timesteps)
        return noisy, timesteps, target

    def _forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction and the weighted loss (the part CUDA graphs capture)."""
        cfg = self.config
        cond = self._conditioning()
        added = {k: v.to(self.dtype) for k, v in cond.added.items()} if cond.added else None
        pred = self.pipe.unet(noisy.to(self.dtype), timesteps, cond.hidden_states.to(self.dtype),
                              added_cond_kwargs=added, return_dict=False)[0]
        return weighted_loss(pred, target, timesteps, self.snr, cfg, self.prediction_type)

    def loop(self) -> None:
        """Train up to `config.steps`, reporting progress, writing checkpoints and honouring cancel."""
        cfg = self.config
        total = cfg.steps
        self._stage_detail = f"resumed at step {self.step}" if self.step else ""
        self.on_event(events.Stage("training", self._stage_detail))
        pending: list[torch.Tensor] = []  # losses not yet read back from the device
        started, start_step = time.monotonic(), self.step
        last_report = 0.0
        while self.step < total:
            if self.should_cancel():
                raise Cancelled()
            self.serve_riders()
            pending.append(self.train_step())
            now = time.monotonic()
            # The last step too: a job stopped while saving or drawing its sample pictures then
            # resumes with nothing left to train.
            checkpoint_due = cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or self.step == total)
            if now - last_report >= REPORT_EVERY_S or self.step == total or checkpoint_due:
                self.losses += torch.stack(pending).float().cpu().tolist()
                pending.clear()
                # The first step's graph capture (and compiling) says nothing about the steps to come.
                per_step = (now - started - (self.capture_s or 0.0)) / (self.step - start_step)
                recent = self.losses[-10:]
                self.on_event(events.Progress(self.step, total, loss=sum(recent) / len(recent),
                                              eta_s=per_step * (total - self.step)))
                last_report = now
            if checkpoint_due:
                self._checkpoint()
            if cfg.preview_every and self.step % cfg.preview_every == 0:
                self._send_preview()
        self.losses += torch.stack(pending).float().cpu().tolist() if pending else []
        self.serve_riders()  # before the save

    def serve_riders(self) -> None:
        """Let the worker serve the generations riding on this training now: between steps, and within
        the job's other phases (after each batch of class images and of cached latents, between a
        preview's denoising steps, after the last step), so that a picture asked for at any time waits
        for one step or one batch, not a whole phase. Then the training state is restored.

        Generation may load other adapters and switch them on, and PEFT's `set_adapter` also decides
        which adapter weights require gradients; so every module's adapter state is put back, which
        makes the trained adapter (once added) the only active and trainable one again. Training
        draws only from its own generator, so its results do not change (tests/test_dreambooth.py
        checks this).
        """
        if self._serve_riders is None:
            return
        modules = {name: getattr(self.pipe, name) for name in ("unet", *self.family.text_encoder_names)}
        states = {name: adapters.snapshot(module) for name, module in modules.items()}
        training = self.pipe.unet.training
        self.pipe.unet.eval()
        try:
            self._serve_riders()
        finally:
            for name, module in modules.items():
                adapters.restore(module, states[name])
                if name not in self.trained:
                    module.requires_grad_(False)
            self.pipe.unet.train(training)

    def _checkpoint(self) -> None:
        path = self.work_dir / CHECKPOINT_NAME
        save_checkpoint(path, TrainState(
            step=self.step, params={k: p.detach() for k, p in self.params.items()},
            optimizer=self.optimizer.state_dict(), rng=self.generator.get_state(), losses=list(self.losses),
            config={**self.config.to_dict(), "base_model": self.base_model},
            scaler=self.scaler.state_dict() if self.scaler else None))
        self.on_event(CheckpointSaved(self.step, str(path)))

    @torch.no_grad()
    def _send_preview(self) -> None:
        """A preview is a courtesy: one that fails (out of memory on a small card, say) is skipped,
        and the training goes on."""
        try:
            image = self._preview()
        except Cancelled:
            raise
        except Exception:
            log.warning("the preview at step %d failed; the training goes on without it", self.step,
                        exc_info=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return
        self.on_event(events.Preview(self.step, image))

    def _preview(self) -> bytes:
        cfg = self.config
        size = min(cfg.preview_resolution, cfg.resolution)
        gen_device = "cpu" if self.device.type == "mps" else self.device

        def on_step_end(pipe: DiffusionPipeline, step: int, timestep: Any, tensors: dict) -> dict:
            self.serve_riders()  # a preview takes a few tenths of a second: no one waits that long
            return tensors

        image = self.pipe(prompt=instance_prompt(self.handle, self.class_word), height=size, width=size,
                          num_inference_steps=cfg.preview_steps, callback_on_step_end=on_step_end,
                          generator=torch.Generator(gen_device).manual_seed(cfg.seed)).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    # ---- output ------------------------------------------------------------------------------
    def save(self) -> TrainResult:
        """Write the diffusers and kohya LoRA files into `out_dir`."""
        cfg = self.config
        self.on_event(events.Stage("saving"))
        if self._lora_weights is not None:  # the file gets the fp32 masters, not their bf16 rounding
            for weight, master in zip(self._lora_weights, self.param_list, strict=True):
                weight.data = master.detach().clone()
        metadata = {
            "handle": self.handle, "class_word": self.class_word, "base_model": self.base_model,
            "family": self.family.name, "steps": str(self.step), "rank": str(cfg.rank),
            "alpha": str(cfg.lora_alpha), "resolution": str(cfg.resolution),
            "instance_prompt": instance_prompt(self.handle, self.class_word),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "format_version": lora_io.FORMAT_VERSION,
        }
        states = {name: adapters.lora_state_dict(module, ADAPTER) for name, module in self.trained.items()}
        lora_path = lora_io.save_diffusers(self.out_dir, self.family, states, self.lora_configs, metadata)
        kohya_path = lora_io.save_kohya(self.out_dir / f"{lora_io.safe_file_stem(self.handle)}.safetensors",
                                        self.family, states, cfg.lora_alpha, metadata)
        tail = self.losses[-20:]
        return TrainResult(lora_path=lora_path, kohya_path=kohya_path, steps=self.step,
                           final_loss=sum(tail) / len(tail) if tail else math.nan, losses=list(self.losses),
                           metadata=metadata)


class _StepLoss(torch.nn.Module):
    """One step's UNet forward and loss as a module, the form `make_graphed_callables` takes.

    The UNet is registered so its parameters (the trainable LoRA among them) are the graph's
    autograd inputs; the cached text embeddings are constants captured with it.
    """

    def __init__(self, run: TrainingRun) -> None:
        super().__init__()
        self.unet = run.pipe.unet
        self._forward = run._forward

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._forward(noisy, timesteps, target)


def weighted_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, snr_table: torch.Tensor,
                  config: TrainConfig, prediction_type: str) -> torch.Tensor:
    """MSE per sample, Min-SNR weighted if configured; the second half of the batch is the prior loss."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if config.snr_gamma is not None:
        snr = snr_table[timesteps]
        clipped = torch.clamp(snr, max=config.snr_gamma)
        # Min-SNR-gamma: weight min(SNR, gamma)/SNR for epsilon targets, min(SNR, gamma)/(SNR+1) for v.
        per_sample = per_sample * (clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr)
    if pred.shape[0] == config.batch_size:
        return per_sample.mean()
    instance, prior = per_sample.split(config.batch_size)
    return instance.mean() + config.prior_loss_weight * prior.mean()


@contextlib.contextmanager
def _prepared_pipeline(pipe: DiffusionPipeline, family: Family, dtype: torch.dtype, checkpointing: bool,
                       ) -> Iterator[None]:
    """Freeze the pipeline in `dtype` with any LoRA it already holds switched off, and undo it all after.

    A worker reuses one pipeline for generation and training: adapters the generation engine loaded
    must not leak into class images or cached text embeddings, and the pipeline must come back with
    its dtype, modes and adapters as before, minus the one trained here.
    """
    names = ("unet", "vae", *family.text_encoder_names)
    modules: dict[str, torch.nn.Module] = {n: getattr(pipe, n) for n in names}
    dtypes = {n: m.dtype for n, m in modules.items()}
    before = {n: adapters.snapshot(m) for n, m in modules.items()}
    for name, module in modules.items():
        module.requires_grad_(False)
        if module.dtype != dtype:
            cast_module(module, dtype)
        if before[name] is not None:
            adapters.set_enabled(module, False)
    try:
        yield
    finally:
        pipe.unet.eval()
        if checkpointing:
            pipe.unet.disable_gradient_checkpointing()
        for name, module in modules.items():
            if checkpointing and name in family.text_encoder_names:
                module.gradient_checkpointing_disable()
            if adapters.snapshot(module) is not None:
                adapters.remove_lora(module, ADAPTER, before[name])
            if module.dtype != dtypes[name]:
                cast_module(module, dtypes[name])
