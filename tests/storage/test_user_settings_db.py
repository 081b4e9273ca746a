"""A person's /settings defaults: set one at a time, read back, cleared, and theirs alone."""

from __future__ import annotations

import aiosqlite
import pytest

from storage import user_settings_db, users_db
from storage.user_settings_db import NO_DEFAULTS, PersonalDefaults

ALICE, BOB = 101, 202


async def test_a_person_without_defaults_has_none_and_no_row(store):
    assert await user_settings_db.get_defaults(store.db, ALICE) == NO_DEFAULTS
    assert NO_DEFAULTS.is_empty()
    assert await store.db.fetchall("SELECT * FROM user_settings") == []


async def test_defaults_are_set_one_at_a_time_and_kept_together(store):
    first = await user_settings_db.set_defaults(store.db, ALICE, style="anime")
    assert first == PersonalDefaults(style="anime")
    await user_settings_db.set_defaults(store.db, ALICE, aspect="portrait", num_images=3)
    await user_settings_db.set_defaults(store.db, ALICE, face_pass=False, negative_prompt="blurry")
    expected = PersonalDefaults("blurry", "anime", "portrait", 3, False)
    assert await user_settings_db.get_defaults(store.db, ALICE) == expected
    assert isinstance(expected.face_pass, bool) and not expected.is_empty()
    # None unsets one default and leaves the others.
    unset = await user_settings_db.set_defaults(store.db, ALICE, style=None)
    assert unset == PersonalDefaults("blurry", None, "portrait", 3, False)
    # The person's row exists for the foreign key, created with their first setting.
    assert await users_db.get_user(store.db, ALICE) is not None
    assert await user_settings_db.get_defaults(store.db, BOB) == NO_DEFAULTS


async def test_an_unknown_name_is_refused_before_anything_is_written(store):
    with pytest.raises(ValueError, match="seed"):
        await user_settings_db.set_defaults(store.db, ALICE, seed=3)
    assert await store.db.fetchall("SELECT * FROM user_settings") == []


async def test_clearing_removes_the_row_of_that_person_only(store):
    await user_settings_db.set_defaults(store.db, ALICE, aspect="landscape")
    await user_settings_db.set_defaults(store.db, BOB, aspect="portrait")
    assert await user_settings_db.clear_defaults(store.db, ALICE)
    assert not await user_settings_db.clear_defaults(store.db, ALICE)
    assert await user_settings_db.get_defaults(store.db, ALICE) == NO_DEFAULTS
    assert await user_settings_db.get_defaults(store.db, BOB) == PersonalDefaults(aspect="portrait")


async def test_no_default_can_be_stored_for_a_person_being_forgotten(store):
    await users_db.ensure_user(store.db, ALICE)
    await store.db.execute("INSERT INTO forgotten (user_id, started_at) VALUES (?, 0)", (ALICE,))
    with pytest.raises(aiosqlite.IntegrityError, match="being forgotten"):
        await user_settings_db.set_defaults(store.db, ALICE, style="anime")
    assert await store.db.fetchall("SELECT * FROM user_settings") == []
