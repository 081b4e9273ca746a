"""Upscaling on the tiny model: twice the size, reproducible from the picture's seed, drawn with the
person's LoRA, close to the picture it enlarges, and the VAE tiled only for the upscale."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.generate_speed import make_random_lora
from jobs import events, png_parameters
from jobs.payloads import Picture
from jobs.requests import GenerateRequest
from trainer.engine import GenerationEngine
from trainer.errors import Cancelled, TrainerError
from trainer.pipelines import build_random_pipeline
from trainer.upscale import DEFAULT_UPSCALE_STRENGTH, upscaled_size

REQUEST = GenerateRequest(prompt="a portrait in the garden", seed=5, steps=10)
PERSON = {"handle": "zqjane", "class_word": "woman"}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine() -> GenerationEngine:
    return GenerationEngine(build_random_pipeline("tiny"))


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_lora(build_random_pipeline("tiny"), tmp_path_factory.mktemp("lora"), seed=1, rank=4)


@pytest.fixture(scope="module")
def square(engine: GenerationEngine) -> Picture:
    return engine.generate(REQUEST, **PERSON)[0]


def test_an_upscale_has_twice_the_width_and_height(engine: GenerationEngine, square: Picture) -> None:
    [big] = engine.upscale(REQUEST, square.png, **PERSON)
    assert size_of(square.png) == (64, 64) and size_of(big.png) == (128, 128)
    assert big.seed == REQUEST.seed
    [portrait] = engine.generate(GenerateRequest(prompt="x", seed=1, steps=2, aspect="portrait"))
    [tall] = engine.upscale(GenerateRequest(prompt="x", seed=1, steps=4), portrait.png)
    assert size_of(portrait.png) == (64, 96) and size_of(tall.png) == (128, 192)


@pytest.mark.parametrize("steps", [1, 2])
def test_a_few_step_picture_still_upscales_and_varies(engine: GenerationEngine, square: Picture, steps: int) -> None:
    """At strength 0.3 a 1- or 2-step schedule would run no step at all (diffusers runs int(steps *
    strength)), which fails inside the pipeline: the schedule is lengthened to run one."""
    few = replace(REQUEST, steps=steps)
    [big] = engine.upscale(few, square.png, **PERSON)
    assert size_of(big.png) == (2 * size_of(square.png)[0], 2 * size_of(square.png)[1])
    [variation] = engine.generate(replace(few, strength=0.3), init_image=square.png, **PERSON)
    assert size_of(variation.png) == size_of(square.png) and variation.png != square.png


def test_an_upscale_carries_the_settings_that_made_it(engine: GenerationEngine, square: Picture, lora: Path) -> None:
    """Its PNG names the img2img pass: twice the size, the upscale's strength, the picture's seed."""
    [big] = engine.upscale(REQUEST, square.png, adapter_key="them", lora_path=lora, **PERSON)
    settings = png_parameters.parse(Image.open(io.BytesIO(big.png)).info[png_parameters.KEY])
    assert (settings.width, settings.height, settings.seed) == (128, 128, REQUEST.seed)
    assert settings.strength == DEFAULT_UPSCALE_STRENGTH and settings.lora_hash is not None
    assert "zqjane woman" in settings.prompt


def test_sizes_double_and_stay_multiples_of_what_the_unet_takes() -> None:
    assert upscaled_size((512, 768), 64) == (1024, 1536)
    assert upscaled_size((1024, 1024), 128) == (2048, 2048)
    assert upscaled_size((104, 60), 16) == (208, 128)  # a picture from elsewhere: rounded to the multiple


def test_the_same_seed_upscales_to_the_same_picture(engine: GenerationEngine, square: Picture) -> None:
    first, again = (engine.upscale(REQUEST, square.png, **PERSON)[0] for _ in range(2))
    assert first.png == again.png
    [other] = engine.upscale(GenerateRequest(prompt=REQUEST.prompt, seed=6, steps=10), square.png, **PERSON)
    assert np.abs(pixels(other.png) - pixels(first.png)).mean() > 0.5


def test_the_upscale_is_drawn_with_the_persons_lora(engine: GenerationEngine, square: Picture, lora: Path) -> None:
    [plain] = engine.upscale(REQUEST, square.png, **PERSON)
    [theirs] = engine.upscale(REQUEST, square.png, adapter_key="jane", lora_path=lora, **PERSON)
    assert np.abs(pixels(theirs.png) - pixels(plain.png)).mean() > 0.5
    [base_again] = engine.upscale(REQUEST, square.png, **PERSON)
    assert base_again.png == plain.png  # the LoRA was taken out again


def test_the_upscale_starts_from_its_picture(engine: GenerationEngine, square: Picture) -> None:
    """Another picture, same seed and prompt: another upscale (the random tiny VAE reconstructs
    nothing, so closeness to the picture is for the GPU figures, not this model)."""
    [first] = engine.upscale(REQUEST, square.png, **PERSON)
    [other_picture] = engine.generate(GenerateRequest(prompt=REQUEST.prompt, seed=9, steps=10), **PERSON)
    [second] = engine.upscale(REQUEST, other_picture.png, **PERSON)
    assert np.abs(pixels(second.png) - pixels(first.png)).mean() > 0.5


def test_the_vae_is_tiled_for_the_upscale_only(engine: GenerationEngine, square: Picture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    vae = engine._text.vae
    tiled: list[tuple[int, ...]] = []
    decode = vae.tiled_decode

    def counting(z: torch.Tensor, *args, **kwargs):
        tiled.append(tuple(z.shape))
        return decode(z, *args, **kwargs)

    monkeypatch.setattr(vae, "tiled_decode", counting)
    engine.upscale(REQUEST, square.png, **PERSON)
    assert tiled and tiled[0][-2:] == (16, 16)  # the 128 px picture's latent, above the tiny VAE's 64 px
    assert not vae.use_tiling
    tiled.clear()
    engine.generate(REQUEST, **PERSON)
    assert tiled == []


def test_progress_cancel_and_a_broken_picture(engine: GenerationEngine, square: Picture) -> None:
    seen: list[events.Progress] = []
    engine.upscale(REQUEST, square.png, on_event=seen.append, **PERSON)
    assert [(e.step, e.total, e.stage) for e in seen] == [(1, 3, "upscaling"), (2, 3, "upscaling"),
                                                           (3, 3, "upscaling")]  # 10 steps x 0.3
    with pytest.raises(Cancelled):
        engine.upscale(REQUEST, square.png, should_cancel=lambda: bool(seen), on_event=seen.append)
    with pytest.raises(TrainerError) as caught:
        engine.upscale(REQUEST, b"not a picture")
    assert caught.value.code == "bad_image"


def test_a_worker_runs_an_upscale_job_from_the_picture_that_came_with_it(tmp_path: Path, square: Picture) -> None:
    from jobs.payloads import GenerateInputs, GenerateParams, VariationOf, WorkItem
    from trainer.worker import Worker, WorkerConfig

    worker = Worker(WorkerConfig("tiny", "cpu", str(tmp_path / "work"), str(tmp_path / "class")))
    params = GenerateParams(REQUEST, upscale_of=VariationOf(1, 0), handle="zqjane", class_word="woman")
    seen: list[events.Event] = []
    output = worker.run(WorkItem(2, params, GenerateInputs(init_image=square.png)), seen.append, lambda: False)
    [picture] = output.images
    assert size_of(picture.png) == (128, 128) and picture.seed == REQUEST.seed
    assert events.Stage("upscaling") in seen
    with pytest.raises(TrainerError) as caught:
        worker.run(WorkItem(3, params, GenerateInputs()), seen.append, lambda: False)
    assert caught.value.code == "bad_image"


def test_the_upscale_benchmark_runs_on_the_tiny_model(tmp_path: Path) -> None:
    from bench import upscale_cost

    out = tmp_path / "upscale.json"
    results = upscale_cost.main(["--model", "tiny", "--device", "cpu", "--steps", "4", "--repeats", "1",
                                 "--json", str(out)])
    assert results["picture"]["size"] == [64, 64] and results["upscale"]["size"] == [128, 128]
    assert results["upscale_over_picture"] > 0 and results["upscale"]["png_bytes"] > 0
    assert json.loads(out.read_text()) == results
