"""A picture's settings in A1111's `parameters` text (jobs.png_parameters): written as A1111 writes
them, and read back to the same settings."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from jobs import png_parameters
from jobs.png_parameters import PictureSettings, UnreadableParameters, model_name, parse, to_text
from jobs.requests import SCHEDULER_NAMES

SETTINGS = PictureSettings(
    prompt="a photo of zqjane woman, on a horse", negative_prompt="blurry, low quality", seed=123, steps=25,
    guidance=7.0, scheduler="dpmpp_2m", width=512, height=768,
    model="stable-diffusion-v1-5/stable-diffusion-v1-5", lora_name="zqjane", lora_hash="0123456789ab")


def test_the_text_is_laid_out_as_a1111_writes_it() -> None:
    assert to_text(SETTINGS) == (
        "a photo of zqjane woman, on a horse\n"
        "Negative prompt: blurry, low quality\n"
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x768, "
        'Model: stable-diffusion-v1-5/stable-diffusion-v1-5, Lora hashes: "zqjane: 0123456789ab"')


def test_without_a_negative_prompt_lora_or_model_those_parts_are_left_out() -> None:
    plain = replace(SETTINGS, negative_prompt="", lora_name=None, lora_hash=None, model="", scheduler="euler_a",
                    guidance=7.5)
    assert to_text(plain) == ("a photo of zqjane woman, on a horse\n"
                              "Steps: 25, Sampler: Euler a, CFG scale: 7.5, Seed: 123, Size: 512x768")
    assert parse(to_text(plain)) == plain


def test_a_variation_says_its_denoising_strength_before_the_lora() -> None:
    text = to_text(replace(SETTINGS, strength=0.55))
    assert text.endswith('Denoising strength: 0.55, Lora hashes: "zqjane: 0123456789ab"')


def test_a_flux_picture_names_its_sampler_and_distilled_guidance_as_forge_does() -> None:
    flux = replace(SETTINGS, scheduler=png_parameters.FLOW_SAMPLER, guidance=3.5, width=1024, height=1024,
                   model="FLUX.1-dev")
    assert to_text(flux).splitlines()[-1].startswith(
        "Steps: 25, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 123,")
    assert parse(to_text(flux)) == flux


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler_has_an_a1111_sampler_and_comes_back(scheduler: str) -> None:
    settings = replace(SETTINGS, scheduler=scheduler)
    assert scheduler in png_parameters.SAMPLERS
    assert parse(to_text(settings)) == settings


@pytest.mark.parametrize("settings", [
    SETTINGS,
    replace(SETTINGS, strength=0.3, guidance=0.1 + 0.2, seed=2**53 - 4),  # floats come back exactly
    replace(SETTINGS, prompt='zqjane: "the king", at dawn', negative_prompt="text: none, ugly"),
    replace(SETTINGS, prompt="un café à Paris, zqjane 🌙", negative_prompt="日本語"),
    replace(SETTINGS, prompt="two\nlines", negative_prompt="also\ntwo"),
    replace(SETTINGS, model="my model, v2: final", lora_name="zq-jane_2"),
    replace(SETTINGS, model='"quoted"'),
    replace(SETTINGS, prompt="", negative_prompt=""),
])
def test_parse_gives_back_what_was_written(settings: PictureSettings) -> None:
    assert parse(to_text(settings)) == settings


def test_values_a_reader_would_split_are_quoted_as_json() -> None:
    text = to_text(replace(SETTINGS, model="my model, v2: final"))
    assert 'Model: "my model, v2: final"' in text
    assert json.loads(text.split("Model: ")[1].split(", Lora")[0]) == "my model, v2: final"


def test_a1111s_own_text_is_read_including_its_older_sampler_names() -> None:
    text = ("masterpiece, zqjane woman\nNegative prompt: (worst quality:1.4)\n"
            "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 2179987202, Size: 768x512, "
            "Model hash: 93b79e09ed, Model: anything-v4.5, Clip skip: 2, Version: v1.6.0")
    settings = parse(text)
    assert settings == PictureSettings(
        prompt="masterpiece, zqjane woman", negative_prompt="(worst quality:1.4)", seed=2179987202, steps=20,
        guidance=7.0, scheduler="dpmpp_2m", width=768, height=512, model="anything-v4.5")
    assert parse("a cat\nSteps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale: 5.5, Seed: 1, "
                 "Size: 64x64").scheduler == "euler"


@pytest.mark.parametrize("text, reason", [
    ("just a prompt", "lack"),
    ("a cat\nSteps: 20, Sampler: DPM++ SDE, CFG scale: 7, Seed: 1, Size: 64x64", "DPM++ SDE"),
    ("a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Exponential, CFG scale: 7, Seed: 1, Size: 64x64",
     "Exponential"),
    ("a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: one, Size: 64x64", "not one"),
    ("a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: big", "WIDTHxHEIGHT"),
    ('a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Lora hashes: "a: 1, b: 2"', "one LoRA"),
])
def test_what_cannot_be_made_again_is_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(UnreadableParameters, match=re.escape(reason)):
        parse(text)


def test_a_lora_hash_needs_a_name_a1111_can_split_off() -> None:
    for name in (None, "a,b", "a:b"):
        with pytest.raises(ValueError, match="LoRA"):
            to_text(replace(SETTINGS, lora_name=name))


@pytest.mark.parametrize("spec, name", [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("tiny", "tiny"),
    ("/home/someone/models/dreamshaper_8.safetensors", "dreamshaper_8"),
    ("C:\\Users\\someone\\sd\\juggernaut.ckpt", "juggernaut"),
    ("~/models/sd15-diffusers", "sd15-diffusers"),
    ("/srv/models/sd15-diffusers/", "sd15-diffusers"),
    ("./models/mine", "mine"),
])
def test_the_model_is_named_without_its_folders(spec: str, name: str) -> None:
    assert model_name(spec) == name


def test_the_lora_hash_is_a1111s_of_the_tensor_data_alone(tmp_path: Path) -> None:
    import hashlib

    data = bytes(range(256)) * 10

    def safetensors(header: bytes) -> Path:
        path = tmp_path / f"{len(header)}.safetensors"
        path.write_bytes(len(header).to_bytes(8, "little") + header + data)
        return path

    first = png_parameters.lora_hash(safetensors(b'{"__metadata__":{"a":"1"}}'))
    assert first == hashlib.sha256(data).hexdigest()[:12]
    assert png_parameters.lora_hash(safetensors(b'{"__metadata__":{"a":"1","b":"2"}}')) == first
