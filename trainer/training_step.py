"""One optimisation step of a training: the random draws, the UNet's loss, backward, the optimiser.

Every draw comes from the step's own seeded generator on the training device, in a fixed order
(instance rows, class rows, latent sample, noise, offset noise, timesteps); a checkpoint carries its
state, so a resumed training draws what an uninterrupted one would (trainer.dreambooth).

On CUDA the UNet's forward and backward are captured once as CUDA graphs and replayed; the draws
and the optimiser stay outside the graphs. The UNet's stages may run compiled by inductor for the
step (`TrainConfig.compiled_stages`, trainer.compiled_blocks).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline

from trainer import compiled_blocks
from trainer.family import Family
from trainer.trainable import Trainable
from trainer.training_data import TrainingData

if TYPE_CHECKING:
    from jobs.requests import TrainConfig

log = logging.getLogger(__name__)



@contextlib.contextmanager
def without_cudnn_attention() -> Iterator[None]:
    """Within the block, scaled-dot-product attention never picks cuDNN's kernels (a global switch,
    so the backward, which runs outside any context around the forward, follows it too); the
    setting is restored after."""
    previous = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(previous)

class TrainingStep:
    """The step of one training, called once per optimisation step.

    `on_compiling(True)` is called before the UNet's stages are compiled for the first time in the
    process for this kind of step, `on_compiling(False)` once they are: the person waiting can be
    told why the first step takes long. `compile_when`, for a step that starts uncompiled: called
    before each step, True once the compiled step's code is ready (a worker's start helper compiled
    it, trainer.background_compile); the step then switches to it, computing the same thing.
    """

    def __init__(self, pipe: DiffusionPipeline, family: Family, config: TrainConfig, device: torch.device,
                 dtype: torch.dtype, data: TrainingData, trainable: Trainable, *,
                 compile_backend: compiled_blocks.Backend, on_compiling: Callable[[bool], None],
                 compile_when: Callable[[], bool] | None = None) -> None:
        self.pipe, self.family, self.config = pipe, family, config
        self.device, self.dtype, self.data, self.trainable = device, dtype, data, trainable
        self.compile_backend = compile_backend
        self._on_compiling = on_compiling
        self.generator = torch.Generator(device).manual_seed(config.seed)
        self._set_up_schedule()
        self._graphed: Callable[..., Any] | None = None
        self.capture_s: float | None = None  # time spent capturing CUDA graphs, once per training
        self._compiles = config.compiles_on(device.type)
        self._compile_when = None if self._compiles else compile_when

    def _set_up_schedule(self) -> None:
        """The noise schedule the step trains on: DDPM's over the base model's betas, and its SNR table."""
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        acp = self.noise_scheduler.alphas_cumprod.to(self.device)
        self.snr = acp / (1 - acp)
        self.prediction_type = self.noise_scheduler.config.prediction_type

    @property
    def graphed(self) -> bool:
        """Whether the step replays its UNet forward and backward as CUDA graphs."""
        return self.config.graphs_on(self.device.type)

    @property
    def compiles(self) -> bool:
        """Whether the step runs the UNet's stages compiled (now: it may switch, see `compile_when`)."""
        return self._compiles

    def _switch_when_ready(self) -> None:
        """Start running the compiled step once `compile_when` says its code is ready; the graphs
        captured without it are captured again with it."""
        if self._compile_when is not None and self._compile_when():
            self._compile_when = None
            self._compiles = True
            self._graphed = None
            log.info("the training step's compiled code is ready: switching to it")

    def __call__(self) -> torch.Tensor:
        """One optimisation step; returns the loss, still on the device (reading it forces a sync)."""
        self._switch_when_ready()
        with self._attention_backends():
            return self._step()

    # Whether PyTorch may pick cuDNN's attention kernels for the step (see FlowMatchingStep).
    cudnn_attention = True

    def _attention_backends(self) -> contextlib.AbstractContextManager[None]:
        """The step's forward and backward (a checkpointed forward is run again in the backward)
        without cuDNN's attention where `cudnn_attention` is off."""
        return contextlib.nullcontext() if self.cudnn_attention else without_cudnn_attention()

    def _step(self) -> torch.Tensor:
        cfg, trainable = self.config, self.trainable
        if self.graphed:
            noisy, timesteps, target = self._draw()
            if self._graphed is None:
                with self._compiled_stages():
                    self._graphed = self._capture(noisy, timesteps, target)
            loss = self._graphed(noisy, timesteps, target)
        else:
            with self._compiled_stages():
                loss = self._forward(*self._draw())
        if trainable.scaler is not None:
            trainable.scaler.scale(loss).backward()
            trainable.scaler.unscale_(trainable.optimizer)
            torch.nn.utils.clip_grad_norm_(trainable.param_list, cfg.max_grad_norm, foreach=True)
            trainable.scaler.step(trainable.optimizer)
            trainable.scaler.update()
        else:
            loss.backward()
            trainable.copy_grads_to_masters()
            torch.nn.utils.clip_grad_norm_(trainable.param_list, cfg.max_grad_norm, foreach=True)
            trainable.optimizer.step()
            trainable.copy_masters_to_lora()
        if trainable.lora_weights is None:
            trainable.optimizer.zero_grad(set_to_none=True)  # master gradients are overwritten instead
        return loss.detach().clone()  # a graph's output is overwritten by its next replay

    @contextlib.contextmanager
    def _compiled_stages(self) -> Iterator[None]:
        """The UNet's stages compiled for the length of the block, if `config.compiled_stages` says so.

        Only the step's forward (and the backward it records) runs inside: the graphs keep the
        compiled kernels, and generations served between steps never meet the training's variant.
        """
        if not self.compiles:
            yield
            return
        cfg = self.config
        regions = compiled_blocks.for_training(self.pipe, self.compile_backend,
                                               fuse_linears=cfg.fused_linears)
        kind = ("training", cfg.batch_size * (2 if self.data.n_class else 1), cfg.rank, cfg.lora_targets,
                self.dtype, cfg.resolution)
        first = kind not in regions.compiled_for
        if first:
            self._on_compiling(True)
        with regions.installed(whole_stages=True):
            yield
        if first:
            regions.compiled_for.add(kind)
            self._on_compiling(False)

    def _capture(self, noisy: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor) -> Callable[..., Any]:
        """Graph the step's UNet forward and backward; random draws and the optimiser stay outside."""
        started = time.monotonic()
        module = _StepLoss(self.pipe.unet, self._forward).train()
        sample = tuple(t.detach().clone() for t in (noisy, timesteps, target))
        graphed = torch.cuda.make_graphed_callables(module, sample, num_warmup_iters=3, allow_unused_input=True)
        self.capture_s = time.monotonic() - started
        log.info("captured the training step as CUDA graphs in %.1f s", self.capture_s)
        return graphed

    def _draw_rows(self) -> torch.Tensor:
        """The batch's rows of the cached data, the first draws of a step: instance rows, then as
        many class rows (offset past the instance ones) with prior preservation."""
        cfg, g, dev, data = self.config, self.generator, self.device, self.data
        index = torch.randint(0, data.n_instance, (cfg.batch_size,), generator=g, device=dev)
        if data.n_class:
            class_index = torch.randint(0, data.n_class, (cfg.batch_size,), generator=g, device=dev)
            index = torch.cat([index, class_index + data.n_instance])
        return index

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's noisy latents, timesteps and target, drawn from the generator in the documented order."""
        cfg, g, dev = self.config, self.generator, self.device
        latents = self.data.sample(self._draw_rows(), g)
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
        cond = self.data.conditioning(self.pipe, self.family, self.config.resolution)
        added = {k: v.to(self.dtype) for k, v in cond.added.items()} if cond.added else None
        pred = self.pipe.unet(noisy.to(self.dtype), timesteps, cond.hidden_states.to(self.dtype),
                              added_cond_kwargs=added, return_dict=False)[0]
        return weighted_loss(pred, target, timesteps, self.snr, self.config, self.prediction_type)


class _StepLoss(torch.nn.Module):
    """One step's UNet forward and loss as a module, the form `make_graphed_callables` takes.

    The UNet is registered so its parameters (the trainable LoRA among them) are the graph's
    autograd inputs; the cached text embeddings are constants captured with it.
    """

    def __init__(self, unet: torch.nn.Module, forward: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.unet = unet
        self._forward = forward

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
