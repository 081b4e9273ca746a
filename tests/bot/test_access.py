"""Who may use the bot (bot.access): roles by id, name or server, the cache, bans, operators, user installs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from bot.access import BANNED, CHECK_FAILED, AccessControl, Grant, MembershipUnknown, role_allowed
from bot.config import Settings
from bot.scheduler import Refused
from storage import bans_db
from storage.store import Storage
from tests.clock import FakeClock

CLUB, PARK = 1001, 1002  # two servers the bot is in
ALICE = 7


def role(role_id: int, name: str) -> SimpleNamespace:
    return SimpleNamespace(id=role_id, name=name)


EVERYONE, ARTIST, MOD = role(CLUB, "@everyone"), role(11, "Artists"), role(12, "Mods")


class Members:
    """The servers and members Discord would report, and how often it was asked."""

    def __init__(self, members: dict[tuple[int, int], list[SimpleNamespace]]) -> None:
        self.members = members
        self.fetches: list[tuple[int, int]] = []
        self.failing: set[int] = set()

    def server_ids(self) -> list[int]:
        return [CLUB, PARK]

    def server_name(self, guild_id: int) -> str | None:
        return {CLUB: "Club", PARK: "Park"}.get(guild_id)

    def role_name(self, guild_id: int, role_id: int) -> str | None:
        return {11: "Artists", 12: "Mods"}.get(role_id)

    async def roles_of(self, guild_id: int, user_id: int):
        self.fetches.append((guild_id, user_id))
        if guild_id in self.failing:
            raise MembershipUnknown("503 Service Unavailable")
        return self.members.get((guild_id, user_id))



@pytest.fixture
async def store(tmp_path: Path):
    store = await Storage.open(tmp_path)
    yield store
    await store.close()


def access(store: Storage, members: Members, clock: FakeClock | None = None, **settings: object) -> AccessControl:
    return AccessControl(replace(Settings(), **settings), store, members, clock=clock or FakeClock(1000.0))  # type: ignore[arg-type]


def in_server(guild_id: int, interaction_user: object = None) -> SimpleNamespace:
    """An interaction in a server; `interaction_user` a Member (with roles) or None for a bare user."""
    return SimpleNamespace(guild_id=guild_id, user=interaction_user or SimpleNamespace(id=ALICE))


@pytest.mark.parametrize(("entries", "guild_id", "roles", "allowed"), [
    ((), CLUB, [EVERYONE], True),
    (("11",), CLUB, [EVERYONE, ARTIST], True),
    (("artists",), CLUB, [EVERYONE, ARTIST], True),  # by name, any case
    (("Mods",), CLUB, [EVERYONE, ARTIST], False),
    ((f"{CLUB}:Artists",), CLUB, [ARTIST], True),
    ((f"{PARK}:Artists",), CLUB, [ARTIST], False),  # scoped to another server
    ((f"{PARK}:Mods", "Artists"), CLUB, [ARTIST], True),
    (("12",), CLUB, [ARTIST], False),
    (("Team: Red",), CLUB, [role(13, "Team: Red")], True),  # a colon in a name is no server id
])
def test_roles_match_by_id_or_name_and_only_in_their_server(entries, guild_id, roles, allowed):
    assert role_allowed(entries, guild_id, roles) is allowed


async def test_a_member_of_an_allowed_server_with_an_allowed_role_is_let_in(store):
    members = Members({(PARK, ALICE): [ARTIST]})
    control = access(store, members, allowed_roles=("Artists",))
    assert await control.require(SimpleNamespace(id=ALICE)) == Grant(PARK)
    assert await control.require(SimpleNamespace(id=ALICE), in_server(CLUB)) == Grant(PARK)


async def test_the_server_used_in_counts_first(store):
    members = Members({(CLUB, ALICE): [ARTIST], (PARK, ALICE): [ARTIST]})
    control = access(store, members)
    assert await control.require(SimpleNamespace(id=ALICE), in_server(PARK)) == Grant(PARK)
    assert await control.require(SimpleNamespace(id=ALICE)) == Grant(CLUB)


async def test_only_the_allowed_servers_count(store):
    members = Members({(CLUB, ALICE): [ARTIST]})
    control = access(store, members, allowed_guilds=(PARK,))
    with pytest.raises(Refused) as refused:
        await control.require(SimpleNamespace(id=ALICE))
    assert members.fetches == [(PARK, ALICE)]
    assert refused.value.message.startswith("Sorry, I'm only open to members of the **Park** server;")


async def test_the_refusal_says_which_servers_and_roles_let_people_in(store):
    control = access(store, Members({}), allowed_roles=("11", f"{PARK}:Mods"), access_cache_s=300)
    with pytest.raises(Refused) as refused:
        await control.require(SimpleNamespace(id=ALICE))
    assert refused.value.message == (
        "Sorry, I'm only open to members of one of the servers **Club**, **Park** with one of the roles "
        "**Artists**, **Mods**; once you are one, please try again (I may take up to 5 minutes to notice).")


async def test_a_role_taken_away_counts_once_the_cache_time_has_passed(store):
    members, clock = Members({(CLUB, ALICE): [ARTIST]}), FakeClock(1000.0)
    control = access(store, members, clock, allowed_guilds=(CLUB,), allowed_roles=("Artists",), access_cache_s=60)
    assert await control.require(SimpleNamespace(id=ALICE)) == Grant(CLUB)
    members.members[(CLUB, ALICE)] = [EVERYONE]
    clock.now += 59
    assert await control.require(SimpleNamespace(id=ALICE)) == Grant(CLUB)
    assert members.fetches == [(CLUB, ALICE)]  # the second answer came from the cache
    clock.now += 1
    with pytest.raises(Refused):
        await control.require(SimpleNamespace(id=ALICE))
    assert len(members.fetches) == 2


async def test_the_roles_an_interaction_carries_are_fresher_than_the_cache(store):
    members, clock = Members({(CLUB, ALICE): [ARTIST]}), FakeClock(1000.0)
    control = access(store, members, clock, allowed_roles=("Artists",))
    assert await control.require(SimpleNamespace(id=ALICE)) == Grant(CLUB)
    without = in_server(CLUB, SimpleNamespace(id=ALICE, roles=[EVERYONE]))
    members.members.pop((CLUB, ALICE))
    with pytest.raises(Refused):
        await control.require(SimpleNamespace(id=ALICE), without)
    with pytest.raises(Refused):  # and in a DM, from the cache the interaction refreshed
        await control.require(SimpleNamespace(id=ALICE))
    assert members.fetches == [(CLUB, ALICE), (PARK, ALICE)]


async def test_a_banned_person_is_refused_even_as_an_operator(store):
    members = Members({(CLUB, ALICE): [ARTIST]})
    control = access(store, members, admin_user_ids=(ALICE,), allow_user_install=True)
    await bans_db.ban(store.db, ALICE, banned_by=1, reason="spam")
    with pytest.raises(Refused) as refused:
        await control.require(SimpleNamespace(id=ALICE))
    assert refused.value.message == BANNED
    await bans_db.unban(store.db, ALICE)
    assert (await control.require(SimpleNamespace(id=ALICE))).admin


async def test_operators_are_let_in_without_asking_discord(store):
    members = Members({})
    control = access(store, members, allowed_guilds=(PARK,), admin_user_ids=(ALICE,))
    assert await control.require(SimpleNamespace(id=ALICE)) == Grant(None, admin=True)
    assert await control.require(SimpleNamespace(id=ALICE), in_server(PARK)) == Grant(PARK, admin=True)
    assert await control.require(SimpleNamespace(id=ALICE), in_server(CLUB)) == Grant(None, admin=True)
    assert members.fetches == []


async def test_with_user_installs_on_outsiders_are_let_in_against_no_server(store):
    members = Members({(CLUB, ALICE): [ARTIST]})
    control = access(store, members, allowed_roles=("Mods",), allow_user_install=True)
    assert await control.require(SimpleNamespace(id=ALICE)) == Grant(None)
    assert await control.require(SimpleNamespace(id=99)) == Grant(None)


async def test_when_discord_fails_the_person_is_asked_to_try_again_and_nothing_is_cached(store):
    members, clock = Members({(PARK, ALICE): [ARTIST]}), FakeClock(1000.0)
    control = access(store, members, clock)
    members.failing.add(PARK)
    with pytest.raises(Refused) as refused:
        await control.require(SimpleNamespace(id=ALICE))
    assert refused.value.message == CHECK_FAILED
    members.failing.clear()
    assert await control.require(SimpleNamespace(id=ALICE)) == Grant(PARK)
