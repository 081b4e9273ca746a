"""Upscaling a picture 2x ("hires fix"): enlarge its pixels, then redraw them lightly with img2img.

The picture is enlarged in pixel space with Lanczos, not in latent space: a latent enlarged by
interpolation decodes to blur and grid artifacts that only a strong denoise (0.5 and more) removes,
and a strong denoise redraws the composition and the face. A Lanczos enlargement is already a clean
picture, so a weak pass (`DEFAULT_UPSCALE_STRENGTH`, about a third of the steps) only adds the detail
that the larger size can hold, with the person's LoRA merged so that the detail looks like them.

Memory: the UNet at 2x holds four times the activations of a native picture, which fits a
datacenter GPU with PyTorch's memory-efficient attention (SDXL at 2048 px: 16k tokens in its
highest-resolution attention). The VAE is what grows beyond reach: its full-resolution convolutions
and mid-block attention at 2048 px take tens of GB, so it encodes and decodes in tiles above the
model's native size (`vae_tiled`).
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError

from jobs import events
from jobs.events import EventSink
from jobs.payloads import GenerateInputs, GenerateParams, Picture
from trainer.errors import Cancelled, TrainerError

if TYPE_CHECKING:
    from trainer.engine import GenerationEngine

UPSCALE_FACTOR = 2
# Low enough to keep the picture (its composition, the face), high enough to sharpen what Lanczos
# only interpolated; 0.25-0.4 is the usual range of a hires pass with a pixel upscaler.
DEFAULT_UPSCALE_STRENGTH = 0.3


def read_picture(data: bytes) -> Image.Image:
    """The stored picture (PNG or JPEG bytes) as RGB; a clear error when it cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise TrainerError("The picture to upscale could not be read.", "bad_image") from exc


def upscaled_size(size: tuple[int, int], multiple: int, factor: int = UPSCALE_FACTOR) -> tuple[int, int]:
    """(width, height) `factor` times `size`, rounded to the sides the UNet accepts (`multiple`). The
    model's own pictures are multiples already, so theirs is exactly `factor` times."""
    width, height = (max(multiple, round(side * factor / multiple) * multiple) for side in size)
    return width, height


def enlarged(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` resized to `size` with Lanczos, the sharpest of Pillow's filters without ringing in
    photographs."""
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


@contextlib.contextmanager
def vae_tiled(vae: Any) -> Iterator[None]:
    """The VAE encoding and decoding in tiles, put back as it was afterwards: the VAE is shared with
    the text-to-image pipeline and the trainer. diffusers tiles only inputs larger than the model's
    native size (`tile_sample_min_size`), so native pictures would run as before."""
    was = vae.use_tiling
    vae.enable_tiling()
    try:
        yield
    finally:
        vae.use_tiling = was


def step_reporter(on_event: EventSink, should_cancel: Callable[[], bool]) -> Callable[..., dict[str, Any]]:
    """A diffusers `callback_on_step_end` reporting `progress` events (stage "upscaling") and raising
    Cancelled between steps once `should_cancel()` is true."""
    started = time.monotonic()

    def on_step_end(pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        done, total = step + 1, pipe.num_timesteps
        elapsed = time.monotonic() - started
        on_event(events.Progress(done, total, eta_s=elapsed / done * (total - done), stage="upscaling"))
        if should_cancel():
            raise Cancelled()
        return tensors

    return on_step_end


def upscale_job(engine: GenerationEngine, params: GenerateParams, inputs: GenerateInputs, lora_path: Path | None,
                emit: EventSink, should_cancel: Callable[[], bool]) -> list[Picture]:
    """A worker's upscale job (`params.upscale_of` set): the picture that came with it, upscaled with
    the person's LoRA (`lora_path`, already written where the worker keeps it)."""
    if inputs.init_image is None:
        raise TrainerError("The picture to upscale did not come with the request.", "bad_image")
    emit(events.Stage("upscaling"))
    return engine.upscale(params.request, inputs.init_image, adapter_key=params.adapter_key, lora_path=lora_path,
                          handle=params.handle, class_word=params.class_word, on_event=emit,
                          should_cancel=should_cancel)
