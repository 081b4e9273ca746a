"""Reading settings the same way everywhere: a `.env` file under the environment, switches as words."""

from __future__ import annotations

from pathlib import Path

from dotenv import dotenv_values

SWITCH_ON, SWITCH_OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_file_values(env_file: Path | None) -> dict[str, str]:
    """The settings a `.env` file sets (none if there is no such file), for the bot and for Celery
    workers to read the same way: under the environment, which wins."""
    if env_file is None or not env_file.is_file():
        return {}
    return {k: v for k, v in dotenv_values(env_file).items() if v is not None}


def parse_switch(raw: str) -> bool | None:
    """An on/off setting as written in the environment (any case, spaces around); None if it is neither."""
    word = raw.strip().lower()
    return True if word in SWITCH_ON else False if word in SWITCH_OFF else None
