"""Generation on the tiny model: LoRA adapters swapped in and out, seeds, prompts, shapes, progress, cancel.

LoRAs are trained once per module (a few high-learning-rate steps, so they visibly change the picture);
reference pictures are made once, each by a fresh engine that only ever saw one LoRA.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import generate_speed
from jobs.payloads import Picture
from jobs.requests import DEFAULT_SCHEDULER, SCHEDULER_NAMES, GenerateRequest
from tests.photos_factory import training_photos
from tests.trainer.test_dreambooth import CLASS, HANDLE, small
from trainer import prompts
from trainer.dreambooth import train
from trainer.engine import GenerationEngine, image_size
from trainer.errors import Cancelled, PromptTooLong, TrainerError
from trainer.noise_schedulers import SchedulerCache
from trainer.pipelines import build_random_pipeline

PROMPT = "riding a horse on the beach"
REQUEST = GenerateRequest(prompt=PROMPT, seed=7, steps=2)
PERSON = {"handle": HANDLE, "class_word": CLASS}


def pixels(image: Picture | bytes) -> np.ndarray:
    data = image.png if isinstance(image, Picture) else image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def size_of(image: Picture) -> tuple[int, int]:
    return Image.open(io.BytesIO(image.png)).size


def make_engine(max_loaded_adapters: int = 8) -> GenerationEngine:
    return GenerationEngine(build_random_pipeline("tiny"), max_loaded_adapters=max_loaded_adapters)


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Loras:
    a: Path  # UNet and text encoder
    b: Path  # UNet only
    c: Path  # UNet only, another seed
    sdxl: Path  # made for another base model


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> Loras:
    root = tmp_path_factory.mktemp("loras")

    def trained(tag: str, seed: int, text_encoder: bool) -> Path:
        config = small(steps=10, learning_rate=1e-2, rank=4, alpha=8, train_text_encoder=text_encoder,
                       prior_preservation=False, seed=seed)
        return train(training_photos(), HANDLE, CLASS, config, pipeline=build_random_pipeline("tiny"),
                     base_model="tiny", out_dir=root / tag / "out", work_dir=root / tag / "work",
                     class_cache_dir=root / "cache", device="cpu").lora_path

    sdxl = generate_speed.make_random_lora(build_random_pipeline("tiny-sdxl"), root / "sdxl", seed=3, rank=4)
    return Loras(a=trained("a", 0, True), b=trained("b", 1, False), c=trained("c", 2, False), sdxl=sdxl)


@dataclass(frozen=True)
class References:
    base: Picture
    a: Picture
    b: Picture


@pytest.fixture(scope="module")
def refs(loras: Loras) -> References:
    """REQUEST made by engines that each only ever held one LoRA (or none)."""
    return References(
        base=make_engine().generate(REQUEST, **PERSON)[0],
        a=make_engine().generate(REQUEST, adapter_key="a", lora_path=loras.a, **PERSON)[0],
        b=make_engine().generate(REQUEST, adapter_key="b", lora_path=loras.b, **PERSON)[0],
    )


# ---- LoRA and seeds -------------------------------------------------------------------------------------
def test_a_trained_lora_changes_the_picture(refs: References) -> None:
    assert refs.base.seed == refs.a.seed == refs.b.seed == 7
    assert np.abs(pixels(refs.a) - pixels(refs.base)).mean() > 2.0
    assert np.abs(pixels(refs.b) - pixels(refs.base)).mean() > 2.0
    assert np.abs(pixels(refs.a) - pixels(refs.b)).mean() > 2.0


def test_the_same_seed_gives_the_same_picture(loras: Loras, refs: References) -> None:
    engine = make_engine()
    first = engine.generate(REQUEST, adapter_key="a", lora_path=loras.a, **PERSON)[0]
    again = engine.generate(REQUEST, adapter_key="a", **PERSON)[0]
    assert first.png == again.png == refs.a.png
    other_seed = engine.generate(GenerateRequest(prompt=PROMPT, seed=8, steps=2), adapter_key="a", **PERSON)[0]
    assert np.abs(pixels(other_seed) - pixels(first)).mean() > 1.0


def test_image_i_of_a_request_uses_seed_plus_i(refs: References) -> None:
    engine = make_engine()
    pair = engine.generate(GenerateRequest(prompt=PROMPT, seed=7, steps=2, num_images=2), **PERSON)
    assert [im.seed for im in pair] == [7, 8]
    alone = engine.generate(GenerateRequest(prompt=PROMPT, seed=8, steps=2), **PERSON)
    assert [im.seed for im in alone] == [8]
    # Batched and single runs may differ in the last bit of a float; pictures agree to one level.
    assert np.abs(pixels(pair[1]) - pixels(alone[0])).max() <= 1
    assert np.abs(pixels(pair[0]) - pixels(refs.base)).max() <= 1
    assert np.abs(pixels(pair[0]) - pixels(pair[1])).mean() > 1.0


def test_without_a_seed_one_is_drawn_and_returned(refs: References) -> None:
    engine = make_engine()
    drawn = engine.generate(GenerateRequest(prompt=PROMPT, steps=2), **PERSON)[0]
    assert isinstance(drawn.seed, int) and drawn.seed >= 0
    again = engine.generate(GenerateRequest(prompt=PROMPT, steps=2, seed=drawn.seed), **PERSON)[0]
    assert again.png == drawn.png


# ---- adapters ------------------------------------------------------------------------------------------
def test_switching_people_gives_each_their_own_picture_without_reloading(
        loras: Loras, refs: References, tmp_path: Path) -> None:
    engine = make_engine()
    a1 = engine.generate(REQUEST, adapter_key="a", lora_path=loras.a, **PERSON)[0]
    b = engine.generate(REQUEST, adapter_key="b", lora_path=loras.b, **PERSON)[0]
    assert engine.loaded_adapters == ["a", "b"]
    # Resident: no file is needed, and one that would not load is not even read.
    a2 = engine.generate(REQUEST, adapter_key="a", **PERSON)[0]
    a3 = engine.generate(REQUEST, adapter_key="a", lora_path=tmp_path / "does-not-exist.safetensors",
                         **PERSON)[0]
    assert engine.loaded_adapters == ["b", "a"]  # least recently used first
    assert a1.png == a2.png == a3.png == refs.a.png
    assert b.png == refs.b.png  # A's adapter (text encoder included) does not leak into B's picture
    assert a1.png != b.png
    b2 = engine.generate(REQUEST, adapter_key="b", **PERSON)[0]
    assert b2.png == refs.b.png  # nor B's UNet adapter into A's, in either order


def test_no_adapter_after_a_lora_gives_the_base_picture(loras: Loras, refs: References) -> None:
    engine = make_engine()
    engine.generate(REQUEST, adapter_key="a", lora_path=loras.a, **PERSON)
    assert engine.generate(REQUEST, **PERSON)[0].png == refs.base.png
    assert engine.loaded_adapters == ["a"]  # switched off, still resident
    assert engine.generate(REQUEST, adapter_key="a", **PERSON)[0].png == refs.a.png
    engine.evict("a")
    assert engine.generate(REQUEST, **PERSON)[0].png == refs.base.png


def test_the_least_recently_used_adapter_is_evicted(loras: Loras, refs: References) -> None:
    engine = make_engine(max_loaded_adapters=2)
    engine.generate(REQUEST, adapter_key="a", lora_path=loras.a, **PERSON)
    engine.generate(REQUEST, adapter_key="b", lora_path=loras.b, **PERSON)
    engine.generate(REQUEST, adapter_key="a", **PERSON)  # A is now the most recently used
    engine.generate(REQUEST, adapter_key="c", lora_path=loras.c, **PERSON)
    assert engine.loaded_adapters == ["a", "c"]
    with pytest.raises(TrainerError) as missing:
        engine.generate(REQUEST, adapter_key="b", **PERSON)
    assert missing.value.code == "missing_lora"
    # Given the file again, B comes back (and A, now the oldest, makes room).
    assert engine.generate(REQUEST, adapter_key="b", lora_path=loras.b, **PERSON)[0].png == refs.b.png
    assert engine.loaded_adapters == ["c", "b"]

    engine.evict("c")
    engine.evict("never-loaded")  # ignored
    assert engine.loaded_adapters == ["b"]
    with pytest.raises(TrainerError, match="not loaded") as evicted:
        engine.generate(REQUEST, adapter_key="c", **PERSON)
    assert evicted.value.code == "missing_lora"


def test_a_missing_adapter_without_a_file_is_refused() -> None:
    engine = make_engine()
    with pytest.raises(TrainerError) as caught:
        engine.generate(REQUEST, adapter_key="nobody", **PERSON)
    assert caught.value.code == "missing_lora" and "try again" in caught.value.message
    assert engine.loaded_adapters == []


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other model"])
def test_a_damaged_lora_is_refused_and_the_engine_keeps_working(
        loras: Loras, refs: References, tmp_path: Path, damage: str) -> None:
    if damage == "garbage":
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"this is not a safetensors file" * 10)
    elif damage == "truncated":
        bad = tmp_path / "bad.safetensors"
        data = loras.a.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad = loras.sdxl
    engine = make_engine(max_loaded_adapters=2)
    engine.generate(REQUEST, adapter_key="a", lora_path=loras.a, **PERSON)
    engine.generate(REQUEST, adapter_key="b", lora_path=loras.b, **PERSON)
    seen: list[dict] = []
    with pytest.raises(TrainerError) as caught:
        engine.generate(REQUEST, adapter_key="bad", lora_path=bad, on_event=seen.append, **PERSON)
    assert caught.value.code == "bad_lora" and "training it again" in caught.value.message
    assert seen == []
    # Nothing of the bad file is left, and no resident adapter was given up for it.
    assert engine.loaded_adapters == ["a", "b"]
    assert engine.generate(REQUEST, adapter_key="a", **PERSON)[0].png == refs.a.png
    assert engine.generate(REQUEST, adapter_key="b", **PERSON)[0].png == refs.b.png
    assert engine.generate(REQUEST, **PERSON)[0].png == refs.base.png


# ---- prompts ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("typed", "style", "expected"), [
    ("on a horse", None, "a photo of sks woman, on a horse"),
    ("  on   a horse ", None, "a photo of sks woman, on a horse"),
    ("", None, "a photo of sks woman"),
    ("sksy on a horse", None, "a photo of sks woman, sksy on a horse"),  # part of a word is not the handle
    ("sks on a horse", None, "sks woman on a horse"),
    ("riding with SKS, smiling", None, "riding with SKS woman, smiling"),
    ("sks woman on a horse", None, "sks woman on a horse"),
    ("sks Woman on a horse", None, "sks Woman on a horse"),
    ("sks's dog on a horse", None, "sks's dog on a horse"),
    ("sks’s dog", None, "sks’s dog"),
    ("on the moon", "anime", "an anime drawing of sks woman, on the moon"),
    ("sks on the moon", "anime", "sks woman on the moon"),
])
def test_the_person_is_named_as_they_were_trained(typed: str, style: str | None, expected: str) -> None:
    assert prompts.name_person(typed, HANDLE, CLASS, style) == expected


def test_style_words_are_appended_and_additions_are_named() -> None:
    words = prompts.STYLES["oil painting"].words
    assert prompts.compose_prompt("on a horse", HANDLE, CLASS, "oil painting") == (
        f"an oil painting of sks woman, on a horse, {words}")
    assert prompts.compose_prompt("a castle", None, None, "anime") == f"a castle, {prompts.STYLES['anime'].words}"
    assert prompts.compose_prompt("", None, None, "anime") == prompts.STYLES["anime"].words
    assert prompts.compose_prompt(" a   castle ", None, None, None) == "a castle"
    assert prompts.additions("on a horse", HANDLE, CLASS, "anime") == "your handle and the anime style"
    assert prompts.additions("sks woman on a horse", HANDLE, CLASS, None) == ""
    assert prompts.additions("a castle", None, None, "pixar") == "the pixar style"


def test_the_engine_draws_what_the_composed_prompt_says() -> None:
    engine = make_engine()
    request = GenerateRequest(prompt="on a horse", seed=3, steps=2, style="watercolor")
    composed = prompts.compose_prompt("on a horse", HANDLE, CLASS, "watercolor")
    assert engine.prepare_prompt(request, HANDLE, CLASS) == (composed, "")
    named = engine.generate(request, **PERSON)[0]
    typed = engine.generate(GenerateRequest(prompt=composed, seed=3, steps=2))[0]
    plain = engine.generate(GenerateRequest(prompt="on a horse", seed=3, steps=2))[0]
    assert named.png == typed.png != plain.png


def _prompt_of(tokens: int, tokenizer) -> str:
    """Words that come to exactly `tokens` tokens, start and end markers included."""
    text = " ".join(["horse"] * (tokens - 2))
    assert prompts.count_tokens(tokenizer, text) == tokens
    return text


def test_a_prompt_up_to_the_limit_is_accepted_and_one_token_more_refused() -> None:
    engine = make_engine()
    tokenizer = engine.tokenizers[0]
    engine.check_prompt(_prompt_of(77, tokenizer))
    with pytest.raises(PromptTooLong, match=r"comes to 78 tokens.* at most 77 .*by at least 1 tokens"):
        engine.check_prompt(_prompt_of(78, tokenizer))


def test_a_too_long_prompt_is_refused_before_any_work(loras: Loras) -> None:
    engine = make_engine()
    unet_calls: list[int] = []
    engine._text.unet.register_forward_hook(lambda *_: unet_calls.append(1))
    seen: list[dict] = []
    long = " ".join(["horse"] * 100)
    expected = prompts.count_tokens(engine.tokenizers[0], prompts.compose_prompt(long, HANDLE, CLASS, None))
    with pytest.raises(PromptTooLong) as caught:
        engine.generate(GenerateRequest(prompt=long, seed=1, steps=2), adapter_key="a", lora_path=loras.a,
                        on_event=seen.append, **PERSON)
    message = caught.value.message
    assert caught.value.code == "prompt_too_long"
    assert f"comes to {expected} tokens" in message and "at most 77" in message
    assert message.startswith("Your prompt is too long")
    assert seen == [] and unet_calls == [] and engine.loaded_adapters == []


def test_a_prompt_made_too_long_by_the_handle_says_so() -> None:
    engine = make_engine()
    fits = _prompt_of(77, engine.tokenizers[0])
    engine.generate(GenerateRequest(prompt=fits, seed=1, steps=1))
    with pytest.raises(PromptTooLong, match="once your handle is added"):
        engine.generate(GenerateRequest(prompt=fits, seed=1, steps=1), **PERSON)
    with pytest.raises(PromptTooLong, match="once your handle and the anime style is added"):
        engine.generate(GenerateRequest(prompt=fits, seed=1, steps=1, style="anime"), **PERSON)


def test_a_too_long_negative_prompt_is_refused() -> None:
    engine = make_engine()
    seen: list[dict] = []
    with pytest.raises(PromptTooLong, match=r"^Your negative prompt is too long: it comes to 102 tokens"):
        engine.generate(GenerateRequest(prompt="a castle", negative_prompt=" ".join(["blurry"] * 100), seed=1,
                                        steps=2), on_event=seen.append)
    assert seen == []


# ---- sizes -------------------------------------------------------------------------------------------------
def test_aspect_sizes_follow_the_base_resolution() -> None:
    assert image_size("square", 512, 64) == (512, 512)
    assert image_size("portrait", 512, 64) == (512, 768)
    assert image_size("landscape", 512, 64) == (768, 512)
    assert image_size("portrait", 768, 64) == (640, 960)  # above 512: about the base's pixel count
    for aspect in ("portrait", "landscape"):
        width, height = image_size(aspect, 1536, 32)
        assert width % 32 == 0 and height % 32 == 0
        assert abs(width * height / 1536**2 - 1) < 0.05
        assert abs(max(width, height) / min(width, height) - 1.5) < 0.05
        assert (width > height) == (aspect == "landscape")


def test_sdxl_draws_other_shapes_at_its_trained_buckets() -> None:
    assert image_size("square", 1024, 32) == (1024, 1024)
    assert image_size("portrait", 1024, 32) == (832, 1216)
    assert image_size("landscape", 1024, 32) == (1216, 832)
    # The full-size SDXL architecture (weights on the meta device: shapes only) has a 1024 px base.
    engine = GenerationEngine(build_random_pipeline("sdxl-random", device="meta"))
    assert engine.base_resolution == 1024 and engine.image_size("portrait") == (832, 1216)


@pytest.mark.parametrize(("aspect", "size"), [("square", (64, 64)), ("portrait", (64, 96)),
                                              ("landscape", (96, 64))])
def test_pictures_have_the_size_of_their_aspect(aspect: str, size: tuple[int, int]) -> None:
    engine = make_engine()
    assert engine.base_resolution == 64 and engine.image_size(aspect) == size
    images = engine.generate(GenerateRequest(prompt="a castle", seed=1, steps=1, num_images=2, aspect=aspect))
    assert [size_of(im) for im in images] == [size, size]


# ---- progress and cancelling -------------------------------------------------------------------------------
def test_one_progress_event_per_step() -> None:
    engine = make_engine()
    seen: list[dict] = []
    engine.generate(GenerateRequest(prompt="a castle", seed=1, steps=3), on_event=seen.append)
    assert [(e.type, e.stage, e.step, e.total) for e in seen] == [
        ("progress", "generating", 1, 3), ("progress", "generating", 2, 3), ("progress", "generating", 3, 3)]
    assert all(e.eta_s >= 0 for e in seen) and seen[-1].eta_s == 0


def test_cancelling_stops_between_steps_and_the_engine_carries_on(loras: Loras, refs: References) -> None:
    engine = make_engine()
    seen: list[dict] = []
    with pytest.raises(Cancelled):
        engine.generate(GenerateRequest(prompt=PROMPT, seed=1, steps=6), adapter_key="a", lora_path=loras.a,
                        on_event=seen.append, should_cancel=lambda: len(seen) >= 2, **PERSON)
    assert [e.step for e in seen] == [1, 2]
    assert engine.generate(REQUEST, adapter_key="a", **PERSON)[0].png == refs.a.png

    seen.clear()
    with pytest.raises(Cancelled):
        engine.generate(REQUEST, on_event=seen.append, should_cancel=lambda: True)
    assert seen == []


# ---- variations and schedulers ------------------------------------------------------------------------------
def test_a_variation_starts_from_its_picture_and_has_the_requested_size(refs: References) -> None:
    engine = make_engine()
    seen: list[dict] = []
    weak, strong = (engine.generate(GenerateRequest(prompt=PROMPT, seed=2, steps=4, strength=s),
                                    init_image=refs.base.png, on_event=seen.append, **PERSON)[0]
                    for s in (0.25, 1.0))
    assert [e.total for e in seen] == [1, 4, 4, 4, 4]  # steps x strength denoising steps
    assert size_of(weak) == size_of(strong) == (64, 64)
    for image in (weak, strong):
        assert np.abs(pixels(image) - pixels(refs.base)).mean() > 2.0
    assert weak.png != strong.png
    # The starting picture matters: another one, same seed and settings, gives another variation.
    other = engine.generate(GenerateRequest(prompt=PROMPT, seed=2, steps=4, strength=0.25),
                            init_image=refs.a.png, **PERSON)[0]
    assert np.abs(pixels(other) - pixels(weak)).mean() > 2.0

    portrait = engine.generate(GenerateRequest(prompt=PROMPT, seed=2, steps=2, aspect="portrait", strength=0.5),
                               init_image=refs.base.png, **PERSON)
    assert size_of(portrait[0]) == (64, 96)
    with pytest.raises(TrainerError) as caught:
        engine.generate(REQUEST, init_image=b"not a picture")
    assert caught.value.code == "bad_image"


def test_every_scheduler_runs_and_the_callers_pipeline_keeps_its_own() -> None:
    pipe = build_random_pipeline("tiny")
    own = pipe.scheduler
    engine = GenerationEngine(pipe)
    pictures = {}
    for name in SCHEDULER_NAMES:
        seen: list[dict] = []
        image = engine.generate(GenerateRequest(prompt="a castle", seed=1, steps=2, scheduler=name),
                                on_event=seen.append)[0]
        assert size_of(image) == (64, 64) and [e.step for e in seen] == [1, 2], name
        pictures[name] = image.png
    assert len(set(pictures.values())) == len(SCHEDULER_NAMES)  # each really samples differently
    assert pipe.scheduler is own
    assert engine.generate(GenerateRequest(prompt="a castle", seed=1, steps=2))[0].png == pictures[DEFAULT_SCHEDULER]


def test_schedulers_inherit_the_models_noise_schedule() -> None:
    config = build_random_pipeline("tiny").scheduler.config
    cache = SchedulerCache(config)
    for name in SCHEDULER_NAMES:
        made = cache.get(name)
        assert made is cache.get(name)
        assert made.config.beta_schedule == "scaled_linear" and made.config.beta_end == config.beta_end
    assert cache.get("dpmpp_2m").config.use_karras_sigmas
    with pytest.raises(ValueError, match="unknown scheduler"):
        cache.get("plms")


# ---- benchmark smoke test ---------------------------------------------------------------------------------
# The SDXL baseline is a plain StableDiffusionXLPipeline, the Flux one a plain FluxPipeline.
@pytest.mark.parametrize("kind", ["tiny", "tiny-sdxl", "tiny-flux"])
def test_the_generation_benchmark_runs_on_the_tiny_model(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "generate.json"
    result = generate_speed.main(["--model", kind, "--device", "cpu", "--steps", "2", "--repeats", "1",
                                  "--switches", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    keys = {"image_s", "batch4_s", "switch_s", "first_load_s"}
    assert set(saved["ratios"]) == keys
    for side in ("baseline", "ours"):
        assert all(saved[side][k] > 0 and math.isfinite(saved[side][k]) for k in keys)
        assert all(saved[side][f"{k}_range"][0] <= saved[side][k] <= saved[side][f"{k}_range"][1] for k in keys)
    assert all(r > 0 and math.isfinite(r) for r in saved["ratios"].values())
    assert saved["ours"]["resident_adapters"] == 2 and saved["steps"] == 2 and saved["width"] == 64
    assert saved["ours"]["pixel_diff_vs_baseline"][0] < 1.0  # the same pictures (fp32: no rounding apart)


def test_pictures_are_rounded_to_bytes_as_diffusers_rounds_them() -> None:
    from diffusers.image_processor import VaeImageProcessor

    from trainer.engine import to_pixels

    decoded = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)).clamp(-1.2, 1.2)
    processor = VaeImageProcessor()
    theirs = processor.postprocess(decoded, output_type="pil")
    ours = to_pixels(processor.postprocess(decoded, output_type="pt"))
    assert ours.shape == (2, 16, 24, 3) and ours.dtype == np.uint8
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(ours, theirs, strict=True))


def test_pictures_run_in_eval_mode_and_every_modules_own_mode_comes_back() -> None:
    """Compiled code is guarded on training mode: pictures always run in the mode the warm-up saw."""
    pipe = build_random_pipeline("tiny")
    pipe.unet.train()
    engine = GenerationEngine(pipe)
    assert not any(m.training for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    assert not any(p.requires_grad for p in pipe.unet.parameters())

    pipe.unet.train()  # a training loop's state, with one submodule kept in eval mode
    pipe.unet.conv_in.eval()
    seen: list[bool] = []
    engine.generate(REQUEST, on_event=lambda _e: seen.append(any(m.training for m in pipe.unet.modules())),
                    **PERSON)
    assert seen and not any(seen)
    assert pipe.unet.training and pipe.unet.down_blocks[0].training and not pipe.unet.conv_in.training
