"""Training settings that depend on the base model's family (SD 1.x/2.x, SDXL or Flux), with their sources.

`TrainConfig`'s defaults are for SD1.5 at 512 px. On an SDXL base the settings nobody chose take
SDXL's values instead. Only a worker knows the family, once it has loaded the model
(trainer.family.family_of); the bot knows BASE_MODEL's name and nothing more. So whoever builds a
training's settings lists those left to the family in `TrainConfig.family_defaults` (`left_to_family`),
and the trainer fills them in where the model is loaded (`for_family`): the operator's and the
person's own choices always win.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from jobs.requests import TrainConfig

FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd15": {},  # TrainConfig's own defaults
    "sdxl": {
        # SDXL was trained at about one megapixel (Podell et al. 2023, "SDXL", section 2.3), and diffusers'
        # examples/dreambooth/README_sdxl.md trains its DreamBooth LoRA at --resolution=1024.
        "resolution": 1024,
        # SDXL draws noise below 512 px, so a 256 px preview would tell the person nothing.
        "preview_resolution": 512,
        # A class-image batch is decoded by the VAE at once: four 1024 px pictures hold as much as
        # sixteen at 512 px, twice SD1.5's batch of eight.
        "class_image_batch": 4,
    },
    "flux": {
        # FLUX.1-dev draws at about one megapixel too; README_flux.md (diffusers' examples/dreambooth)
        # trains its DreamBooth LoRA at --resolution=1024 (512 is its low-memory choice).
        "resolution": 1024,
        "preview_resolution": 512,
        "class_image_batch": 2,
        # train_dreambooth_lora_flux.py's default targets (README_flux.md: "the same modules as in the fal
        # trainer"): the double-stream blocks' image and text attention projections and both
        # feed-forwards; "attn.to_q/k/v" also match the single-stream blocks' attention.
        "lora_targets": ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                         "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                         "ff_context.net.0.proj", "ff_context.net.2"),
        # README_flux.md's commands train without --with_prior_preservation: a guidance-distilled 12B model
        # drifts little from a rank-16 LoRA over a few hundred steps, and 100 class images at 1024 px
        # would take longer to draw than the training itself. A training that asks for it gets it.
        "prior_preservation": False,
    },
}
# What the published SDXL recipes agree on with TrainConfig's defaults, so both families share it:
# - learning rate 1e-4, constant: README_sdxl.md's --learning_rate=1e-4 (the SD1.5 example's too);
# - rank 16: README_sdxl.md keeps the script's rank 4 for its dog; for people, kohya's SDXL LoRA
#   guides use network_dim 16-32 and the HF blog "LoRA training scripts of the world, unite!"
#   (January 2024) rank 32, with Prodigy and pivotal tuning; 16 on the attention projections makes
#   a 46 MB SDXL file in fp16 (6 MB on SD1.5), 32 twice that;
# - 800 steps: README_sdxl.md's 500 are for an object; faces need more, as on SD1.5, and the blog's
#   face runs train 1000-1500 steps at batch size 1-3;
# - prior preservation with weight 1.0: README_sdxl.md's --with_prior_preservation and
#   --prior_loss_weight=1.0, as in the DreamBooth paper;
# - mixed precision: README_sdxl.md trains in fp16 with madebyollin/sdxl-vae-fp16-fix, because SDXL's
#   own VAE overflows in fp16; bf16 (the trainer's choice wherever the GPU has it) has fp32's range,
#   and on GPUs without bf16 the VAE is used only through cached latents encoded once.
FAMILY_TUNED: tuple[str, ...] = tuple(sorted({k for values in FAMILY_DEFAULTS.values() for k in values}))


def left_to_family(chosen: Iterable[str]) -> tuple[str, ...]:
    """The family-tuned settings not in `chosen` (the names of the settings somebody set)."""
    given = set(chosen)
    return tuple(name for name in FAMILY_TUNED if name not in given)


def for_family(config: TrainConfig, family: str) -> TrainConfig:
    """`config` with the settings it leaves to the family set to `family`'s values ("sd15", "sdxl", "flux")."""
    values = FAMILY_DEFAULTS.get(family, {})
    return replace(config, family_defaults=(),
                   **{name: values[name] for name in config.family_defaults if name in values})
