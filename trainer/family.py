"""What differs between Stable Diffusion 1.x/2.x and SDXL for training, kept in one place.

SD1.x conditions the UNet on one CLIP encoder's last hidden state. SDXL concatenates the penultimate
hidden states of two encoders, and adds the second encoder's pooled embedding plus six size numbers
(original size, crop top-left, target size) through `added_cond_kwargs`. Everything else in the trainer
is shared, so it asks the family for text conditioning, the trainable text encoders and the LoRA saver.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTokenizer


@dataclass
class Conditioning:
    """Text conditioning for a batch: UNet cross-attention states and, for SDXL, the added embeddings."""

    hidden_states: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def select(self, index: torch.Tensor) -> Conditioning:
        """Rows `index` of every tensor (for building a batch out of per-prompt rows)."""
        added = {k: v[index] for k, v in self.added.items()} if self.added else None
        return Conditioning(self.hidden_states[index], added)


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str], device: torch.device | str) -> torch.Tensor:
    """Token ids padded to the encoder's context (77), as the pipelines do."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


class Family:
    """Stable Diffusion 1.x/2.x: one text encoder, last hidden state, no added conditioning."""

    name = "sd15"
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    pipeline_class: type[DiffusionPipeline] = StableDiffusionPipeline
    # A1111/kohya name the single SD1.x text encoder `lora_te`; diffusers' converter writes `lora_te1`.
    kohya_text_prefixes: dict[str, str] = {"lora_te1_": "lora_te_"}

    def token_ids(self, pipe: DiffusionPipeline, prompts: list[str], device: torch.device | str,
                  ) -> list[torch.Tensor]:
        return [tokenize(pipe.tokenizer, prompts, device)]

    def encode(self, pipe: DiffusionPipeline, ids: list[torch.Tensor], resolution: int) -> Conditioning:
        del resolution
        return Conditioning(pipe.text_encoder(ids[0], return_dict=False)[0])


class XLFamily(Family):
    """SDXL: two encoders (penultimate layers concatenated), pooled text and size ids as added inputs."""

    name = "sdxl"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    pipeline_class = StableDiffusionXLPipeline
    kohya_text_prefixes = {}

    def token_ids(self, pipe: DiffusionPipeline, prompts: list[str], device: torch.device | str,
                  ) -> list[torch.Tensor]:
        return [tokenize(pipe.tokenizer, prompts, device), tokenize(pipe.tokenizer_2, prompts, device)]

    def encode(self, pipe: DiffusionPipeline, ids: list[torch.Tensor], resolution: int) -> Conditioning:
        first = pipe.text_encoder(ids[0], output_hidden_states=True)
        second = pipe.text_encoder_2(ids[1], output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        pooled = second.text_embeds
        # Photos are resized and centre-cropped to a square: original = target = resolution, crop at 0,0.
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]],
                                device=hidden.device, dtype=hidden.dtype).expand(hidden.shape[0], -1)
        return Conditioning(hidden, {"text_embeds": pooled, "time_ids": time_ids})


def family_of(pipe: DiffusionPipeline) -> Family:
    """The family of a loaded pipeline (SDXL pipelines carry a second text encoder)."""
    return XLFamily() if getattr(pipe, "text_encoder_2", None) is not None else Family()
