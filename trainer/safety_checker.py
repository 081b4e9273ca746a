"""The image checker: diffusers' Stable Diffusion safety checker, run on every picture a worker makes.

It only gives a verdict per picture; the pictures themselves are never changed (the pipeline's own
`safety_checker` would black them out, so it stays switched off, trainer.pipelines). The bot decides
with the verdict where a picture may go (bot.safety).

The checker comes from SAFETY_CHECKER (a Hugging Face id or a local folder) or, when that is empty,
the standard one for Stable Diffusion bases. The random test bases have none unless one is named:
`python -m trainer make-safety-checker` builds a tiny random stand-in whose verdict is fixed by its
concept thresholds (flag every picture, or none), loaded through the same `from_pretrained` path.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPVisionConfig

from trainer.pipelines import RANDOM_KINDS, pick_dtype

log = logging.getLogger(__name__)
# The checker warns that it "returns a black image" for each flagged batch: not so here (see `flags`).
logging.getLogger(StableDiffusionSafetyChecker.__module__).setLevel(logging.ERROR)

STANDARD_CHECKER = "CompVis/stable-diffusion-safety-checker"
STAND_IN_SIZE = 32  # pixels the stand-in looks at


class ImageChecker:
    """A loaded safety checker and its image processor, on one device."""

    def __init__(self, model: StableDiffusionSafetyChecker, processor: CLIPImageProcessor) -> None:
        self.model = model.eval()
        self.processor = processor

    def flags(self, pngs: list[bytes]) -> list[bool]:
        """For each PNG, whether the checker finds a concept it was made to catch."""
        if not pngs:
            return []
        images = [Image.open(io.BytesIO(data)).convert("RGB") for data in pngs]
        pixels = self.processor(images=images, return_tensors="pt").pixel_values
        pixels = pixels.to(self.model.device, self.model.dtype)
        # `images` is what the checker would black out: stand-ins, so no picture is touched.
        blank = [np.zeros((1, 1, 3)) for _ in images]
        with torch.inference_mode():
            _, flagged = self.model(clip_input=pixels, images=blank)
        return [bool(f) for f in flagged]


def checker_source(setting: str, base_model: str) -> str | None:
    """Where the checker comes from: the setting, else the standard one; none for a random test base."""
    if setting:
        return setting
    return None if base_model in RANDOM_KINDS else STANDARD_CHECKER


def load_checker(setting: str | None, base_model: str, device: str) -> ImageChecker | None:
    """The checker a worker runs (`setting`: WorkerConfig.safety_checker), or None. One that cannot
    be had is logged once as a warning, and the worker goes on with the prompt filter alone."""
    if setting is None:
        return None
    source = checker_source(setting, base_model)
    if source is None:
        log.warning("SAFETY=images, but the test model %s has no image checker; set SAFETY_CHECKER to one "
                    "(e.g. `python -m trainer make-safety-checker`). SAFETY falls back to prompts.", base_model)
        return None
    try:
        model = StableDiffusionSafetyChecker.from_pretrained(source, torch_dtype=pick_dtype(device))
        processor = CLIPImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as exc:
        log.warning("SAFETY=images, but the image checker %s could not be loaded (%s); SAFETY falls back to "
                    "prompts. Check SAFETY_CHECKER (a Hugging Face id or a folder) and the network.", source, exc)
        return None
    log.info("loaded the image checker %s", source)
    return ImageChecker(model.to(device), processor)


def save_stand_in(out_dir: Path | str, *, flag_all: bool, seed: int = 0) -> Path:
    """Build a tiny random safety checker that flags every picture (`flag_all`) or none, and save it
    as a folder that `load_checker` reads. Its verdict rests on its thresholds alone: a cosine
    similarity lies in [-1, 1], so a threshold of -2 is always passed and one of 2 never."""
    out = Path(out_dir)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=STAND_IN_SIZE, patch_size=8, projection_dim=8)
    text = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          projection_dim=8)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8)
    torch.manual_seed(seed)
    model = StableDiffusionSafetyChecker(config)
    threshold = -2.0 if flag_all else 2.0
    with torch.no_grad():
        model.concept_embeds_weights.fill_(threshold)
        model.special_care_embeds_weights.fill_(2.0)
    model.save_pretrained(out, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": STAND_IN_SIZE},
                       crop_size={"height": STAND_IN_SIZE, "width": STAND_IN_SIZE}).save_pretrained(out)
    log.info("saved a stand-in image checker that flags %s to %s", "every picture" if flag_all else "none", out)
    return out
