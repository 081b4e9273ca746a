"""A Flux LoRA in kohya's layout (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`), the one
kohya's sd-scripts write for FLUX.1 and ComfyUI, Forge and diffusers' Flux loader read.

kohya names the layers as Black Forest Labs' checkpoints do, where the query, key and value
projections are one fused linear (`img_attn.qkv`; in the single-stream blocks `linear1` also holds
the MLP's input projection). diffusers keeps them apart (`attn.to_q`, ...), so the LoRAs of a fused
layer's parts are stacked: their `down` matrices one above the other, their `up` matrices block-diagonal,
so that `up @ down` is exactly the parts' updates side by side. Parts that were not trained get zero
blocks; the alpha is scaled by the number of parts, since the stacked rank is that many times larger.
diffusers' loader (lora_conversion_utils._convert_kohya_flux_lora_to_diffusers) recognises such a
block-diagonal `up` and splits it back into the parts exactly.
"""

from __future__ import annotations

import torch

# diffusers' layer names of each double-stream (transformer_blocks.i) and single-stream
# (single_transformer_blocks.i) layer, under Black Forest Labs' names; several: fused, in order.
DOUBLE_BLOCK = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_mod_lin": ("norm1_context.linear",),
}
SINGLE_BLOCK = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
BLOCKS = {"transformer_blocks": ("double_blocks", DOUBLE_BLOCK),
          "single_transformer_blocks": ("single_blocks", SINGLE_BLOCK)}


class UnmappedLayer(ValueError):
    """A trained layer that kohya's Flux layout has no name for here."""


def _pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's `<layer>.lora_A.weight` / `.lora_B.weight` as (down, up) by layer path."""
    layers = {key.removesuffix(".lora_A.weight") for key in state if key.endswith(".lora_A.weight")}
    return {path: (state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"]) for path in layers}


def transformer_to_kohya(state: dict[str, torch.Tensor], transformer: torch.nn.Module, alpha: float,
                         ) -> dict[str, torch.Tensor]:
    """The transformer's PEFT-format LoRA `state` (keys relative to the transformer) in kohya's Flux
    layout, with `alpha` as trained; `transformer` gives the sizes of fused parts that were not trained."""
    pairs = _pairs(state)
    out: dict[str, torch.Tensor] = {}
    layers: set[tuple[str, str, str]] = set()  # (diffusers stack, block index, kohya layer name)
    for path in pairs:
        stack, index, rest = (path.split(".", 2) + ["", ""])[:3]
        if stack not in BLOCKS or not index.isdigit():
            raise UnmappedLayer(f"no kohya name for the Flux layer {path}")
        names = BLOCKS[stack][1]
        name = next((n for n, parts in names.items() if rest in parts), None)
        if name is None:
            raise UnmappedLayer(f"no kohya name for the Flux layer {path}")
        layers.add((stack, index, name))
    for stack, index, name in sorted(layers):
        kohya_stack, names = BLOCKS[stack]
        key, prefix, parts = f"lora_unet_{kohya_stack}_{index}_{name}", f"{stack}.{index}", names[name]
        trained = next(pairs[f"{prefix}.{p}"][0] for p in parts if f"{prefix}.{p}" in pairs)
        # Zeros where the trained parts are (a GPU's training hands its LoRA over on the GPU).
        rank, device = trained.shape[0], trained.device
        downs, ups = [], []
        for part in parts:
            if f"{prefix}.{part}" in pairs:
                down, up = pairs[f"{prefix}.{part}"]
            else:
                layer = transformer.get_submodule(f"{prefix}.{part}")
                layer = getattr(layer, "base_layer", layer)  # under a PEFT wrapper
                down = torch.zeros(rank, int(layer.in_features), device=device)
                up = torch.zeros(int(layer.out_features), rank, device=device)
            downs.append(down.float())
            ups.append(up.float())
        out[f"{key}.lora_down.weight"] = torch.cat(downs).contiguous()
        out[f"{key}.lora_up.weight"] = torch.block_diag(*ups).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha) * len(parts))
    return out
