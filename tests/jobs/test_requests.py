"""The request types every side builds from: their checks, their defaults, and what the database keeps."""

from __future__ import annotations

import dataclasses
import math

import pytest

from bot.config import Settings
from jobs.payloads import GenerateParams, TrainParams, VariationOf, from_stored, to_stored
from jobs.requests import (
    DEFAULT_BASE_MODEL,
    SCHEDULER_NAMES,
    STYLES,
    TRAIN_DEFAULTS,
    BadRequest,
    GenerateRequest,
    TrainConfig,
    check_train_steps,
)
from jobs.worker_config import WorkerConfig


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_images": 0}, "1 to 4 pictures"),
    ({"num_images": 5}, "1 to 4 pictures"),
    ({"steps": 0}, "Steps must be between 1 and 100"),
    ({"steps": 101}, "Steps must be between 1 and 100"),
    ({"guidance": -0.5}, "Guidance must be between 0 and 30"),
    ({"guidance": 31}, "Guidance must be between 0 and 30"),
    ({"guidance": math.nan}, "Guidance must be between 0 and 30"),
    ({"aspect": "wide"}, "Unknown shape 'wide'; choose one of square, portrait, landscape"),
    ({"scheduler": "plms"}, "Unknown scheduler 'plms'; choose one of dpmpp_2m"),
    ({"style": "vaporwave"}, "Unknown style 'vaporwave'; choose one of photo, portrait"),
    ({"seed": -1}, "A seed is a whole number from 0"),
    ({"seed": 2**60}, "A seed is a whole number from 0"),
    ({"strength": 0}, "Variation strength must be above 0 and at most 1"),
    ({"strength": 1.5}, "Variation strength must be above 0 and at most 1"),
])
def test_bad_requests_are_explained(fields: dict, message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        GenerateRequest(prompt="a castle", **fields)
    assert caught.value.code == "bad_request"
    assert message in caught.value.message


def test_good_requests_are_accepted() -> None:
    for fields in ({"num_images": 4, "steps": 100, "guidance": 0, "seed": 0},
                   {"num_images": 1, "steps": 1, "guidance": 30, "aspect": "portrait", "style": "anime",
                    "scheduler": "ddim", "strength": 1.0}):
        GenerateRequest(prompt="a castle", **fields)


def test_prompt_and_negative_prompt_are_held_to_the_operators_length() -> None:
    GenerateRequest("x" * 600, negative_prompt="y" * 600).check_length(600)
    with pytest.raises(BadRequest, match=r"^That prompt is 601 characters; the limit is 600\. Please shorten it\.$"):
        GenerateRequest("x" * 601).check_length(600)
    with pytest.raises(BadRequest, match=r"^That negative prompt is 6000 characters; the limit is 600\."):
        GenerateRequest("x", negative_prompt="y" * 6000).check_length(600)


def test_training_steps_of_a_person_are_held_to_the_allowed_range() -> None:
    check_train_steps(50)
    check_train_steps(5000)
    for steps in (49, 5001):
        with pytest.raises(BadRequest, match="^Steps must be between 50 and 5000.$"):
            check_train_steps(steps)


def test_each_default_is_written_once_and_the_settings_follow_it() -> None:
    settings, worker = Settings(), WorkerConfig("m", "cpu", "w", "c")
    assert settings.base_model == DEFAULT_BASE_MODEL
    assert settings.train_rank == worker.train_rank == TRAIN_DEFAULTS.rank
    assert (settings.train_steps, settings.train_learning_rate, settings.class_images,
            settings.min_photos) == (TRAIN_DEFAULTS.steps, TRAIN_DEFAULTS.learning_rate,
                                     TRAIN_DEFAULTS.num_class_images, TRAIN_DEFAULTS.min_photos)
    assert settings.train_resolution == 0  # the base model's own (jobs.train_defaults)
    config = dataclasses.replace(settings, train_rank=8, train_steps=900, train_preview_every=50).train_config()
    assert (config.rank, config.steps, config.preview_every) == (8, 900, 50)
    assert settings.train_config(steps=120).steps == 120
    assert config.lora_targets == TRAIN_DEFAULTS.lora_targets  # what the operator cannot set stays the default


def test_the_names_a_request_accepts_are_the_ones_the_trainer_knows() -> None:
    from trainer import noise_schedulers, prompts

    assert tuple(noise_schedulers._FACTORIES) == SCHEDULER_NAMES
    assert prompts.STYLES is STYLES


def test_stored_parameters_come_back_as_they_were() -> None:
    train = TrainParams("zqjane", "woman", TrainConfig(steps=120, rank=8))
    generate = GenerateParams(GenerateRequest("on a horse", num_images=2, seed=9), 3, "model-3", "zqjane",
                              "woman", VariationOf(4, 1))
    assert from_stored("train", to_stored(train)) == train
    assert from_stored("generate", to_stored(generate)) == generate


def test_parameters_stored_by_an_earlier_version_still_read() -> None:
    """Rows written before the typed parameters: a request of a few fields, a config of the bot's few."""
    old_generate = {"request": {"prompt": "p", "negative_prompt": "", "num_images": 2, "seed": None,
                                "aspect": "square", "style": None},
                    "model_id": 1, "adapter_key": "model-1", "handle": "zq", "class_word": "woman",
                    "variation_of": {"generation_id": 2, "index": 0}}
    params = from_stored("generate", old_generate)
    assert isinstance(params, GenerateParams)
    assert params.request == GenerateRequest("p", num_images=2) and params.variation_of == VariationOf(2, 0)
    old_train = {"handle": "zq", "class_word": "woman", "sample_steps": 25, "samples": 2, "seed": 0,
                 "config": {"steps": 800, "rank": 16, "resolution": 512, "learning_rate": 1e-4,
                            "num_class_images": 100, "checkpoint_every": 200, "preview_every": 200,
                            "min_photos": 5}}
    params = from_stored("train", old_train)
    assert isinstance(params, TrainParams)
    assert params.config == dataclasses.replace(TRAIN_DEFAULTS, preview_every=200)


def test_bad_training_settings_are_refused() -> None:
    for fields in ({"steps": 0}, {"rank": 0}, {"resolution": 100}, {"mixed_precision": "fp8"}):
        with pytest.raises(ValueError):
            TrainConfig(**fields)
