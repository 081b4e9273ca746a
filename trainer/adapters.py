"""The training LoRA on modules that may already hold other LoRAs (a worker's generation adapters).

Everything here works on PEFT's tuner layers, so diffusers' UNet and transformers' text encoders are
handled alike and without the models' own adapter methods, and removing the trained adapter leaves a
module as it was found (unwrapped again when it held no LoRA before). transformers' adapter methods also demand a newer PEFT than diffusers' loader.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer


@dataclass
class AdapterState:
    """Which adapters a module had switched on before training borrowed it."""

    active: list[str]
    enabled: bool


def tuner_layers(module: torch.nn.Module) -> list[BaseTunerLayer]:
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def holds_adapters(module: torch.nn.Module) -> bool:
    """Whether PEFT adapter layers (a training's LoRA) sit anywhere inside `module`."""
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def snapshot(module: torch.nn.Module) -> AdapterState | None:
    """The module's adapter state, or None when it holds no adapter layers at all."""
    layers = tuner_layers(module)
    if not layers:
        return None
    return AdapterState(list(layers[0].active_adapters), not layers[0].disable_adapters)


def set_enabled(module: torch.nn.Module, enabled: bool) -> None:
    for layer in tuner_layers(module):
        layer.enable_adapters(enabled)


def add_lora(module: torch.nn.Module, config: LoraConfig, name: str) -> None:
    """Inject adapter `name` and make it the only active (and only trainable) one."""
    with warnings.catch_warnings():
        # PEFT warns whenever a module already holds adapters; here that is the point.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        # On int8 weights (trainer.quantization) PEFT warns, per layer, that it cannot merge the
        # adapter into them; nothing here merges one (trainer.merged_lora adds it beside them).
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
        inject_adapter_in_model(config, module, adapter_name=name)
    for layer in tuner_layers(module):
        layer.enable_adapters(True)
        layer.set_adapter(name)


def restore(module: torch.nn.Module, state: AdapterState | None) -> None:
    """Put back the active adapters recorded by `snapshot` (adapter layers added since stay, switched off)."""
    if state is None:
        set_enabled(module, False)
        return
    for layer in tuner_layers(module):
        # PEFT also makes exactly the active adapters trainable. Each layer gets its own list, as
        # `add_lora` leaves them: the compiled training step's guards tell shared from separate lists.
        layer.set_adapter(list(state.active))
        layer.enable_adapters(state.enabled)


def remove_lora(module: torch.nn.Module, name: str, before: AdapterState | None) -> None:
    """Delete adapter `name` and put back the adapter state recorded by `snapshot`.

    Adapters loaded while `name` was there (a generation served between training steps) stay; when
    none was there before and none was added, the module is unwrapped completely.
    """
    configs = getattr(module, "peft_config", None)  # PEFT's injector registers every adapter here
    if isinstance(configs, dict):
        configs.pop(name, None)
        if not configs:
            del module.peft_config
    others = sorted({a for layer in tuner_layers(module) for a in getattr(layer, "lora_A", {}) if a != name})
    if before is None and not others:
        recurse_remove_peft_layers(module)
    else:
        state = before or AdapterState(others[:1], False)
        for layer in tuner_layers(module):
            layer.set_adapter([a for a in state.active if a != name] or others[:1])
            if name in getattr(layer, "lora_A", {}):
                layer.delete_adapter(name)
            layer.enable_adapters(state.enabled)
    module.requires_grad_(False)


def lora_state_dict(module: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s weights keyed as PEFT saves them (`<layer>.lora_A.weight`, `<layer>.lora_B.weight`)."""
    state: dict[str, torch.Tensor] = {}
    for path, layer in module.named_modules():
        if isinstance(layer, LoraLayer) and name in layer.lora_A:
            state[f"{path}.lora_A.weight"] = layer.lora_A[name].weight.detach()
            state[f"{path}.lora_B.weight"] = layer.lora_B[name].weight.detach()
    return state
