"""People's LoRAs applied by merging them into the base weights for the length of one generation.

A LoRA adds `scale * up @ down` to a Linear layer's weight. Computing that update into the weight
before a generation and copying the original weight back afterwards gives the same pictures as
PEFT's adapter layers (which add the low-rank path at every forward pass), with three gains:

- the forward pass is the base model's own: no extra small matrix products per attention
  projection per step, which on a GPU are a quarter of a launch-bound denoising step;
- the weights keep their storage, so a CUDA graph captured once for the base model replays with
  anyone's LoRA (trainer.graphs); switching people never re-captures or recompiles;
- the original weights are restored by copy, bit for bit: merging and unmerging a thousand times
  drifts nothing, which subtracting the update again (PEFT's `unmerge`) cannot promise in bf16.

The cost is a transient copy of the targeted weights (about 190 MB for SD1.5's attention projections
in bf16) and a few kernels per generation: layers of one shape are merged together, one batched
product and one multi-tensor add per shape, so a person's switch is not a few hundred launches from
Python (SD1.5's UNet alone has 128 targeted projections in a handful of shapes).

A quantised layer (trainer.quantization: a Flux transformer kept in int8) cannot take a merge: its
weight is int8 codes and scales, and rounding the update into them would neither keep the update nor
restore the original. For such layers the LoRA is applied unmerged instead, as PEFT's adapter layers
do: a forward hook adds `scale * up @ (down @ x)` to the layer's output for the length of the block,
and the weights are never written, so the base model is back exactly when the hooks are removed.

Only LoRA files written by this project's trainer are read (diffusers key layout,
`<component>.<module path>.lora.down.weight` / `.lora.up.weight`, `lora_linear_layer.` for text
encoders, alpha in diffusers' adapter metadata), on Linear layers, which is what the trainer trains.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open

from trainer.quantization import is_quantized

log = logging.getLogger(__name__)

# diffusers' names for the two halves (UNet layers, text-encoder layers), then PEFT's.
_SUFFIXES = {".lora.down.weight": "down", ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
             ".lora_linear_layer.up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up"}


class UnusableLora(ValueError):
    """The file is not a LoRA for these modules (damaged, another base model, unsupported kind)."""


@dataclass(frozen=True)
class LayerGroup:
    """Linear layers of one shape, dtype, device and scale: weight_i += scale * up[i] @ down[i]."""

    layers: tuple[torch.nn.Linear, ...]
    down: torch.Tensor  # (layers, rank, in_features)
    up: torch.Tensor  # (layers, out_features, rank)
    scale: float
    quantized: bool = False  # the weights are torchao's (int8): applied by forward hooks, not merged


@dataclass(frozen=True)
class Lora:
    """A person's LoRA, resident on the modules' device in their dtype, grouped for batched merging."""

    groups: tuple[LayerGroup, ...]

    @property
    def layers(self) -> int:
        return sum(len(g.layers) for g in self.groups)

    @property
    def nbytes(self) -> int:
        return sum(g.down.nbytes + g.up.nbytes for g in self.groups)


def _linear(module: torch.nn.Module) -> torch.nn.Linear | None:
    """The plain Linear behind a module, through PEFT's wrapper when a training adapter is injected."""
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return module if isinstance(module, torch.nn.Linear) else None


def _find(component: torch.nn.Module, path: str) -> torch.nn.Module | None:
    # Text-encoder keys carry the classic `text_model.` prefix that transformers 5 dropped.
    for candidate in (path, path.removeprefix("text_model.")):
        try:
            return component.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def _scales(metadata: Mapping[str, str], component: str) -> tuple[float | None, bool]:
    """(alpha, use_rslora) for a component from diffusers' adapter metadata, else the file's own header."""
    adapter = json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")
    if adapter.get(f"{component}.use_dora") or adapter.get(f"{component}.rank_pattern") or adapter.get(
            f"{component}.alpha_pattern"):
        raise UnusableLora("DoRA and per-layer rank or alpha patterns are not supported")
    alpha = adapter.get(f"{component}.lora_alpha", metadata.get("alpha"))
    return (float(alpha) if alpha not in (None, "") else None), bool(adapter.get(f"{component}.use_rslora"))


