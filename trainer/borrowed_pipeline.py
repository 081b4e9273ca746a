"""A worker's pipeline as a training borrows it: frozen for the training, lent back to generation
between its steps, and returned as it was found.

A worker reuses one pipeline for generation and training: adapters the generation engine loaded
must not leak into class images or cached text embeddings, generations served during the training
must not change it, and the pipeline must come back with its dtype, modes and adapters as before,
minus the one trained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from diffusers import DiffusionPipeline

from trainer import adapters
from trainer.family import Family
from trainer.pipelines import cast_module
from trainer.trainable import text_encoder_checkpointing


@contextlib.contextmanager
def borrowed(pipe: DiffusionPipeline, family: Family, dtype: torch.dtype, checkpointing: bool, adapter: str,
             ) -> Iterator[None]:
    """Freeze the pipeline in `dtype` with any LoRA it already holds switched off, and undo it all
    after, removing the trained `adapter` and the gradient checkpointing the training turned on."""
    names = (family.denoiser_name, "vae", *family.text_encoder_names)
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
        denoiser = family.denoiser(pipe)
        denoiser.eval()
        if checkpointing:
            denoiser.disable_gradient_checkpointing()
        for name, module in modules.items():
            if checkpointing and name in family.text_encoder_names:
                text_encoder_checkpointing(module, False)
            if adapters.snapshot(module) is not None:
                adapters.remove_lora(module, adapter, before[name])
            if module.dtype != dtypes[name]:
                cast_module(module, dtypes[name])


def lend(pipe: DiffusionPipeline, family: Family, trained: dict[str, torch.nn.Module],
         serve: Callable[[], None]) -> None:
    """Call `serve` with the pipeline usable for inference, then put the training state back.

    Generation may load other adapters and switch them on, and PEFT's `set_adapter` also decides
    which adapter weights require gradients; so every module's adapter state is put back, which
    makes the trained adapter (in the `trained` modules, once added) the only active and trainable
    one again. Training draws only from its own generator, so its results do not change
    (tests/trainer/test_dreambooth.py checks this).
    """
    modules = {name: getattr(pipe, name) for name in (family.denoiser_name, *family.text_encoder_names)}
    states = {name: adapters.snapshot(module) for name, module in modules.items()}
    denoiser = family.denoiser(pipe)
    training = denoiser.training
    denoiser.eval()
    try:
        serve()
    finally:
        for name, module in modules.items():
            adapters.restore(module, states[name])
            if name not in trained:
                module.requires_grad_(False)
        denoiser.train(training)
