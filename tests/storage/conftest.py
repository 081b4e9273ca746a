"""Fixtures shared by the storage tests."""

from __future__ import annotations

import pytest

from storage.store import Storage


@pytest.fixture
async def store(tmp_path):
    """An opened store in a fresh data folder, closed after the test."""
    store = await Storage.open(tmp_path)
    yield store
    await store.close()
