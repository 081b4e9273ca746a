"""A Flux transformer's Linear weights kept in int8 (the QUANTIZE setting), so FLUX.1-dev fits a 24 GB card.

FLUX.1-dev's transformer is 11.9B parameters, about 24 GB in bf16: a 24 GB card cannot hold it and
anything else. torchao's int8 weight-only quantisation keeps each Linear weight as int8 with one
scale per output row (about 12 GB for the transformer) and computes in the activations' dtype, so
nothing else of the step changes. Trainings on such weights always checkpoint their gradients: each
layer computes with a 16-bit copy of its weight, which autograd would otherwise keep for the backward
pass, one per layer, more than the 16-bit model itself. PEFT trains LoRA on such layers (its `TorchaoLoraLinear`, dispatched
on torchao's weight types), and generation adds a person's LoRA beside them (trainer.merged_lora):
an int8 weight cannot take a merge and be restored exactly.

Only Flux is supported: Stable Diffusion's UNets fit small cards in 16 bits already, and their
generation replays CUDA graphs that merge LoRAs into the weights' own storage.
"""

from __future__ import annotations

import logging
import sys
import time

import torch
from diffusers import DiffusionPipeline

from jobs.worker_config import QUANTIZE_MODES
from trainer.errors import MissingDependency, ModelUnavailable
from trainer.family import FluxFamily, family_of

log = logging.getLogger(__name__)

NONE = "none"
INT8 = "int8"


def check_mode(mode: str) -> None:
    """Refuse a QUANTIZE value that is not one of QUANTIZE_MODES."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantisation {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}")


def quantize_denoiser(pipe: DiffusionPipeline, mode: str, device: str | torch.device | None = None) -> None:
    """Quantise the Flux transformer's Linear weights in place to `mode` ("none" leaves them alone).

    With `device`, each Linear layer moves there just before it is quantised, so a GPU never holds more
    than one layer's 16-bit weight (the rest of the model follows with the pipeline's `to`). Raises
    ModelUnavailable for a base model that is not Flux, MissingDependency without torchao.
    """
    check_mode(mode)
    if mode == NONE:
        return
    family = family_of(pipe)
    if not isinstance(family, FluxFamily):
        raise ModelUnavailable("QUANTIZE=int8 works with Flux base models only; this base model is Stable "
                               "Diffusion, which fits in GPU memory without it: set QUANTIZE=none.")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise MissingDependency("QUANTIZE=int8 needs the torchao package: pip install torchao, or set "
                                "QUANTIZE=none.") from exc
    started = time.perf_counter()
    denoiser = family.denoiser(pipe)
    quantize_(denoiser, Int8WeightOnlyConfig(), device=device)
    layers = sum(is_quantized(m.weight) for m in denoiser.modules() if isinstance(m, torch.nn.Linear))
    log.info("quantised the transformer's %d Linear weights to int8 in %.1f s", layers,
             time.perf_counter() - started)


def holds_quantized(module: torch.nn.Module) -> bool:
    """Whether any Linear layer inside `module` has a quantised weight."""
    return any(is_quantized(m.weight) for m in module.modules() if isinstance(m, torch.nn.Linear))


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether `weight` is one of torchao's quantised tensors (they derive from TorchAOBaseTensor).

    Without torchao imported no weight can be one, and importing it (slow, noisy) is not needed to know.
    """
    if "torchao.utils" not in sys.modules:
        return False
    from torchao.utils import TorchAOBaseTensor

    return isinstance(weight, TorchAOBaseTensor)
