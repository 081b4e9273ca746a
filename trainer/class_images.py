"""Class images for prior preservation, generated once per base model and class and shared by everyone.

DreamBooth's prior-preservation loss needs pictures of the class ("a photo of a woman") made by the
base model itself. They depend only on (base model, class prompt, resolution), so they live in a cache
folder named by a hash of those three and are reused by every later training of that class; a run that
needs more than are cached generates only the missing ones. Image `i` is always made from seed `i`,
so a cache filled in several runs, or by several workers at once, holds the same pictures.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from jobs import events
from jobs.events import EventSink
from trainer.engine import encode_pngs
from trainer.errors import Cancelled
from trainer.file_writes import write_bytes_atomic
from trainer.graphs import PipelineGraphs

log = logging.getLogger(__name__)


@dataclass
class ClassImages:
    paths: list[Path]
    generated: int  # how many were made in this run (0 when the cache already had enough)


def cache_key(base_model: str, prompt: str, resolution: int) -> str:
    return hashlib.sha256(f"{base_model}\n{prompt}\n{resolution}".encode()).hexdigest()[:20]


def ensure_class_images(pipe: DiffusionPipeline, base_model: str, prompt: str, resolution: int, count: int,
                        cache_dir: Path, *, steps: int = 25, batch_size: int = 4,
                        on_event: EventSink = events.ignore,
                        should_cancel: Callable[[], bool] = lambda: False, graphs: bool = True,
                        serve_riders: Callable[[], None] | None = None) -> ClassImages:
    """Paths of `count` class images for `prompt`, generating the ones the cache lacks.

    `graphs`: on CUDA the UNet and VAE replay graphs captured for the batch's shape (trainer.graphs).
    `serve_riders` is called after each batch (a worker serves waiting generations there, so that
    a first-time class costs them one batch of waiting, not the whole set); it must leave the
    pipeline's weights as they were.
    """
    folder = cache_dir / cache_key(base_model, prompt, resolution)
    folder.mkdir(parents=True, exist_ok=True)
    info = folder / "info.json"
    if not info.exists():
        write_bytes_atomic(info, json.dumps({"base_model": base_model, "prompt": prompt,
                                             "resolution": resolution}).encode(), "class image cache")
    paths = [folder / f"{i:05d}.png" for i in range(count)]
    # An empty file is what a crash of a system without atomic renames can leave: made again.
    missing = [i for i, p in enumerate(paths) if not p.exists() or p.stat().st_size == 0]
    if missing:
        log.info("generating %d class images for %r", len(missing), prompt)
        pipe.set_progress_bar_config(disable=True)
        device = pipe.device
        gen_device = "cpu" if device.type == "mps" else device
        graphed = PipelineGraphs(pipe) if graphs and device.type == "cuda" else None
        for start in range(0, len(missing), batch_size):
            if should_cancel():
                raise Cancelled()
            batch = missing[start:start + batch_size]
            generators = [torch.Generator(gen_device).manual_seed(i) for i in batch]
            with torch.no_grad(), graphed.installed() if graphed else contextlib.nullcontext():
                images = pipe(prompt=[prompt] * len(batch), num_inference_steps=steps, height=resolution,
                              width=resolution, generator=generators).images
            for i, png in zip(batch, encode_pngs(images), strict=True):
                write_bytes_atomic(paths[i], png, "class images")
            on_event(events.Progress(min(start + batch_size, len(missing)), len(missing),
                                     stage="class_images"))
            if serve_riders is not None:
                serve_riders()
    return ClassImages(paths, len(missing))
