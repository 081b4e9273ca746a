"""Who may use the bot: members of the allowed servers with an allowed role, checked with Discord.

A person is checked when they send photos, /train, /imagine, press a picture button or set their
handle, not only when they are in a server: membership and roles are fetched through the API
(`GET /guilds/{id}/members/{user}`) and trusted for ACCESS_CACHE_S, so a role taken away stops
them within that time, in DMs too. An operator's ban is read from the database on every check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import discord

from bot.config import Settings
from bot.scheduler import Refused
from storage import bans_db
from storage.store import Storage

if TYPE_CHECKING:
    from discord.ext import commands

log = logging.getLogger(__name__)

BANNED = ("An operator of this bot has banned you from using it; if you think that is a mistake, please ask "
          "the operators of the server where you found me.")
CHECK_FAILED = ("I couldn't check your server membership with Discord just now; please try again in a minute.")


@dataclass(frozen=True)
class Grant:
    """Leave to use the bot. `guild_id`: the server the use counts against (None: none, for an
    operator outside a server or someone using it as their own app)."""

    guild_id: int | None
    admin: bool = False


class Role(Protocol):
    id: int
    name: str


class MembershipUnknown(Exception):
    """Discord did not say whether the person is a member (it failed, or was too slow)."""


class Members(Protocol):
    """What the access check asks Discord (bot.access.DiscordMembers; tests pass their own)."""

    def server_ids(self) -> list[int]: ...

    def server_name(self, guild_id: int) -> str | None: ...

    def role_name(self, guild_id: int, role_id: int) -> str | None: ...

    async def roles_of(self, guild_id: int, user_id: int) -> Sequence[Role] | None:
        """The person's roles in the server, or None if they are not a member of it."""
        ...


class DiscordMembers:
    """Members through the client: servers and roles from its cache, each member through the API
    (the bot has no member intent, so no member list is kept)."""

    def __init__(self, client: commands.Bot) -> None:
        self.client = client
        self._warned: set[int] = set()

    def server_ids(self) -> list[int]:
        return [guild.id for guild in self.client.guilds]

    def server_name(self, guild_id: int) -> str | None:
        guild = self.client.get_guild(guild_id)
        return guild.name if guild is not None else None

    def role_name(self, guild_id: int, role_id: int) -> str | None:
        guild = self.client.get_guild(guild_id)
        role = guild.get_role(role_id) if guild is not None else None
        return role.name if role is not None else None

    async def roles_of(self, guild_id: int, user_id: int) -> Sequence[Role] | None:
        guild = self.client.get_guild(guild_id)
        if guild is None:  # ALLOWED_GUILDS names a server the bot is not in: nobody qualifies there
            self._warn_once(guild_id, "ALLOWED_GUILDS lists server %d, which I am not in; invite me there", guild_id)
            return None
        try:
            member = await guild.fetch_member(user_id)
        except discord.NotFound:  # 10007 Unknown Member: not in this server
            return None
        except discord.Forbidden:
            self._warn_once(guild_id, "Discord refused to show me the members of server %d", guild_id)
            return None
        except discord.HTTPException as exc:
            raise MembershipUnknown(str(exc)) from exc
        return member.roles

    def _warn_once(self, guild_id: int, message: str, *args: Any) -> None:
        if guild_id not in self._warned:
            self._warned.add(guild_id)
            log.warning(message, *args)


def role_allowed(entries: Sequence[str], guild_id: int, roles: Sequence[Role]) -> bool:
    """Whether one of `roles` (in server `guild_id`) is named by ALLOWED_ROLES: by id or by name
    (any case); an entry "<server id>:<role>" counts only in that server. No entries: anyone."""
    if not entries:
        return True
    for entry in entries:
        scope, role = _split(entry)
        if scope is not None and scope != guild_id:
            continue
        if any(role == str(r.id) or role.casefold() == r.name.casefold() for r in roles):
            return True
    return False


def _split(entry: str) -> tuple[int | None, str]:
    """("<server id>:<role>" or "<role>") -> (server id or None, role)."""
    prefix, colon, rest = entry.partition(":")
    if colon and prefix.strip().isdigit() and rest.strip():
        return int(prefix), rest.strip()
    return None, entry.strip()