def read_lora(path: Path, components: Mapping[str, torch.nn.Module]) -> Lora:
    """Read a LoRA file onto `components` (name -> module, e.g. "unet", "text_encoder").

    The tensors are placed on each target layer's device in its dtype. Raises UnusableLora when the
    file cannot be read or does not fit these modules; nothing is changed in the modules either way.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise UnusableLora(f"unreadable: {type(exc).__name__}: {exc}") from exc
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        component, _, rest = key.partition(".")
        if suffix is None or component not in components:
            raise UnusableLora(f"unexpected tensor {key!r}")
        pairs.setdefault((component, rest[: -len(suffix)]), {})[_SUFFIXES[suffix]] = tensor
    if not pairs:
        raise UnusableLora("the file holds no LoRA weights")
    grouped: dict[tuple, list[tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]]] = {}
    for (component, module_path), pair in pairs.items():
        layer = _find(components[component], module_path)
        linear = _linear(layer) if layer is not None else None
        down, up = pair.get("down"), pair.get("up")
        if linear is None or down is None or up is None:
            raise UnusableLora(f"no Linear layer {component}.{module_path} for this LoRA")
        rank = down.shape[0]
        if down.shape != (rank, linear.in_features) or up.shape != (linear.out_features, rank):
            raise UnusableLora(f"{component}.{module_path}: shapes {tuple(down.shape)}, {tuple(up.shape)} do not fit")
        alpha, rslora = _scales(metadata, component)
        alpha = float(rank) if alpha is None else alpha
        scale = alpha / rank**0.5 if rslora else alpha / rank
        weight = linear.weight
        key = (tuple(weight.shape), rank, weight.dtype, weight.device, scale, is_quantized(weight))
        grouped.setdefault(key, []).append((linear, down, up))
    groups = []
    for (_shape, _rank, dtype, device, scale, quantized), members in grouped.items():
        layers, downs, ups = zip(*members, strict=True)
        groups.append(LayerGroup(tuple(layers), torch.stack(downs).to(device, dtype),
                                 torch.stack(ups).to(device, dtype), scale, quantized))
    return Lora(tuple(groups))


def _adds_lora(down: torch.Tensor, up: torch.Tensor, scale: float,
               ) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]:
    """A forward hook adding `scale * up @ down` applied to the layer's input to its output."""
    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        # The module may have been cast since the LoRA was read; a no-op otherwise.
        lora_down, lora_up = down.to(x.device, x.dtype), up.to(x.device, x.dtype)
        return output + F.linear(F.linear(x, lora_down), lora_up) * scale
    return hook


@contextlib.contextmanager
def merged(lora: Lora | None) -> Iterator[None]:
    """Within the block, `lora`'s layers compute with its update merged in; afterwards the exact
    original weights are back, also when the block raises. None merges nothing."""
    if lora is None:
        yield
        return
    merging = [group for group in lora.groups if not group.quantized]
    weights = [[layer.weight for layer in group.layers] for group in merging]
    hooks: list[torch.utils.hooks.RemovableHandle] = []
    with torch.no_grad():
        originals = [torch.stack(group) for group in weights]  # one copy per shape, not per layer
        try:
            for group in lora.groups:
                if group.quantized:
                    hooks.extend(layer.register_forward_hook(_adds_lora(down, up, group.scale))
                                 for layer, down, up in zip(group.layers, group.down, group.up, strict=True))
            for group, group_weights in zip(merging, weights, strict=True):
                down, up = group.down, group.up
                first = group_weights[0]
                if down.dtype != first.dtype or down.device != first.device:  # the module was cast since
                    down, up = down.to(first.device, first.dtype), up.to(first.device, first.dtype)
                torch._foreach_add_(group_weights, torch.bmm(up, down).unbind(0), alpha=group.scale)
            yield
        finally:
            for handle in hooks:
                handle.remove()
            for group_weights, original in zip(weights, originals, strict=True):
                torch._foreach_copy_(group_weights, original.unbind(0))
