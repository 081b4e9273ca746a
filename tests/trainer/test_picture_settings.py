"""Each picture's settings in its PNG (A1111's `parameters` chunk), and pictures made again from their seed.

On the tiny model with a random LoRA, through the engine as a worker runs it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bench.generate_speed import make_random_lora
from jobs import events, png_parameters
from jobs.payloads import Picture, TrainInputs, TrainParams, WorkItem
from jobs.png_parameters import PictureSettings
from jobs.requests import GenerateRequest
from tests.photos_factory import training_photos
from tests.trainer.test_dreambooth import small
from trainer import prompts
from trainer.engine import DEFAULT_VARIATION_STRENGTH, GenerationEngine
from trainer.pipelines import build_random_pipeline

HANDLE, CLASS = "zqjane", "woman"
# An adapter key the way the bot makes them: it names a person, so it must stay out of the pictures.
KEY = "user-271828182845904523-model-9"
REQUEST = GenerateRequest(prompt="riding a horse, at dawn", negative_prompt="blurry,  text", num_images=2,
                          seed=41, steps=2, guidance=6.5, scheduler="euler_a", aspect="portrait", style="anime")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_lora(build_random_pipeline("tiny"), tmp_path_factory.mktemp("lora"), seed=5, rank=4)


@pytest.fixture(scope="module")
def engine() -> GenerationEngine:
    return GenerationEngine(build_random_pipeline("tiny"), model_name=png_parameters.model_name("tiny"))


def parameters(picture: Picture) -> str:
    with Image.open(io.BytesIO(picture.png)) as image:
        return str(image.info[png_parameters.KEY])


def person(lora: Path) -> dict[str, Any]:
    return {"adapter_key": KEY, "lora_path": lora, "handle": HANDLE, "class_word": CLASS}


def test_each_pictures_settings_parse_back_to_the_request(engine: GenerationEngine, lora: Path) -> None:
    pictures = engine.generate(REQUEST, **person(lora))
    width, height = engine.image_size(REQUEST.aspect)
    for i, picture in enumerate(pictures):
        assert png_parameters.parse(parameters(picture)) == PictureSettings(
            prompt=prompts.compose_prompt(REQUEST.prompt, HANDLE, CLASS, REQUEST.style),
            negative_prompt="blurry, text", seed=REQUEST.seed + i, steps=2, guidance=6.5, scheduler="euler_a",
            width=width, height=height, model="tiny", lora_name=HANDLE, lora_hash=png_parameters.lora_hash(lora))
        assert picture.seed == REQUEST.seed + i


def test_the_settings_hold_nothing_but_the_settings(engine: GenerationEngine, lora: Path) -> None:
    text = parameters(engine.generate(REQUEST, **person(lora))[0])
    prompt, negative, line = text.split("\n")
    assert prompt == prompts.compose_prompt(REQUEST.prompt, HANDLE, CLASS, REQUEST.style)
    assert negative == "Negative prompt: blurry, text"
    keys = [pair.split(":")[0] for pair in line.split(", ")]
    assert keys == ["Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "Lora hashes"]
    for private in ("271828182845904523", KEY, str(lora.parent), "/", "\\"):
        assert private not in text


def test_pictures_of_the_base_model_name_no_lora(engine: GenerationEngine) -> None:
    picture = engine.generate(GenerateRequest(prompt="a cat", seed=3, steps=1))[0]
    settings = png_parameters.parse(parameters(picture))
    assert settings.prompt == "a cat" and settings.lora_name is None and settings.lora_hash is None
    assert settings.scheduler == "dpmpp_2m" and settings.strength is None
    # A request that names no guidance is drawn, and says so, at Stable Diffusion's 7.
    assert settings.guidance == 7.0
    assert engine.generate(GenerateRequest(prompt="a cat", seed=3, steps=1, guidance=7.0))[0].png == picture.png


def test_a_variation_says_how_far_it_moved(engine: GenerationEngine, lora: Path) -> None:
    start = engine.generate(GenerateRequest(prompt="a cat", seed=3, steps=1))[0].png
    variation = engine.generate(GenerateRequest(prompt="a cat", seed=4, steps=2), init_image=start, **person(lora))
    assert png_parameters.parse(parameters(variation[0])).strength == DEFAULT_VARIATION_STRENGTH
    stronger = engine.generate(GenerateRequest(prompt="a cat", seed=4, steps=2, strength=0.8), init_image=start)
    assert "Denoising strength: 0.8" in parameters(stronger[0])


def test_the_same_request_and_seed_give_the_same_files_byte_for_byte(engine: GenerationEngine, lora: Path,
                                                                      tmp_path: Path) -> None:
    first = engine.generate(REQUEST, **person(lora))
    # Other people's pictures in between: another LoRA merged in and out, the base model, another sampler.
    other = make_random_lora(build_random_pipeline("tiny"), tmp_path, seed=9, rank=4)
    engine.generate(REQUEST, adapter_key="someone-else", lora_path=other, handle="zqbob", class_word="man")
    engine.generate(GenerateRequest(prompt="a cat", seed=41, steps=3, scheduler="ddim"))
    again = engine.generate(REQUEST, **person(lora))
    assert [p.png for p in again] == [p.png for p in first]
    assert len({p.png for p in first}) == 2  # two seeds, two pictures


def test_a_picture_without_a_seed_is_made_again_from_the_seed_it_shows(engine: GenerationEngine, lora: Path) -> None:
    unseeded = GenerateRequest(prompt="on the moon", num_images=2, steps=2)
    first = engine.generate(unseeded, **person(lora))
    shown = png_parameters.parse(parameters(first[0])).seed
    assert shown == first[0].seed
    again = engine.generate(GenerateRequest(prompt="on the moon", num_images=2, steps=2, seed=shown), **person(lora))
    assert [p.png for p in again] == [p.png for p in first]
    # Alone, the second picture's seed draws it again; batched arithmetic may round a last bit apart.
    alone = engine.generate(GenerateRequest(prompt="on the moon", steps=2, seed=first[1].seed), **person(lora))

    def pixels(picture: Picture) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(picture.png)), dtype=np.int16)

    assert np.abs(pixels(alone[0]) - pixels(first[1])).max() <= 2


def test_a_trainings_sample_pictures_carry_their_settings(tmp_path: Path) -> None:
    from jobs.worker_config import WorkerConfig
    from trainer.worker import SAMPLE_PROMPTS, Worker

    worker = Worker(WorkerConfig("tiny", "cpu", str(tmp_path / "w"), str(tmp_path / "c")))
    config = small(steps=2, prior_preservation=False, resolution=64)
    params = TrainParams(HANDLE, CLASS, config, samples=2, sample_steps=2)
    result = worker.run(WorkItem(1, params, TrainInputs(training_photos())), events.ignore, lambda: False)
    trained = tmp_path / "trained.safetensors"
    trained.write_bytes(result.lora)
    for sample, template in zip(result.samples, SAMPLE_PROMPTS, strict=True):
        settings = png_parameters.parse(parameters(sample))
        typed = template.format(handle=HANDLE, cls=CLASS)
        assert settings.prompt == prompts.compose_prompt(typed, HANDLE, CLASS, None) and settings.steps == 2
        assert (settings.model, settings.lora_name) == ("tiny", HANDLE)
        assert settings.lora_hash == png_parameters.lora_hash(trained)
        assert str(tmp_path) not in parameters(sample)
