"""What differs between Stable Diffusion 1.x/2.x, SDXL and Flux for training, kept in one place.

SD1.x conditions the UNet on one CLIP encoder's last hidden state. SDXL concatenates the penultimate
hidden states of two encoders, and adds the second encoder's pooled embedding plus six size numbers
(original size, crop top-left, target size) through `added_cond_kwargs`. Flux (FLUX.1) replaces the
UNet by a rectified-flow transformer that attends to T5's hidden states and reads CLIP's pooled output
(trainer.flow_matching has its training step). Everything else in the trainer is shared, so it asks the
family for the denoiser, text conditioning, the trainable text encoders and the LoRA format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTokenizer, PreTrainedTokenizerBase


@dataclass
class Conditioning:
    """Text conditioning for a batch: UNet cross-attention states and, for SDXL, the added embeddings."""

    hidden_states: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def select(self, index: torch.Tensor) -> Conditioning:
        """Rows `index` of every tensor (for building a batch out of per-prompt rows)."""
        added = {k: v[index] for k, v in self.added.items()} if self.added else None
        return Conditioning(self.hidden_states[index], added)


def tokenize(tokenizer: CLIPTokenizer | PreTrainedTokenizerBase, prompts: list[str], device: torch.device | str,
             max_length: int | None = None) -> torch.Tensor:
    """Token ids padded to the encoder's context (77 for CLIP; `max_length` for T5), as the pipelines do."""
    return tokenizer(prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)


class Family:
    """Stable Diffusion 1.x/2.x: one text encoder, last hidden state, no added conditioning."""

    name = "sd15"
    denoiser_name = "unet"  # the pipeline component that denoises, and carries the trained LoRA
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    # The tokenizers whose context a prompt must fit, or the model would not read all of it.
    prompt_tokenizer_names: tuple[str, ...] = ("tokenizer",)
    pipeline_class: type[DiffusionPipeline] = StableDiffusionPipeline
    # A1111/kohya name the single SD1.x text encoder `lora_te`; diffusers' converter writes `lora_te1`.
    kohya_prefixes: dict[str, str] = {"lora_te1_": "lora_te_"}
    # Whether the step trains by flow matching (trainer.flow_matching) rather than denoising diffusion.
    flow_matching = False
    # Whether the training step and generation may use the UNet's CUDA graphs and compiled stages
    # (trainer.graphs, trainer.compiled_blocks), which know only the UNet's layout.
    graphs_and_compiling = True
    # diffusers' own LoRA key layout (`lora.down`/`lora.up`, as train_dreambooth_lora.py saves); False: PEFT's
    # (`lora_A`/`lora_B`), which train_dreambooth_lora_flux.py saves and diffusers' Flux loader reads.
    diffusers_lora_keys = True
    # Whether the text encoders and the VAE wait in host memory while the steps run on cached
    # embeddings and latents (trainer.offload). SD's are small next to the UNet; their graphs are not.
    park_while_training = False
    # The guidance scale a picture request that names none is drawn with: classifier-free guidance
    # at the scale the SD web UIs default to.
    default_guidance = 7.0

    @property
    def trained_text_encoder_names(self) -> tuple[str, ...]:
        """The text encoders a training with `train_text_encoder` gives a LoRA."""
        return self.text_encoder_names

    def denoiser(self, pipe: DiffusionPipeline) -> torch.nn.Module:
        """The pipeline's UNet or transformer."""
        module: torch.nn.Module = getattr(pipe, self.denoiser_name)
        return module

    def base_resolution(self, pipe: DiffusionPipeline) -> int:
        """The picture side the model draws best: the UNet's latent size times the VAE's scale."""
        return int(pipe.unet.config.sample_size) * vae_scale(pipe)

    def size_multiple(self, pipe: DiffusionPipeline) -> int:
        """What picture sides must be a multiple of: the UNet halves the latent (len(blocks) - 1) times
        and must be able to double it back exactly."""
        return vae_scale(pipe) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)

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
    prompt_tokenizer_names = ("tokenizer", "tokenizer_2")
    pipeline_class = StableDiffusionXLPipeline
    kohya_prefixes = {}

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


class FluxFamily(Family):
    """FLUX.1: a rectified-flow transformer on T5-XXL's hidden states and CLIP-L's pooled output.

    As in diffusers' examples/dreambooth/train_dreambooth_lora_flux.py (`encode_prompt`): CLIP's
    pooled output of the prompt padded to 77 tokens, T5's last hidden state of it padded to 512
    (`--max_sequence_length`), and text position ids all zero. Only CLIP trains a LoRA with
    `train_text_encoder`, as in that script: diffusers' Flux LoRA loader reads none for T5.
    """

    name = "flux"
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    # The transformer reads the prompt through T5 (512 tokens); CLIP's pooled summary of its first 77
    # tokens is all Flux takes from CLIP, and FluxPipeline truncates it there.
    prompt_tokenizer_names = ("tokenizer_2",)
    pipeline_class = FluxPipeline
    # The transformer's kohya names are Black Forest Labs' (trainer.flux_kohya); CLIP-L's are `lora_te1_`.
    kohya_prefixes = {}
    flow_matching = True
    graphs_and_compiling = False
    diffusers_lora_keys = False
    park_while_training = True  # T5-XXL alone is about 9.5 GB in bf16
    # FLUX.1-dev is guidance-distilled: the scale is an input of the transformer, not classifier-free
    # guidance, and FluxPipeline's default (3.5, Black Forest Labs' reference) is what it was tuned for.
    default_guidance = 3.5

    @property
    def trained_text_encoder_names(self) -> tuple[str, ...]:
        return ("text_encoder",)

    def token_ids(self, pipe: DiffusionPipeline, prompts: list[str], device: torch.device | str,
                  ) -> list[torch.Tensor]:
        return [tokenize(pipe.tokenizer, prompts, device),
                tokenize(pipe.tokenizer_2, prompts, device, max_length=pipe.tokenizer_2.model_max_length)]

    def encode(self, pipe: DiffusionPipeline, ids: list[torch.Tensor], resolution: int) -> Conditioning:
        del resolution
        pooled = pipe.text_encoder(ids[0], output_hidden_states=False).pooler_output
        hidden = pipe.text_encoder_2(ids[1], output_hidden_states=False)[0]
        return Conditioning(hidden, {"pooled_projections": pooled.to(hidden.dtype)})

    def base_resolution(self, pipe: DiffusionPipeline) -> int:
        # The transformer has no native size; the VAE's sample size is FLUX.1-dev's 1024 px.
        return int(pipe.vae.config.sample_size)

    def size_multiple(self, pipe: DiffusionPipeline) -> int:
        # Latents are packed in 2x2 patches (FluxPipeline._pack_latents).
        return vae_scale(pipe) * 2


def vae_scale(pipe: DiffusionPipeline) -> int:
    """How many pixels a latent's side stands for: the VAE halves the picture at each block but the last."""
    return int(2 ** (len(pipe.vae.config.block_out_channels) - 1))


def family_of(pipe: DiffusionPipeline) -> Family:
    """The family of a loaded pipeline (Flux pipelines carry a transformer, SDXL ones a second text
    encoder)."""
    if getattr(pipe, "transformer", None) is not None:
        return FluxFamily()
    return XLFamily() if getattr(pipe, "text_encoder_2", None) is not None else Family()