class AccessControl:
    """`require` says whether a person may use the bot now, and against which server."""

    def __init__(self, settings: Settings, store: Storage, members: Members, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`clock`: what the cache's age is measured with (tests pass a fake one)."""
        self.settings = settings
        self.store = store
        self.members = members
        self.clock = clock
        self._cache: dict[tuple[int, int], tuple[bool, float]] = {}  # (guild, user) -> (qualifies, until)

    def allowed_servers(self) -> list[int]:
        return list(self.settings.allowed_guilds) or self.members.server_ids()

    async def require(self, user: discord.abc.Snowflake, interaction: discord.Interaction | None = None) -> Grant:
        """The person's grant, or Refused with a message that says what would let them in."""
        if await bans_db.get_ban(self.store.db, user.id) is not None:
            raise Refused(BANNED)
        servers = self.allowed_servers()
        here = interaction.guild_id if interaction is not None else None
        if user.id in self.settings.admin_user_ids:
            return Grant(here if here in servers else None, admin=True)
        if here in servers:
            servers.remove(here)
            servers.insert(0, here)  # the server it is used in counts first
            self._remember_interaction_roles(here, interaction)
        unsure = False
        for guild_id in servers:
            try:
                if await self._qualifies(guild_id, user.id):
                    return Grant(guild_id)
            except MembershipUnknown as exc:
                log.warning("could not check a membership in server %d: %s", guild_id, exc)
                unsure = True
        if self.settings.allow_user_install:
            return Grant(None)
        raise Refused(CHECK_FAILED if unsure else self.who_may())

    def _remember_interaction_roles(self, guild_id: int, interaction: discord.Interaction | None) -> None:
        """An interaction in a server the bot is in carries the member's current roles: fresher than
        the cache, and free."""
        if interaction is None or guild_id not in self.members.server_ids():
            return
        roles = getattr(interaction.user, "roles", None)  # a Member's; a User (a DM) has none
        if roles is not None:
            self._store(guild_id, interaction.user.id, role_allowed(self.settings.allowed_roles, guild_id, roles))

    async def _qualifies(self, guild_id: int, user_id: int) -> bool:
        cached = self._cache.get((guild_id, user_id))
        if cached is not None and cached[1] > self.clock():
            return cached[0]
        roles = await self.members.roles_of(guild_id, user_id)
        verdict = roles is not None and role_allowed(self.settings.allowed_roles, guild_id, roles)
        self._store(guild_id, user_id, verdict)
        return verdict

    def _store(self, guild_id: int, user_id: int, verdict: bool) -> None:
        now = self.clock()
        if len(self._cache) > 10_000:  # forget the expired ones rather than grow for ever
            self._cache = {key: entry for key, entry in self._cache.items() if entry[1] > now}
        self._cache[(guild_id, user_id)] = (verdict, now + self.settings.access_cache_s)

    def who_may(self) -> str:
        """The refusal for someone who is not let in: who is, and how soon a change is noticed."""
        servers = self.allowed_servers()
        names = [f"**{name}**" for name in map(self.members.server_name, servers) if name]
        if len(names) == 1 and len(servers) == 1:
            where = f"the {names[0]} server"
        elif names and len(names) == len(servers) and len(names) <= 5:
            where = f"one of the servers {', '.join(names)}"
        else:
            where = "a server I am in"
        roles = [self._role_label(entry, servers) for entry in self.settings.allowed_roles]
        if len(roles) == 1:
            where += f" with the {roles[0]} role"
        elif roles:
            where += f" with one of the roles {', '.join(roles)}"
        wait = self.settings.access_cache_s
        later = f" (I may take up to {max(1, round(wait / 60))} minutes to notice)" if wait >= 60 else ""
        return f"Sorry, I'm only open to members of {where}; once you are one, please try again{later}."

    def _role_label(self, entry: str, servers: list[int]) -> str:
        scope, role = _split(entry)
        if role.isdigit():
            for guild_id in [scope] if scope is not None else servers:
                if (name := self.members.role_name(guild_id, int(role))) is not None:
                    return f"**{name}**"
        return f"**{role}**"
