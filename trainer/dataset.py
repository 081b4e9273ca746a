"""Training images as tensors, and their VAE latents computed once before the training loop.

The VAE encoder is the most expensive thing in a naive DreamBooth step after the UNet, yet its input
never changes: a handful of photos (and their mirror images) plus the class images. Encoding them once
and keeping the latent distribution (mean, std) on the device leaves only the UNet in the loop, while
still drawing a fresh latent sample each step exactly as `latent_dist.sample()` would.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageOps

from trainer.pipelines import cast_module

ENCODE_BATCH = 8  # images per VAE encoder call when caching latents

PhotoInput = Path | str | bytes | Image.Image


def open_photo(photo: PhotoInput) -> Image.Image:
    """An RGB image from a path, encoded bytes or a PIL image, turned upright by its EXIF tag."""
    if isinstance(photo, Image.Image):
        image = photo
    elif isinstance(photo, bytes | bytearray):
        image = Image.open(io.BytesIO(photo))
    else:
        image = Image.open(photo)
    image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


def square(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to `resolution` and crop the centre square (photos arrive framed on the face)."""
    return ImageOps.fit(image, (resolution, resolution), method=Image.Resampling.BICUBIC)


def to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """A [N, 3, H, W] float tensor in [-1, 1], the VAE's input range."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def instance_pixels(photos: Sequence[PhotoInput], resolution: int) -> torch.Tensor:
    """Each photo followed by its mirror image: rows 2i and 2i+1 come from photo i."""
    images: list[Image.Image] = []
    for photo in photos:
        image = square(open_photo(photo), resolution)
        images += [image, ImageOps.mirror(image)]
    return to_pixels(images)


def class_pixels(paths: Sequence[Path], resolution: int) -> torch.Tensor:
    return to_pixels([square(open_photo(p), resolution) for p in paths])


@dataclass
class LatentCache:
    """The VAE posterior of every training image, in fp32 on the training device."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A latent sample for rows `index`, drawing noise as DiagonalGaussianDistribution.sample does."""
        mean, std = self.mean[index], self.std[index]
        return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)

    @staticmethod
    def cat(parts: list[LatentCache]) -> LatentCache:
        """One cache of all parts, in one memory layout (the VAE's convolutions may hand back either):
        the compiled training step's guards check its input's strides, and a layout that changed with
        the photos would compile the step again."""
        return LatentCache(torch.cat([p.mean for p in parts]).contiguous(),
                           torch.cat([p.std for p in parts]).contiguous())


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int = ENCODE_BATCH,
                   serve_riders: Callable[[], None] | None = None) -> LatentCache:
    """Encode `pixels` in small batches; fp16 VAEs that need it are upcast to fp32 for the duration.

    `serve_riders` is called after each batch (a worker serves waiting generations there), except
    while the VAE is upcast: its weights are not where a generation's CUDA graphs expect them then.
    """
    device = vae.device
    original = vae.dtype
    upcast = original == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        cast_module(vae, torch.float32)
    try:
        means, stds = [], []
        for chunk in pixels.split(batch_size):
            dist = vae.encode(chunk.to(device=device, dtype=vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
            if serve_riders is not None and not upcast:
                serve_riders()
    finally:
        if upcast:
            cast_module(vae, original)
    return LatentCache(torch.cat(means), torch.cat(stds))
