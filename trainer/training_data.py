"""What a training step reads, computed once before its first step: latents and text conditioning.

The photos, their mirror images and the class images never change during a training, nor do its
two prompts, so the VAE encoder and (unless it trains) the text encoder run once here, and the step
only indexes into the tensors kept on the device (trainer.dataset explains why a fresh latent sample
per step still equals running the VAE each step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import DiffusionPipeline

from trainer.dataset import ENCODE_BATCH, LatentCache, class_pixels, encode_latents
from trainer.family import Conditioning, Family

if TYPE_CHECKING:
    from jobs.requests import TrainConfig


@dataclass(eq=False)
class TrainingData:
    """The encoded images and prompts of one training."""

    latents: LatentCache  # the instance rows (each photo, then its mirror image), then the class images
    n_instance: int
    n_class: int
    scaling: float  # the VAE's scaling factor, applied to each latent sample
    shift: float  # the VAE's shift factor, taken off each latent sample before scaling (Flux's; else 0)
    token_ids: list[torch.Tensor]  # per text encoder: the instance prompt's ids, then the class prompt's
    prompt_rows: torch.Tensor  # which prompt each row of a batch uses: 0 instance, 1 class
    cached_cond: Conditioning | None  # the batch's text conditioning; None while the text encoder trains

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A scaled latent sample for rows `index`, as the recipes scale `latent_dist.sample()`."""
        return (self.latents.sample(index, generator) - self.shift) * self.scaling

    def conditioning(self, pipe: DiffusionPipeline, family: Family, resolution: int) -> Conditioning:
        """The batch's text conditioning: the cached one, or encoded now through the training encoder."""
        if self.cached_cond is not None:
            return self.cached_cond
        return family.encode(pipe, self.token_ids, resolution).select(self.prompt_rows)


def cache_training_data(pipe: DiffusionPipeline, family: Family, config: TrainConfig, device: torch.device,
                        pixels: torch.Tensor, class_paths: list[Path], prompts: tuple[str, str],
                        serve_riders: Callable[[], None]) -> TrainingData:
    """Encode every image and both `prompts` (instance, class) once; the loop only indexes into these tensors.

    Images go through the VAE batch by batch, class images decoded as they are needed, with
    `serve_riders` called after each batch.
    """
    parts = [encode_latents(pipe.vae, pixels, serve_riders=serve_riders)]
    for start in range(0, len(class_paths), ENCODE_BATCH):
        batch = class_pixels(class_paths[start:start + ENCODE_BATCH], config.resolution)
        parts.append(encode_latents(pipe.vae, batch, serve_riders=serve_riders))
    token_ids = family.token_ids(pipe, list(prompts), device)
    # Row i of the batch uses prompt 0 (instance) for the first half, prompt 1 (class) for the rest.
    rows = [0] * config.batch_size + ([1] * config.batch_size if class_paths else [])
    prompt_rows = torch.tensor(rows, device=device)
    cached_cond = None
    if not config.train_text_encoder:
        with torch.no_grad():
            cached_cond = family.encode(pipe, token_ids, config.resolution).select(prompt_rows)
    return TrainingData(latents=LatentCache.cat(parts), n_instance=parts[0].mean.shape[0],
                        n_class=len(class_paths), scaling=pipe.vae.config.scaling_factor,
                        shift=getattr(pipe.vae.config, "shift_factor", None) or 0.0, token_ids=token_ids,
                        prompt_rows=prompt_rows, cached_cond=cached_cond)
