"""Frozen modules parked in host memory while a training steps, brought back only for a picture.

A Flux training reads its prompts' embeddings and its photos' latents from a cache made before the
first step (trainer.training_data), so T5-XXL (about 9.5 GB in bf16), CLIP and the VAE sit idle on
the GPU for the whole loop. Parked in host memory, they leave that room to the transformer's
activations. A picture asked for meanwhile (a generation served between steps, a preview) needs them:
`unparked` brings them back for its length and parks them again after, so the cost, two copies over
PCIe, is paid per picture, never per step.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterable, Iterator

import torch

log = logging.getLogger(__name__)

# Parked module -> (the device it works on, where it waits).
_PARKED: weakref.WeakKeyDictionary[torch.nn.Module, tuple[torch.device, torch.device]] = weakref.WeakKeyDictionary()


def parking_place(device: torch.device) -> torch.device | None:
    """Where modules of a training on `device` wait: host memory for a GPU's; a CPU's stay."""
    return torch.device("cpu") if device.type == "cuda" else None


def is_parked(module: torch.nn.Module) -> bool:
    """Whether `module` waits away from its device."""
    return module in _PARKED


def _move(module: torch.nn.Module, device: torch.device) -> None:
    # torch's own `to`: diffusers' warns on every move of a model with fp32-only modules.
    torch.nn.Module.to(module, device)


@contextlib.contextmanager
def parked(modules: Iterable[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Within the block, `modules` (on `device`) wait in the parking place; afterwards they are back."""
    place = parking_place(device)
    if place is None:
        yield
        return
    moved = [m for m in modules if m not in _PARKED]
    for module in moved:
        _PARKED[module] = (device, place)
        _move(module, place)
    if moved:
        log.info("parked %d frozen module(s) in host memory for the training", len(moved))
    try:
        yield
    finally:
        for module in moved:
            entry = _PARKED.pop(module, None)
            if entry is not None:
                _move(module, entry[0])


@contextlib.contextmanager
def unparked(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Within the block, those of `modules` that are parked are on their device; then parked again."""
    back = {m: _PARKED.pop(m) for m in modules if m in _PARKED}
    for module, (home, _place) in back.items():
        _move(module, home)
    try:
        yield
    finally:
        for module, (home, place) in back.items():
            _move(module, place)
            _PARKED[module] = (home, place)
