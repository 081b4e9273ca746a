"""What /imagine asks for when an option is left out: the person's own default (set with /settings),
else the built-in one (GenerateRequest's, and /imagine's two pictures)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from jobs.requests import ASPECTS, MAX_IMAGES, STYLES, GenerateRequest
from storage.user_settings_db import DEFAULT_NAMES, PersonalDefaults

# /imagine draws two pictures unless told otherwise (GenerateRequest's own default of one is for
# the callers that ask for a picture at a time).
IMAGINE_COUNT = 2
_REQUEST_DEFAULTS = {f.name: f.default for f in fields(GenerateRequest) if f.name in DEFAULT_NAMES}


def built_in(name: str) -> Any:
    """The default of option `name` when neither the person nor their settings give one."""
    return IMAGINE_COUNT if name == "num_images" else _REQUEST_DEFAULTS[name]


def usable(name: str, value: Any) -> bool:
    """Whether a stored default may be used: one the code no longer knows (a style since renamed, a
    count above a lowered maximum) is skipped rather than refusing every /imagine of its owner."""
    if value is None:
        return False
    if name == "style":
        return value in STYLES
    if name == "aspect":
        return value in ASPECTS
    if name == "num_images":
        return isinstance(value, int) and 1 <= value <= MAX_IMAGES
    return True


def request_options(given: PersonalDefaults, defaults: PersonalDefaults) -> dict[str, Any]:
    """GenerateRequest keyword arguments for the options /imagine takes: each the person gave (not
    None), else their usable default, else the built-in one."""
    options = {}
    for name in DEFAULT_NAMES:
        value = getattr(given, name)
        if value is None:
            stored = getattr(defaults, name)
            value = stored if usable(name, stored) else built_in(name)
        options[name] = value
    return options


def effective(defaults: PersonalDefaults) -> dict[str, Any]:
    """What /imagine would use for each option left out: the person's default or the built-in one."""
    return request_options(PersonalDefaults(), defaults)
