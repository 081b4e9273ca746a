"""The trained part of a training: its LoRA adapters, their fp32 master weights, the optimiser.

The optimiser steps fp32 parameters always. Under bf16 the LoRA layers compute in bf16 like the
frozen weights they sit on (fp32 LoRA weights would turn every LoRA product into an fp32 GEMM plus
casts of its activations; bench/RESULTS.md, "Training step" of 2026-11-30, has the figures), and
the optimiser keeps fp32 master copies that are copied back after each step. fp16 keeps fp32 LoRA
weights: its loss scaler unscales fp32 gradients only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DiffusionPipeline
from diffusers.training_utils import cast_training_params
from peft import LoraConfig

from trainer import adapters
from trainer.errors import MissingDependency
from trainer.family import Family

if TYPE_CHECKING:
    from jobs.requests import TrainConfig

ADAPTER = "dreambooth"  # the trained adapter's name in the pipeline's modules
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(eq=False)
class Trainable:
    """The adapters a training added and what updates them."""

    lora_configs: dict[str, LoraConfig]  # by module name: "unet" (or "transformer"), and the text encoders if they train
    modules: dict[str, torch.nn.Module]  # the modules that train an adapter
    params: dict[str, torch.nn.Parameter]  # what the optimiser steps, fp32, by "<module>.<parameter name>"
    lora_weights: list[torch.nn.Parameter] | None  # under bf16: the layers' own weights, in `params` order
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only: its activations underflow in backward unscaled
    param_list: list[torch.nn.Parameter] = field(init=False)

    def __post_init__(self) -> None:
        self.param_list = list(self.params.values())

    def copy_grads_to_masters(self) -> None:
        """Hand the LoRA layers' bf16 gradients to the fp32 masters the optimiser steps (bf16 runs only)."""
        if self.lora_weights is not None:
            grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in self.lora_weights]
            torch._foreach_copy_([m.grad for m in self.param_list], grads)
            for weight in self.lora_weights:
                weight.grad = None

    @torch.no_grad()
    def copy_masters_to_lora(self) -> None:
        """Round the fp32 master weights into the LoRA layers' bf16 weights (bf16 runs only)."""
        if self.lora_weights is not None:
            torch._foreach_copy_(self.lora_weights, self.param_list)

    def lora_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """The trained adapter's tensors by module, for the LoRA files: with the fp32 masters in the
        layers, not their bf16 rounding."""
        if self.lora_weights is not None:
            for weight, master in zip(self.lora_weights, self.param_list, strict=True):
                weight.data = master.detach().clone()
        return {name: adapters.lora_state_dict(module, ADAPTER) for name, module in self.modules.items()}



def text_encoder_checkpointing(module: torch.nn.Module, on: bool) -> None:
    """Turn a transformers text encoder's gradient checkpointing on or off: by the names transformers 5
    gives it where they exist (the old ones warn there), else by transformers 4's."""
    name = "activation_checkpointing_" if hasattr(module, "activation_checkpointing_enable") else "gradient_checkpointing_"
    getattr(module, name + ("enable" if on else "disable"))()

def add_trainable(pipe: DiffusionPipeline, family: Family, config: TrainConfig, dtype: torch.dtype,
                  device: torch.device) -> Trainable:
    """Add the adapter to the UNet or transformer (and to the text encoders if they train), put it in
    training mode and build the optimiser."""
    common = {"r": config.rank, "lora_alpha": config.lora_alpha, "init_lora_weights": "gaussian"}
    denoiser = family.denoiser_name
    lora_configs = {denoiser: LoraConfig(**common, target_modules=list(config.lora_targets))}
    if config.train_text_encoder:
        for name in family.trained_text_encoder_names:
            lora_configs[name] = LoraConfig(**common, target_modules=list(TEXT_LORA_TARGETS))
    modules = {name: getattr(pipe, name) for name in lora_configs}
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)  # LoRA's gaussian init draws from the global generator
        for name, module in modules.items():
            adapters.add_lora(module, lora_configs[name], ADAPTER)
    cast_training_params(list(modules.values()), dtype=torch.float32)
    in_modules = {f"{name}.{p_name}": p for name, module in modules.items()
                  for p_name, p in module.named_parameters() if p.requires_grad}
    lora_weights: list[torch.nn.Parameter] | None = None
    if dtype == torch.bfloat16:
        params = {k: torch.nn.Parameter(p.detach().clone()) for k, p in in_modules.items()}
        for master in params.values():
            master.grad = torch.zeros_like(master)
        for weight in in_modules.values():
            weight.data = weight.data.to(torch.bfloat16)
        lora_weights = list(in_modules.values())
    else:
        params = in_modules
    if config.gradient_checkpointing:
        modules[denoiser].enable_gradient_checkpointing()
        for name, module in modules.items():
            if name != denoiser:
                text_encoder_checkpointing(module, True)
    modules[denoiser].train()
    optimizer = _optimizer(params, denoiser, config, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return Trainable(lora_configs, modules, params, lora_weights, optimizer, scaler)


def _optimizer(params: dict[str, torch.nn.Parameter], denoiser: str, config: TrainConfig, device: torch.device,
               ) -> torch.optim.Optimizer:
    """AdamW over the `denoiser`'s LoRA at `learning_rate` and the text encoders' at `text_encoder_lr`."""
    unet_params = [p for k, p in params.items() if k.startswith(f"{denoiser}.")]
    text_params = [p for k, p in params.items() if not k.startswith(f"{denoiser}.")]
    groups: list[dict[str, Any]] = [{"params": unet_params, "lr": config.learning_rate}]
    if text_params:
        groups.append({"params": text_params, "lr": config.text_encoder_lr})
    kwargs = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": config.adam_weight_decay}
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise MissingDependency("8-bit Adam needs the bitsandbytes package (CUDA only): "
                                    "pip install bitsandbytes, or turn use_8bit_adam off.") from exc
        return bnb.optim.AdamW8bit(groups, **kwargs)
    if device.type == "cuda":
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)
