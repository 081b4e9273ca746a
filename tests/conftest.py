"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import pytest

from tests.fakediscord import FakeDiscord


@pytest.fixture
async def fake():
    """A fresh fake Discord server on loopback for one test."""
    async with FakeDiscord() as server:
        yield server
