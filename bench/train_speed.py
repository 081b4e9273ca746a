"""Training speed: this trainer's step against the plain diffusers recipe, in one process.

Measures ms per training step (median of timed steps after warm-up) and peak GPU memory for the
trainer at its default config, with and without prior preservation, and for a baseline that follows
diffusers' examples/dreambooth/train_dreambooth_lora.py: VAE encoder and text encoder run every step,
LoRA weights in fp32 with the UNet forward under autocast, torch's default (non-fused) AdamW. On an
SDXL base the baseline follows train_dreambooth_lora_sdxl.py instead (`PlainXLRecipe`): the VAE in
fp32 encodes every step, both text encoders run once for the two prompts, and the UNet gets the pooled
text and the six size ids as added conditions. The resolution is the base model's (512 px for SD1.5,
1024 for SDXL; jobs.train_defaults).

    python -m bench.train_speed                          # full-size random SD1.5 at 512 px on the GPU
    python -m bench.train_speed --model sdxl-random      # full-size random SDXL at 1024 px on the GPU
    python -m bench.train_speed --model tiny --steps 5   # CPU smoke test (tiny-sdxl: SDXL's layout)
    python -m bench.train_speed --json results.json
    python -m bench.train_speed --dtype fp16             # as on a GPU without bf16 (T4): fp16 + loss scaling
    python -m bench.train_speed --gradient-checkpointing # also ours with it: the memory a 24 GB card needs
    python -m bench.train_speed --model flux-random --quantize int8 --resolution 512 --gradient-checkpointing
                                                         # Flux with int8 weights, as a 24 GB card trains it

Within a ten-minute run on a cold compile cache (SDXL's compile takes minutes): `--prior yes` for one
side of the comparison, `--no-variants` to skip the extra variants of ours, `--no-compile` for graphs
of plain stages, fewer `--steps`, and `--no-recipe` or `--no-ours` to time each side in its own run.

`PlainRecipe` draws its random numbers in the same order as the trainer, so in fp32 both produce the
same losses step by step (tests/trainer/test_dreambooth.py checks this); only where the work is done differs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.training_utils import cast_training_params, compute_density_for_timestep_sampling, compute_snr
from peft import LoraConfig
from PIL import Image

from jobs.requests import TrainConfig
from jobs.train_defaults import FAMILY_TUNED, for_family
from jobs.worker_config import QUANTIZE_MODES
from trainer.class_images import ensure_class_images
from trainer.dataset import PhotoInput, class_pixels, instance_pixels
from trainer.dreambooth import TrainingRun, class_prompt, instance_prompt
from trainer.family import family_of, tokenize
from trainer.flow_matching import TRAIN_GUIDANCE
from trainer.pipelines import cast_module, load_pipeline, pick_device, pick_dtype
from trainer.training_step import without_cudnn_attention

HANDLE, CLASS_WORD = "sks", "woman"
# --prior: which steps to time (with prior preservation or not)
PRIORS = {"both": (True, False), "yes": (True,), "no": (False,)}
# --dtype: the frozen weights' dtype. The trainer's default precision ("auto") follows it, so fp16
# weights train as on a GPU without bf16 (fp16 with a gradient scaler); the recipe runs under autocast
# to the same dtype.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def add_recipe_lora(denoiser: torch.nn.Module, config: TrainConfig,
                    ) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """The example scripts' LoRA on the UNet or transformer: Gaussian-initialised from `config.seed`,
    fp32 over the frozen weights, in training mode; its parameters and torch's default AdamW."""
    torch.manual_seed(config.seed)
    denoiser.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, init_lora_weights="gaussian",
                                    target_modules=list(config.lora_targets)))
    cast_training_params(denoiser, dtype=torch.float32)
    denoiser.train()
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(0.9, 0.999),
                                  weight_decay=config.adam_weight_decay, eps=1e-8)
    return params, optimizer


