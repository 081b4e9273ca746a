"""`.env.example` lists every setting README's table documents, with the same defaults."""

from __future__ import annotations

import re
from pathlib import Path

from bot.config import ENV_NAMES

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_ONLY = {"REDIS_PASSWORD", "REDIS_BIND"}


def readme_settings() -> dict[str, str]:
    """NAME -> default as README's Configuration table writes it (backticks removed)."""
    section = (ROOT / "README.md").read_text().split("## Configuration", 1)[1]
    rows = re.findall(r"^\| `([A-Z_0-9]+)` \| (.*?) \|", section, re.M)
    return {name: default.strip("`") for name, default in rows}


def example_settings() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    found = (re.fullmatch(r"#? ?([A-Z_0-9]+)=(.*)", line) for line in lines)
    return {m.group(1): m.group(2) for m in found if m}


def test_the_example_lists_every_setting_and_readme_documents_each():
    example, readme = example_settings(), readme_settings()
    assert set(readme) == set(ENV_NAMES.values())
    assert set(example) - COMPOSE_ONLY == set(readme)
    compose = (ROOT / "docker-compose.yml").read_text()
    assert all(f"${{{name}" in compose for name in COMPOSE_ONLY)


def test_the_example_gives_readmes_defaults():
    example, readme = example_settings(), readme_settings()
    for name, default in readme.items():
        if default != "unset" and re.fullmatch(r"[\w./:+-]+", default):  # a value, not prose
            assert example[name] == default, name
        else:
            assert example[name] == "", name
