"""The training step of rectified-flow transformers (Flux): flow matching on cached latents and prompts.

The loss is the one of diffusers' examples/dreambooth/train_dreambooth_lora_flux.py with its default
`--weighting_scheme=none`: a timestep drawn uniformly from the scheduler's training timesteps, the
latent moved along the straight line to the noise, `x_t = (1 - sigma) x_0 + sigma * noise`, and the
transformer's prediction compared with the velocity `noise - x_0`, unweighted, per sample, the second
half of the batch being the prior loss when prior preservation is on. As in that script, the
transformer reads the latents packed in 2x2 patches, the timestep divided by 1000, the image and
text position ids, and (FLUX.1-dev being guidance-distilled) a guidance scale:
README_flux.md's commands train with `--guidance_scale=1`.

What differs is where the work happens, not what is computed: the latents and the text embeddings
are computed once per training (trainer.training_data), so the VAE and both text encoders are idle
during the loop, and every random draw comes from the step's own generator in a fixed order
(instance rows, class rows, latent sample, noise, timestep draw), so a checkpoint resumes exactly.

The step runs eagerly: the CUDA graphs and compiled stages of the SD path (trainer.graphs,
trainer.compiled_blocks) know the UNet's stages only. A Flux step is one 12B transformer's forward
and backward on thousands of tokens, expected to be bound by its GEMMs rather than by the launch
overhead the graphs remove from the SD step (bench.train_speed --model flux-random measures it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from trainer.family import vae_scale
from trainer.training_step import TrainingStep

if TYPE_CHECKING:
    from jobs.requests import TrainConfig

# README_flux.md trains FLUX.1-dev with --guidance_scale=1 (the script's default is 3.5).
TRAIN_GUIDANCE = 1.0


def image_ids(latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The packed latent's position ids (row, column per 2x2 patch), as FluxPipeline makes them."""
    return FluxPipeline._prepare_latent_image_ids(latents.shape[0], latents.shape[2] // 2, latents.shape[3] // 2,
                                                  latents.device, dtype)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents as Flux's (B, H/2 * W/2, 4C) token sequence."""
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def flow_loss(pred: torch.Tensor, target: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Mean squared error per sample; the second half of the batch is the prior loss."""
    per_sample = ((pred.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)
    if pred.shape[0] == config.batch_size:
        return per_sample.mean()
    instance, prior = per_sample.split(config.batch_size)
    return instance.mean() + config.prior_loss_weight * prior.mean()


class FlowMatchingStep(TrainingStep):
    """One optimisation step of a Flux training; the optimiser part is TrainingStep's."""

    # cuDNN's attention backward fails with an illegal memory access on Flux's joint attention (an
    # H100, torch 2.11; bench/RESULTS.md): flash and memory-efficient attention run the step instead.
    cudnn_attention = False

    def _set_up_schedule(self) -> None:
        # The training timesteps and sigmas of the base model's scheduler as constructed (FLUX.1-dev's
        # uses dynamic shifting, so they are unshifted), as the script's `noise_scheduler_copy` holds them.
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.schedule_timesteps = scheduler.timesteps.to(self.device)
        self.sigmas = scheduler.sigmas.to(self.device)

    @property
    def graphed(self) -> bool:
        return False

    @property
    def compiles(self) -> bool:
        return False

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's noisy latents, timesteps and velocity target, drawn in the documented order."""
        g, dev = self.generator, self.device
        latents = self.data.sample(self._draw_rows(), g)
        noise = torch.randn(latents.shape, generator=g, device=dev)
        # `compute_density_for_timestep_sampling("none")` is a uniform draw; indices as the script takes them.
        u = torch.rand((latents.shape[0],), generator=g, device=dev)
        indices = (u * self.num_train_timesteps).long()
        timesteps = self.schedule_timesteps[indices]
        sigmas = self.sigmas[indices].view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        return noisy, timesteps, noise - latents

    def _forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity prediction and the flow-matching loss."""
        cond = self.data.conditioning(self.pipe, self.family, self.config.resolution)
        transformer = self.pipe.transformer
        dtype, batch = self.dtype, noisy.shape[0]
        guidance = (torch.full((batch,), TRAIN_GUIDANCE, device=noisy.device)
                    if transformer.config.guidance_embeds else None)
        text = cond.hidden_states.to(dtype)
        pred = transformer(
            hidden_states=pack(noisy.to(dtype)), timestep=timesteps / 1000, guidance=guidance,
            pooled_projections=cond.added["pooled_projections"].to(dtype), encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=dtype),
            img_ids=image_ids(noisy, dtype), return_dict=False)[0]
        scale = vae_scale(self.pipe)
        pred = FluxPipeline._unpack_latents(pred, noisy.shape[2] * scale, noisy.shape[3] * scale, scale)
        return flow_loss(pred, target, self.config)
