"""The face pass (trainer.face_pass) on the tiny SD1.5, SDXL and Flux models.

Random weights draw no faces, so the engine is given a detector that reports a fixed box; the pass
then redraws that box's padded square with the person's LoRA and pastes it back. The LoRA used is
random with large weights, so the face it redraws from a crop is far from the base model's redraw of
the same crop: the face says which weights drew it. (A LoRA touches only the UNet's and the text
encoders' linear layers, and a random VAE turns no latent change into a predictable colour, so
"which weights" is told by the whole face rather than by a hue.)
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FluxImg2ImgPipeline,
    FluxPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from bench.generate_speed import make_random_lora
from jobs import events
from jobs.requests import DEFAULT_SCHEDULER, GenerateRequest
from trainer import face_pass, merged_lora
from trainer.engine import GenerationEngine, to_pixels
from trainer.errors import Cancelled
from trainer.noise_schedulers import SchedulerCache
from trainer.pipelines import build_random_pipeline

HANDLE, CLASS = "zqjane", "woman"
PERSON = {"handle": HANDLE, "class_word": CLASS}
REQUEST = GenerateRequest(prompt="on a beach at sunset", seed=7, steps=3)
FACE = (16, 14, 12, 12)  # x, y, w, h in the tiny models' 64 px pictures
KINDS = ["tiny", "tiny-sdxl", "tiny-flux"]


pytestmark = pytest.mark.usefixtures("one_thread")


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def strong_lora(kind: str, out: Path) -> Path:
    """A random UNet LoRA whose update is large enough to change visibly what the model draws."""
    path = make_random_lora(build_random_pipeline(kind), out, seed=5, rank=4)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) * 12 for key in f.keys()}
    save_file(tensors, str(path), metadata=metadata)
    return path


class Detector:
    """Reports `boxes` for every picture, and counts the pictures it was shown."""

    def __init__(self, *boxes: face_pass.Box) -> None:
        self.boxes, self.seen = list(boxes), 0

    def __call__(self, image: Image.Image) -> list[face_pass.Box]:
        self.seen += 1
        return self.boxes


@dataclass(frozen=True)
class Model:
    kind: str
    lora: Path


@pytest.fixture(scope="module", params=KINDS)
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Model:
    return Model(request.param, strong_lora(request.param, tmp_path_factory.mktemp(request.param)))


def engine_for(model: Model, detector: Detector) -> GenerationEngine:
    return GenerationEngine(build_random_pipeline(model.kind), face_detector=detector)


def draw(engine: GenerationEngine, model: Model | None, request: GenerateRequest = REQUEST, **kwargs) -> list[bytes]:
    person = {"adapter_key": "p", "lora_path": model.lora} if model is not None else {}
    return [p.png for p in engine.generate(request, **person, **PERSON, **kwargs)]


def face_mask(size: tuple[int, int], box: face_pass.Box = FACE) -> np.ndarray:
    """The feathered mask the pass pastes through, over the whole picture."""
    left, top, side = face_pass.crop_around(box, size)
    mask = np.zeros(size[::-1], np.float32)
    mask[top:top + side, left:left + side] = face_pass.feathered_mask(side)
    return mask


def img2img(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """An img2img pipeline over `pipe`'s modules, with the request's scheduler (Flux: its own)."""
    if isinstance(pipe, FluxPipeline):
        flux = FluxImg2ImgPipeline(**pipe.components)
        flux.set_progress_bar_config(disable=True)
        return flux
    if isinstance(pipe, StableDiffusionXLPipeline):
        image = StableDiffusionXLImg2ImgPipeline(**pipe.components, add_watermarker=False)
    else:
        image = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    image.set_progress_bar_config(disable=True)
    image.scheduler = SchedulerCache(pipe.scheduler.config).get(DEFAULT_SCHEDULER)
    return image


def off(request: GenerateRequest = REQUEST) -> GenerateRequest:
    return replace(request, face_pass=False)


# ---- the pass in the engine ----------------------------------------------------------------------------
def test_the_pass_changes_only_the_face_region(model: Model) -> None:
    engine = engine_for(model, Detector(FACE))
    with_pass = pixels(draw(engine, model)[0])
    plain = pixels(draw(engine, model, off())[0])
    mask = face_mask(with_pass.shape[1::-1])
    changed = np.abs(with_pass - plain).max(axis=-1) > 0
    assert not changed[mask == 0].any()  # outside the feathered mask: the picture's own bytes
    assert changed[mask == 1].mean() > 0.9
    assert np.abs(with_pass - plain)[mask == 1].mean() > 5


def test_the_pass_runs_with_the_persons_lora(model: Model) -> None:
    """The engine's face is the one the LoRA's weights draw from the crop, and the base model's
    weights draw a clearly other one."""
    engine = engine_for(model, Detector(FACE))
    with_pass = draw(engine, model)[0]
    plain = pixels(draw(engine, model, off())[0])
    pipe = build_random_pipeline(model.kind)
    image = img2img(pipe)
    prompt = face_pass.face_prompt(f"{HANDLE} {CLASS}", REQUEST.prompt, lambda text: True)
    how = face_pass.Redraw(prompt, None, REQUEST.steps, engine.guidance_for(REQUEST), engine.base_resolution,
                           size=engine.img2img_size((engine.base_resolution,) * 2))
    crops = face_pass.crops_for(plain.astype(np.uint8)[None], [REQUEST.seed or 0], engine.base_resolution,
                                Detector(FACE))
    denoiser = engine.family.denoiser_name
    lora = merged_lora.read_lora(model.lora, {denoiser: getattr(pipe, denoiser)})
    with torch.no_grad(), merged_lora.merged(lora):
        by_lora = face_pass.redraw(image, plain.astype(np.uint8)[None], crops, how, to_pixels)[0]
    with torch.no_grad():
        by_base = face_pass.redraw(image, plain.astype(np.uint8)[None], crops, how, to_pixels)[0]
    assert np.abs(pixels(with_pass) - by_lora).max() <= 1
    face = face_mask(plain.shape[1::-1]) == 1
    assert np.abs(by_lora - by_base)[face].mean() > 5


@pytest.mark.parametrize("who", ["base model", "face_pass off"])
def test_no_pass_without_a_persons_model_or_when_turned_off(model: Model, who: str) -> None:
    detector = Detector(FACE)
    engine = engine_for(model, detector)
    if who == "base model":
        pictures, plain = draw(engine, None), draw(engine, None, off())
    else:  # against a picture in which no face was found
        pictures, plain = draw(engine, model, off()), draw(engine_for(model, Detector()), model)
    assert pictures == plain
    assert detector.seen == 0


def test_a_seed_gives_the_same_bytes_and_each_face_its_own_noise(model: Model) -> None:
    """Two pictures, two faces each (a third, smaller one and a too-large one skipped): four crops
    in one batch; drawn again, byte for byte the same."""
    big = round(face_pass.MAX_FACE_FRACTION * 64) + 2
    detector = Detector((0, 0, big, big), (36, 30, 14, 14), FACE, (4, 40, 10, 10))
    request = replace(REQUEST, num_images=2)
    first, again = draw(engine_for(model, detector), model, request), draw(engine_for(model, detector), model, request)
    assert first == again
    plain = draw(engine_for(model, Detector()), model, request)
    size = pixels(first[0]).shape[1::-1]
    for made, before in zip(first, plain, strict=True):
        changed = np.abs(pixels(made) - pixels(before)).max(axis=-1) > 0
        kept = face_mask(size, (36, 30, 14, 14)) + face_mask(size, FACE)
        assert not changed[kept == 0].any()  # neither the skipped faces nor anything else moved
        assert changed[face_mask(size, (36, 30, 14, 14)) == 1].any() and changed[face_mask(size) == 1].any()
    # Same box, other seed: another redraw.
    assert np.abs(pixels(first[0]) - pixels(first[1]))[face_mask(size) == 1].mean() > 1


def test_the_pass_reports_its_stage_and_can_be_cancelled(model: Model) -> None:
    seen: list[events.Event] = []
    engine = engine_for(model, Detector(FACE))
    [before] = draw(engine, model, on_event=seen.append)
    stages = [e.stage for e in seen if isinstance(e, events.Progress)]
    # Then the redraw's steps (SD's img2img runs int(3 * 0.4) = 1, Flux's rounds 1.2 up to 2).
    assert stages[:REQUEST.steps] == ["generating"] * REQUEST.steps
    assert stages[REQUEST.steps:] == ["refining_face"] * (2 if model.kind == "tiny-flux" else 1)
    refining = [e for e in seen if isinstance(e, events.Progress) and e.stage == "refining_face"]
    assert refining[-1].step == refining[-1].total

    def refining_now() -> bool:
        return isinstance(seen[-1], events.Progress) and seen[-1].stage == "refining_face"

    seen.clear()
    with pytest.raises(Cancelled):
        draw(engine, model, on_event=seen.append, should_cancel=lambda: bool(seen) and refining_now())
    assert draw(engine, model) == [before]  # the engine carries on, the LoRA unmerged exactly


# ---- the parts ------------------------------------------------------------------------------------------
def test_the_mask_is_one_at_the_centre_and_exactly_zero_at_the_edge() -> None:
    for side in (9, 28, 115, 400):
        mask = face_pass.feathered_mask(side)
        assert mask.shape == (side, side) and mask[side // 2, side // 2] == pytest.approx(1)
        edge = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
        assert (edge == 0).all() and mask.max() <= 1 and mask.min() >= 0


def test_a_crop_is_padded_square_and_slides_inside_the_picture() -> None:
    assert face_pass.crop_around((40, 40, 20, 20), (200, 100)) == (32, 32, 36)
    assert face_pass.crop_around((0, 0, 20, 10), (200, 100)) == (0, 0, 36)  # slid, not cut
    assert face_pass.crop_around((150, 10, 80, 80), (200, 100)) == (100, 0, 100)  # at most the short side


def test_the_face_prompt_names_the_person_first_and_drops_the_scene_when_too_long() -> None:
    assert face_pass.face_prompt("zqjane woman", "on a beach", lambda text: True) == (
        "a close-up of the face of zqjane woman, on a beach")
    assert face_pass.face_prompt("zqjane woman", "on a beach", lambda text: len(text) < 40) == (
        "a close-up of the face of zqjane woman")


def test_the_default_detector_finds_the_small_faces_the_pass_is_for() -> None:
    """A face 20 px wide in a 512 px picture (a full-length figure's) is below what the intake looks
    for in selfies, and found here; a picture without a face gives nothing to redraw."""
    from photos import faces
    from tests.photos_factory import colour_fields, portrait

    small = portrait((512, 512), ((0.3, 0.4, 0.04),))
    assert faces.detect_faces(small, small.size) == []
    [(x, y, w, h)] = face_pass.detect_faces(small)
    assert abs(x + w / 2 - 154) < 8 and abs(y + h / 2 - 205) < 8
    assert face_pass.detect_faces(colour_fields(1)[0]) == []


def test_without_a_cascade_the_pass_finds_nothing_and_the_picture_is_still_made(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An OpenCV without Haar cascades (5.x, against requirements.txt) costs the face pass, not the picture."""
    from photos import faces
    from tests.photos_factory import portrait

    def no_cascade() -> None:
        raise RuntimeError("This OpenCV build has no Haar cascades")

    monkeypatch.setattr(faces, "_cascade", no_cascade)
    face_pass._warn_no_detector.cache_clear()
    small = portrait((512, 512), ((0.3, 0.4, 0.04),))
    with caplog.at_level("WARNING", logger="trainer.face_pass"):
        assert face_pass.detect_faces(small) == [] and face_pass.detect_faces(small) == []
    assert [r.getMessage() for r in caplog.records] == ["face pass off: This OpenCV build has no Haar cascades"]
