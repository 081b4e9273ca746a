"""Training settings that follow the base model's family, and the operator's choices over them."""

from __future__ import annotations

import dataclasses

from bot.config import Settings
from jobs.requests import TRAIN_DEFAULTS, TrainConfig
from jobs.train_defaults import FAMILY_TUNED, for_family, left_to_family


def test_sdxl_trains_at_its_own_size_unless_told_otherwise() -> None:
    left = TrainConfig(family_defaults=left_to_family({}))
    sdxl = for_family(left, "sdxl")
    assert (sdxl.resolution, sdxl.preview_resolution, sdxl.class_image_batch) == (1024, 512, 4)
    assert sdxl.family_defaults == ()
    # The recipes agree with SD1.5's values for the rest (see jobs.train_defaults).
    assert (sdxl.steps, sdxl.rank, sdxl.learning_rate, sdxl.prior_preservation) == (800, 16, 1e-4, True)
    assert for_family(left, "sd15") == dataclasses.replace(left, family_defaults=())
    chosen = TrainConfig(resolution=768, family_defaults=left_to_family({"resolution"}))
    assert for_family(chosen, "sdxl").resolution == 768
    assert for_family(TrainConfig(), "sdxl") == TrainConfig()  # nothing left to the family: as given


def test_the_bot_leaves_an_unset_resolution_to_the_base_model() -> None:
    config = Settings().train_config()
    assert config.resolution == TRAIN_DEFAULTS.resolution and config.family_defaults == FAMILY_TUNED
    assert for_family(config, "sdxl").resolution == 1024
    chosen = dataclasses.replace(Settings(), train_resolution=640).train_config()
    assert chosen.resolution == 640 and "resolution" not in chosen.family_defaults
    assert for_family(chosen, "sdxl").resolution == 640
