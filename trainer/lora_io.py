"""Writing a trained LoRA: the diffusers file the engine loads, and a kohya/A1111 file people can take away.

The diffusers file is written by the pipeline class's own `save_lora_weights` (so `load_lora_weights`
reads it, alpha included, through diffusers' adapter metadata) and then re-written with our metadata
added to the safetensors header: handle, class word, base model, steps, rank, alpha, creation time.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer import flux_kohya
from trainer.family import Family
from trainer.file_writes import disk_errors, write_atomic

DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"
FORMAT_VERSION = "1"
# How A1111/kohya label the base architecture of a LoRA (shown in their model browsers).
KOHYA_BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}


def canonical_keys(states: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Text-encoder keys as the LoRA ecosystem writes them (`text_model.encoder...`).

    transformers 5 dropped the `text_model` wrapper of CLIPTextModel, so its layer paths start at
    `encoder.`; A1111, kohya and diffusers' loader all expect (and map back) the classic prefix.
    """
    out = {}
    for name, state in states.items():
        if name.startswith("text_encoder"):
            state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
        out[name] = state
    return out


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def save_diffusers(out_dir: Path, family: Family, states: dict[str, dict[str, torch.Tensor]],
                   configs: dict[str, LoraConfig], metadata: dict[str, str]) -> Path:
    """`out_dir/pytorch_lora_weights.safetensors` in diffusers format, with `metadata` in its header.

    `states` maps a pipeline component (unet or transformer, text_encoder, text_encoder_2) to its
    PEFT-format LoRA tensors, `configs` to the LoraConfig they were trained with (saved so loaders get
    alpha right). Flux's are saved with PEFT's keys, as train_dreambooth_lora_flux.py saves them.
    """
    kwargs: dict[str, object] = {}
    for name, state in canonical_keys(states).items():
        kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(state) if family.diffusers_lora_keys else state
        kwargs[f"{name}_lora_adapter_metadata"] = configs[name].to_dict()
    target = out_dir / DIFFUSERS_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".lora-") as tmp:
        with disk_errors("trained model"):
            family.pipeline_class.save_lora_weights(tmp, safe_serialization=True, **kwargs)
        written = Path(tmp) / DIFFUSERS_NAME
        tensors = load_file(written)
        header = {**read_metadata(written), **metadata}
        write_atomic(target, lambda p: save_file(tensors, p, metadata=header), "trained model")
    return target


def save_kohya(path: Path, family: Family, states: dict[str, dict[str, torch.Tensor]], alpha: float,
               metadata: dict[str, str], denoiser: torch.nn.Module | None = None) -> Path:
    """A single-file LoRA with kohya keys (`lora_unet_..._to_q.lora_down.weight`, `.alpha`) for A1111/ComfyUI.

    A Flux transformer's layers take Black Forest Labs' names (trainer.flux_kohya), for which
    `denoiser` (the trained transformer) gives the sizes of fused layers' untrained parts.
    """
    peft_state: dict[str, torch.Tensor] = {}
    fused: dict[str, torch.Tensor] = {}
    for name, state in canonical_keys(states).items():
        if family.name == "flux" and name == family.denoiser_name:
            if denoiser is None:
                raise ValueError("a Flux LoRA's kohya file needs the transformer it was trained on")
            fused = flux_kohya.transformer_to_kohya(state, denoiser, alpha)
        else:
            peft_state.update({f"{name}.{k}": v for k, v in state.items()})
    kohya = convert_state_dict_to_kohya(peft_state) if peft_state else {}
    out: dict[str, torch.Tensor] = dict(fused)
    for key, value in kohya.items():
        for old, new in family.kohya_prefixes.items():
            if key.startswith(old):
                key = new + key[len(old):]
        # The converter assumes alpha == rank; write the alpha the adapter really used.
        out[key] = torch.tensor(float(alpha)) if key.endswith(".alpha") else value.contiguous()
    header = {**metadata, "ss_network_module": "networks.lora", "ss_network_dim": metadata.get("rank", ""),
              "ss_network_alpha": metadata.get("alpha", ""), "ss_output_name": path.stem,
              "ss_base_model_version": KOHYA_BASE_VERSION[family.name]}
    write_atomic(path, lambda p: save_file(out, p, metadata=header), "trained model")
    return path


def safe_file_stem(handle: str) -> str:
    """A file name made from a handle: letters, digits, '-' and '_' only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", handle).strip("_") or "lora"
