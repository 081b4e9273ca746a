"""The DM photo intake with hostile uploads: six people's bombs at once beside another person's
selfie, all through the intake pool the photo cog owns (issue #27, F1/F2/F8)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import SimpleNamespace

import pytest

from bot.cogs.selfies import PhotosCog
from bot.config import Settings
from bot.photo_intake import accept_photo
from photos.intake import IntakeLimits, too_costly
from photos.sandbox import IntakePool
from storage import photos_db, users_db
from storage.store import Storage
from tests.photos import intake_corpus as corpus
from tests.photos_factory import selfie

PEOPLE = [1000 + i for i in range(7)]


@pytest.fixture
async def store(tmp_path):
    store = await Storage.open(tmp_path)
    for person in PEOPLE:
        await users_db.ensure_user(store.db, person)
    yield store
    await store.close()


@pytest.mark.slow
async def test_six_people_send_bombs_at_once_and_a_seventh_gets_their_selfie_kept(store):
    bombs = [case for case in corpus.BOMBS if isinstance(case.expect, str)][:6]
    uploads = [case.make() for case in bombs]
    pool = IntakePool(2)
    try:
        outcomes = await asyncio.gather(
            *(accept_photo(store, person, data, f"{case.name}.jpg", IntakeLimits(), max_photos=30, pool=pool)
              for person, data, case in zip(PEOPLE, uploads, bombs, strict=False)),
            accept_photo(store, PEOPLE[6], selfie(3), "me.jpg", IntakeLimits(), max_photos=30, pool=pool))
    finally:
        await pool.close()
    *refused, kept = outcomes
    assert all(o.error and o.photo_id is None for o in refused)
    assert refused[0].error == too_costly().message  # the WebP over the decoding budget
    assert all("damaged" in (o.error or "") for o in refused[1:])
    assert kept.error is None and kept.photo_id is not None
    assert [await photos_db.count_photos(store.db, person) for person in PEOPLE] == [0] * 6 + [1]


async def test_the_photo_cog_owns_a_pool_of_intake_processes_processes():
    bot = SimpleNamespace(settings=replace(Settings(), intake_processes=3))
    cog = PhotosCog(bot)  # type: ignore[arg-type]
    await cog.cog_load()
    assert cog.pool is not None and cog.pool.processes == 3
    assert all(pid is not None for pid in cog.pool.pids)
    await cog.cog_unload()
    assert cog.pool.pids == [None, None, None]