class PlainRecipe:
    """One LoRA DreamBooth step as diffusers' example script does it (SD1.x pipelines; `recipe_for`
    picks the SDXL one).

    Random draws per step, in order: instance rows, class rows, the VAE latent sample, noise, offset
    noise, timesteps, all from one generator seeded with `config.seed` (the example script draws from
    the global generator in the same order). The LoRA is initialised from `config.seed` as well.
    """

    family = "sd15"

    def __init__(self, pipe: DiffusionPipeline, photos: list[PhotoInput], config: TrainConfig,
                 class_paths: list[Path]) -> None:
        if family_of(pipe).name != self.family:
            raise ValueError(f"this recipe baseline covers {self.family} pipelines only; use recipe_for")
        self.pipe, self.config = pipe, config
        self.device = pipe.device
        self.weight_dtype = pipe.unet.dtype
        for module in (pipe.unet, pipe.vae, *(getattr(pipe, name) for name in family_of(pipe).text_encoder_names)):
            module.requires_grad_(False)
        self.params, self.optimizer = add_recipe_lora(pipe.unet, config)
        self.instance = instance_pixels(photos, config.resolution).to(self.device)
        self.classes = class_pixels(class_paths, config.resolution).to(self.device) if class_paths else None
        # Row 0 of the prompts is the instance prompt, row 1 the class prompt.
        rows = [0] * config.batch_size + ([1] * config.batch_size if class_paths else [])
        self.rows = torch.tensor(rows, device=self.device)
        self.prompts = [instance_prompt(HANDLE, CLASS_WORD), class_prompt(CLASS_WORD)]
        self.input_ids = tokenize(pipe.tokenizer, self.prompts, self.device)[self.rows]
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.autocast = self.weight_dtype != torch.float32

    def step(self) -> torch.Tensor:
        cfg, g, dev = self.config, self.generator, self.device
        index = torch.randint(0, self.instance.shape[0], (cfg.batch_size,), generator=g, device=dev)
        pixels = self.instance[index]
        if self.classes is not None:
            class_index = torch.randint(0, self.classes.shape[0], (cfg.batch_size,), generator=g, device=dev)
            pixels = torch.cat([pixels, self.classes[class_index]])
        latents = self.encode(pixels, g)
        noise = torch.randn(latents.shape, generator=g, device=dev, dtype=latents.dtype)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=g, device=dev,
                                                           dtype=latents.dtype)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=g, device=dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        pred = self.predict(noisy, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        target = noise if prediction_type == "epsilon" else self.noise_scheduler.get_velocity(
            latents, noise, timesteps)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.snr_gamma is not None:
            snr = compute_snr(self.noise_scheduler, timesteps)
            weights = torch.stack([snr, cfg.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
            loss = loss * (weights / (snr + 1) if prediction_type == "v_prediction" else weights / snr)
        if self.classes is not None:
            instance_loss, prior_loss = loss.chunk(2)
            loss = instance_loss.mean() + cfg.prior_loss_weight * prior_loss.mean()
        else:
            loss = loss.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach()

    def encode(self, pixels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Scaled latents of the step's pictures: the VAE encodes every step, in the weights' dtype."""
        latents = self.pipe.vae.encode(pixels.to(self.weight_dtype)).latent_dist.sample(generator=g)
        return latents * self.pipe.vae.config.scaling_factor

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction; the text encoder runs every step, as the script does by default."""
        encoder_hidden_states = self.pipe.text_encoder(self.input_ids, return_dict=False)[0]
        with torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=self.autocast):
            return self.pipe.unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]

    def close(self) -> None:
        """Take the LoRA out again, so the pipeline can serve the next variant."""
        self.pipe.unet.unload_lora()
        self.pipe.unet.eval()


class PlainXLRecipe(PlainRecipe):
    """One LoRA DreamBooth step as diffusers' train_dreambooth_lora_sdxl.py does it (its defaults: one
    prompt for all photos, text encoders frozen).

    The script keeps the VAE in fp32 ("to avoid NaN losses") and encodes the batch with it every step,
    casting the latents to the weights' dtype; it runs both text encoders once, before the first step,
    for the instance and the class prompt; the UNet also gets the second encoder's pooled embedding
    and the six size ids (original size, crop corner, target size: photos are resized to a square,
    so resolution, 0, 0, resolution). The loss is computed as `PlainRecipe` does; the script leaves
    the prior half out of the Min-SNR weighting, the same work.
    """

    family = "sdxl"

    def __init__(self, pipe: DiffusionPipeline, photos: list[PhotoInput], config: TrainConfig,
                 class_paths: list[Path]) -> None:
        super().__init__(pipe, photos, config, class_paths)
        self.vae_dtype = pipe.vae.dtype
        cast_module(pipe.vae, torch.float32)
        with torch.no_grad():
            first = pipe.text_encoder(tokenize(pipe.tokenizer, self.prompts, self.device), output_hidden_states=True)
            second = pipe.text_encoder_2(tokenize(pipe.tokenizer_2, self.prompts, self.device),
                                         output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        self.encoder_hidden_states = hidden[self.rows]
        res = config.resolution
        self.added = {"text_embeds": second.text_embeds[self.rows],
                      "time_ids": torch.tensor([[res, res, 0, 0, res, res]], device=self.device,
                                               dtype=self.weight_dtype).expand(len(self.rows), -1)}

    def encode(self, pixels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        latents = self.pipe.vae.encode(pixels.float()).latent_dist.sample(generator=g)
        return (latents * self.pipe.vae.config.scaling_factor).to(self.weight_dtype)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=self.autocast):
            return self.pipe.unet(noisy, timesteps, self.encoder_hidden_states, added_cond_kwargs=self.added,
                                  return_dict=False)[0]

    def close(self) -> None:
        super().close()
        cast_module(self.pipe.vae, self.vae_dtype)


class PlainFluxRecipe:
    """One LoRA DreamBooth step as diffusers' train_dreambooth_lora_flux.py does it with its defaults
    (text encoders frozen, latents not cached, `--weighting_scheme=none`).

    The script encodes the two prompts once, before the first step (CLIP's pooled output, T5's hidden
    states, zero text ids); every step the VAE encodes the batch, the latent is shifted and scaled and
    cast to the weights' dtype, a uniform draw picks a training timestep whose sigma mixes latent and
    noise, the transformer reads the packed latents, timestep / 1000, the guidance scale and the
    position ids, and its unpacked prediction is compared with `noise - latents`. The LoRA layers are
    fp32 over frozen weights in the weights' dtype, with torch's default AdamW. Random draws come from
    one generator in the trainer's order (instance rows, class rows, latent sample, noise, timestep draw).
    """

    def __init__(self, pipe: DiffusionPipeline, photos: list[PhotoInput], config: TrainConfig,
                 class_paths: list[Path]) -> None:
        self.pipe, self.config = pipe, config
        self.device = pipe.device
        self.weight_dtype = pipe.transformer.dtype
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.requires_grad_(False)
        self.params, self.optimizer = add_recipe_lora(pipe.transformer, config)
        if config.gradient_checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        self.instance = instance_pixels(photos, config.resolution).to(self.device)
        self.classes = class_pixels(class_paths, config.resolution).to(self.device) if class_paths else None
        rows = torch.tensor([0] * config.batch_size + ([1] * config.batch_size if class_paths else []),
                            device=self.device)
        prompts = [instance_prompt(HANDLE, CLASS_WORD), class_prompt(CLASS_WORD)]
        with torch.no_grad():
            pooled = pipe.text_encoder(tokenize(pipe.tokenizer, prompts, self.device),
                                       output_hidden_states=False).pooler_output
            t5_ids = tokenize(pipe.tokenizer_2, prompts, self.device, max_length=pipe.tokenizer_2.model_max_length)
            hidden = pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        self.prompt_embeds = hidden[rows].to(self.weight_dtype)
        self.pooled = pooled[rows].to(self.weight_dtype)
        self.text_ids = torch.zeros(hidden.shape[1], 3, device=self.device, dtype=self.weight_dtype)
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    def sigmas_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The script's `get_sigmas`: each timestep's sigma, found by its place in the schedule."""
        schedule = self.scheduler.timesteps.to(self.device)
        indices = [(schedule == t).nonzero().item() for t in timesteps]
        return self.scheduler.sigmas.to(self.device, self.weight_dtype)[indices].view(-1, 1, 1, 1)

    def step(self) -> torch.Tensor:
        # As ours (trainer.flow_matching): cuDNN's attention backward fails on Flux's shapes on an H100.
        with without_cudnn_attention():
            return self._step()

    def _step(self) -> torch.Tensor:
        cfg, g, dev, pipe = self.config, self.generator, self.device, self.pipe
        index = torch.randint(0, self.instance.shape[0], (cfg.batch_size,), generator=g, device=dev)
        pixels = self.instance[index]
        if self.classes is not None:
            class_index = torch.randint(0, self.classes.shape[0], (cfg.batch_size,), generator=g, device=dev)
            pixels = torch.cat([pixels, self.classes[class_index]])
        latents = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.sample(generator=g)
        latents = ((latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor).to(self.weight_dtype)
        noise = torch.randn(latents.shape, generator=g, device=dev, dtype=latents.dtype)
        bsz = latents.shape[0]
        u = compute_density_for_timestep_sampling("none", bsz, device=dev, generator=g)
        indices = (u * self.scheduler.config.num_train_timesteps).long()
        timesteps = self.scheduler.timesteps[indices.cpu()].to(dev)
        sigmas = self.sigmas_of(timesteps)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        b, c, h, w = latents.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        guidance = (torch.tensor([TRAIN_GUIDANCE], device=dev).expand(bsz)
                    if pipe.transformer.config.guidance_embeds else None)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, dev, self.weight_dtype)
        pred = pipe.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                pooled_projections=self.pooled, encoder_hidden_states=self.prompt_embeds,
                                txt_ids=self.text_ids, img_ids=image_ids, return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(pred, h * self.vae_scale, w * self.vae_scale, self.vae_scale)
        target = noise - latents
        if self.classes is not None:
            pred, pred_prior = pred.chunk(2)
            target, target_prior = target.chunk(2)
            prior_loss = ((pred_prior.float() - target_prior.float()) ** 2).reshape(target_prior.shape[0], -1).mean(1)
        loss = ((pred.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(1).mean()
        if self.classes is not None:
            loss = loss + cfg.prior_loss_weight * prior_loss.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach()

    def close(self) -> None:
        """Take the LoRA (and any checkpointing) out again, so the pipeline can serve the next variant."""
        self.pipe.transformer.disable_gradient_checkpointing()
        self.pipe.transformer.unload_lora()
        self.pipe.transformer.eval()


def recipe_for(pipe: DiffusionPipeline, photos: list[PhotoInput], config: TrainConfig,
               class_paths: list[Path]) -> PlainRecipe | PlainFluxRecipe:
    """The diffusers recipe's step for the pipeline's family."""
    family = family_of(pipe).name
    if family == "flux":
        return PlainFluxRecipe(pipe, photos, config, class_paths)
    cls = PlainXLRecipe if family == "sdxl" else PlainRecipe
    return cls(pipe, photos, config, class_paths)


def base_resolution(pipe: DiffusionPipeline) -> int:
    """The size a training on this base model defaults to (jobs.train_defaults); 64 px for the tiny models."""
    family = family_of(pipe)
    if family.base_resolution(pipe) <= 128:
        return 64
    return for_family(TrainConfig(family_defaults=FAMILY_TUNED), family_of(pipe).name).resolution


def bench_pipeline(model: str, device: str, dtype: str = "auto", quantize: str = "none") -> DiffusionPipeline:
    """The base model as a worker loads it (trainer.pipelines.load_pipeline), without progress bars.
    `dtype` other than "auto" loads it as a GPU without bf16 would ("fp16"), whatever this one has;
    `quantize` as the QUANTIZE setting does ("int8": a Flux transformer's weights in int8)."""
    device_name = pick_device(device)
    pipe = load_pipeline(model, device=device_name,
                         dtype=DTYPES[dtype] if dtype != "auto" else pick_dtype(device_name), quantize=quantize)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def plain_layout(pipe: DiffusionPipeline) -> Iterator[None]:
    """The UNet in PyTorch's default NCHW layout for the block, as a baseline runs it (the project's
    loader makes it channels-last on CUDA, see trainer.pipelines.prepare_for_device). A Flux
    transformer has no convolutions to lay out."""
    if getattr(pipe, "unet", None) is None:
        yield
        return
    weight = pipe.unet.conv_in.weight
    channels_last = not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
    pipe.unet.to(memory_format=torch.contiguous_format)
    try:
        yield
    finally:
        if channels_last:
            pipe.unet.to(memory_format=torch.channels_last)


def synthetic_photos(resolution: int, count: int = 5, seed: int = 0) -> list[Image.Image]:
    """Smooth random colour fields: plausible VAE input without shipping any photo."""
    rng = np.random.default_rng(seed)
    photos = []
    for _ in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        photos.append(Image.fromarray(small).resize((resolution, resolution), Image.Resampling.BICUBIC))
    return photos


def time_steps(step: Callable[[], torch.Tensor], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Milliseconds of each timed step; CUDA events avoid a host sync between steps."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        marks[0].record()
        for i in range(steps):
            step()
            marks[i + 1].record()
        torch.cuda.synchronize(device)
        return [marks[i].elapsed_time(marks[i + 1]) for i in range(steps)]
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step().item()
        times.append((time.perf_counter() - started) * 1000)
    return times


def recorded(step: Callable[[], torch.Tensor], losses: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`step`, keeping each returned loss (on the device: no sync inside the timed loop)."""

    def call() -> torch.Tensor:
        loss = step()
        losses.append(loss)
        return loss

    return call


def compare_losses(ours: list[torch.Tensor], recipe: list[torch.Tensor]) -> dict[str, float]:
    """Both sides draw the same timesteps and noise per step, so their loss curves should coincide
    up to the precision each computes in."""
    a, b = torch.stack(ours).float().cpu(), torch.stack(recipe).float().cpu()
    return {"ours_mean": a.mean().item(), "recipe_mean": b.mean().item(),
            "mean_abs_diff": (a - b).abs().mean().item(), "steps": len(a)}


def measure(name: str, device: torch.device, body: Callable[[], list[float]]) -> dict[str, Any]:
    """The median step of `body` and its peak GPU memory; a variant that runs out of GPU memory is
    reported as such (a full-size model at 1024 px may not fit without checkpointing) and the
    benchmark goes on with the next."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        times = body()
    except torch.OutOfMemoryError:
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        print(f"{name:<28} out of memory (peak {peak} MiB before it failed)", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"variant": name, "error": "out of memory", "peak_mib": peak}
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    result = {"variant": name, "ms_per_step": statistics.median(times), "peak_mib": peak,
              "steps_timed": len(times)}
    mem = f"{peak:8.0f} MiB peak" if peak is not None else "(no GPU memory figure on CPU)"
    print(f"{name:<28} {result['ms_per_step']:9.1f} ms/step  {mem}", flush=True)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    pipe = bench_pipeline(args.model, args.device, args.dtype, args.quantize)
    device, family = pipe.device, family_of(pipe)
    resolution = args.resolution or base_resolution(pipe)
    photos = synthetic_photos(resolution)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "model": args.model,
            "dtype": str(family.denoiser(pipe).dtype), "quantize": args.quantize, "resolution": resolution, "warmup": args.warmup, "steps": args.steps}
    print(" ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "class-cache"
        for prior in PRIORS[args.prior]:
            config = TrainConfig(resolution=resolution, prior_preservation=prior, steps=args.warmup + args.steps,
                                 num_class_images=args.class_images, class_image_steps=args.class_image_steps,
                                 class_image_batch=args.class_images, checkpoint_every=0, min_photos=1,
                                 compiled_stages=None if args.compile else False)
            # The family's LoRA targets (Flux's are its transformer's attention and feed-forwards).
            config = for_family(replace(config, family_defaults=("lora_targets",)), family.name)
            label = "prior" if prior else "no prior"

            def ours_with(cfg: TrainConfig, name: str, losses: list[torch.Tensor] | None = None) -> dict[str, Any]:
                trainer = TrainingRun(photos, HANDLE, CLASS_WORD, cfg, base_model=args.model,
                                      out_dir=Path(tmp) / "out", work_dir=Path(tmp) / "work", class_cache_dir=cache,
                                      on_event=lambda _e: None, should_cancel=lambda: False, resume_from=None)
                step = recorded(trainer.train_step, losses) if losses is not None else trainer.train_step
                with trainer.session(pipe):
                    result = measure(name, device, lambda: time_steps(step, args.warmup, args.steps, device))
                if trainer.capture_s is not None:
                    result["graph_capture_s"] = trainer.capture_s
                    what = "compiling and capturing" if trainer.compiles else "CUDA graph capture"
                    print(f"{'':<28} {what}: {trainer.capture_s:.1f} s (once per training, in its first step)")
                return result

            ours_losses: list[torch.Tensor] = []
            recipe_losses: list[torch.Tensor] = []
            ours = ours_with(config, f"ours ({label})", ours_losses) if args.ours else None
            if (args.ours and args.variants and device.type == "cuda" and config.cuda_graphs
                    and family.graphs_and_compiling):
                # A second training in the same process finds the stages compiled: its first step
                # only captures the graphs.
                results.append(ours_with(config, f"ours, next training ({label})"))
                if args.compile:
                    results.append(ours_with(replace(config, compiled_stages=False),
                                             f"ours, stages not compiled ({label})"))
                results.append(ours_with(replace(config, cuda_graphs=False), f"ours, no graphs ({label})"))
            if args.gradient_checkpointing:
                # Checkpointing recomputes the forward in the backward: eager, neither graphed nor compiled.
                checkpointed_losses: list[torch.Tensor] = []
                checkpointed = ours_with(replace(config, gradient_checkpointing=True),
                                         f"ours, gradient checkpointing ({label})", checkpointed_losses)
                if args.recipe_checkpointing:
                    # Like against like: the speed-up below is then between the two checkpointed steps.
                    if ours is not None:
                        results.append(ours)
                    ours, ours_losses = checkpointed, checkpointed_losses
                else:
                    results.append(checkpointed)
            base = None
            if args.recipe:
                class_paths = ensure_class_images(pipe, args.model, class_prompt(CLASS_WORD), resolution,
                                                  args.class_images, cache, batch_size=args.class_images,
                                                  steps=args.class_image_steps).paths if prior else []
                recipe_config = replace(config, gradient_checkpointing=args.recipe_checkpointing)
                with plain_layout(pipe):
                    recipe = recipe_for(pipe, photos, recipe_config, class_paths)
                    try:
                        step = recorded(recipe.step, recipe_losses)
                        base = measure(f"diffusers recipe ({label})", device,
                                       lambda s=step: time_steps(s, args.warmup, args.steps, device))
                    finally:
                        recipe.close()
            results += [r for r in (ours, base) if r is not None]
            if ours is not None and base is not None and "error" not in ours and "error" not in base:
                ratio = base["ms_per_step"] / ours["ms_per_step"]
                print(f"speed-up ({label}): {ratio:.2f}x (baseline ms / ours ms)", flush=True)
                curves = compare_losses(ours_losses, recipe_losses)
                print(f"loss curves ({label}), same seeds, {len(ours_losses)} steps: mean loss ours "
                      f"{curves['ours_mean']:.4f}, recipe {curves['recipe_mean']:.4f}; mean |ours - recipe| per "
                      f"step {curves['mean_abs_diff']:.5f}", flush=True)
                results += [{"variant": f"speedup ({label})", "ratio": ratio},
                            {"variant": f"loss curves ({label})", **curves}]
    return {**info, "results": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15-random",
                        help="sd15-random, sdxl-random, tiny, tiny-sdxl, a hub id or a folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant")
    parser.add_argument("--resolution", type=int, default=0,
                        help="default: the base model's (512 SD1.5, 1024 SDXL), or 64 for tiny models")
    parser.add_argument("--prior", choices=tuple(PRIORS), default="both",
                        help="with prior preservation (batch 2), without (batch 1), or both")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="the frozen weights' dtype (auto: bf16 where the GPU has it); fp16 trains with loss scaling")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default="none",
                        help="the QUANTIZE setting: int8 keeps a Flux transformer's weights in int8 (both sides "
                             "train on them; ours always with gradient checkpointing there)")
    parser.add_argument("--class-images", type=int, default=4)
    parser.add_argument("--class-image-steps", type=int, default=10)
    parser.add_argument("--ours", action=argparse.BooleanOptionalAction, default=True,
                        help="time this trainer's step (--no-ours: the recipe alone)")
    parser.add_argument("--recipe", action=argparse.BooleanOptionalAction, default=True,
                        help="time the diffusers recipe's step (--no-recipe: ours alone)")
    parser.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA, also time ours in a second training, with stages not compiled and "
                             "without graphs (each compiles or captures again)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="ours with the UNet's stages compiled (--no-compile: CUDA graphs of plain stages, "
                             "no minutes of compiling)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="also time ours with gradient checkpointing, and its peak memory")
    parser.add_argument("--recipe-checkpointing", action="store_true",
                        help="the Flux recipe with its --gradient_checkpointing (how README_flux.md fits 1024 px)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    report = run(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
