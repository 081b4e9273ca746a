"""What /imagine asks for when options are left out: the person's defaults, else the built-in ones."""

from __future__ import annotations

from bot.personal_defaults import IMAGINE_COUNT, effective, request_options
from jobs.requests import GenerateRequest
from storage.user_settings_db import NO_DEFAULTS, PersonalDefaults

NOTHING_GIVEN = PersonalDefaults()
THEIRS = PersonalDefaults(negative_prompt="blurry, extra fingers", style="anime", aspect="portrait",
                          num_images=3, face_pass=False)


def test_with_nothing_given_and_no_defaults_the_built_in_ones_apply():
    assert request_options(NOTHING_GIVEN, NO_DEFAULTS) == {
        "negative_prompt": "", "style": None, "aspect": "square", "num_images": IMAGINE_COUNT, "face_pass": True}
    assert IMAGINE_COUNT == 2
    request = GenerateRequest(prompt="p", **request_options(NOTHING_GIVEN, NO_DEFAULTS))
    built_in = GenerateRequest(prompt="p")
    assert (request.negative_prompt, request.style, request.aspect, request.face_pass) == (
        built_in.negative_prompt, built_in.style, built_in.aspect, built_in.face_pass)


def test_options_left_out_take_the_persons_defaults():
    assert request_options(NOTHING_GIVEN, THEIRS) == {
        "negative_prompt": "blurry, extra fingers", "style": "anime", "aspect": "portrait", "num_images": 3,
        "face_pass": False}


def test_an_option_given_wins_over_the_default_even_when_it_is_the_built_in_value():
    given = PersonalDefaults(negative_prompt="hats", style="photo", aspect="square", num_images=2, face_pass=True)
    assert request_options(given, THEIRS) == {
        "negative_prompt": "hats", "style": "photo", "aspect": "square", "num_images": 2, "face_pass": True}


def test_each_option_is_decided_on_its_own():
    given = PersonalDefaults(aspect="landscape")
    partial = PersonalDefaults(num_images=4)
    assert request_options(given, partial) == {
        "negative_prompt": "", "style": None, "aspect": "landscape", "num_images": 4, "face_pass": True}


def test_a_stored_default_the_code_no_longer_knows_is_skipped_not_refused():
    stale = PersonalDefaults(style="vaporwave", aspect="round", num_images=9)
    options = request_options(NOTHING_GIVEN, stale)
    assert (options["style"], options["aspect"], options["num_images"]) == (None, "square", IMAGINE_COUNT)
    GenerateRequest(prompt="p", **options)  # a request the bot accepts


def test_effective_is_what_a_command_with_every_option_left_out_would_use():
    assert effective(THEIRS) == request_options(NOTHING_GIVEN, THEIRS)
    assert effective(NO_DEFAULTS)["face_pass"] is True
