"""Building the interactions a user triggers: slash command options and INTERACTION_CREATE payloads.

Options are typed from the command the bot registered, as Discord's client would send them, so a
test that passes a wrong option name or type fails here instead of reaching the bot as nonsense.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .models import FakeChannel, FakeGuild, FakeInteraction, FakeUser
from .world import World

OPTION_SUB_COMMAND = 1
OPTION_SUB_COMMAND_GROUP = 2
OPTION_STRING = 3
OPTION_INTEGER = 4
OPTION_BOOLEAN = 5
OPTION_USER = 6
OPTION_NUMBER = 10
OPTION_ATTACHMENT = 11

CONTEXT_GUILD = 0
CONTEXT_BOT_DM = 1
ALL_APP_PERMISSIONS = (1 << 53) - 1


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"a boolean option takes True or False, not {value!r}")
    return value


_OPTION_CONVERTERS: dict[int, Callable[[Any], Any]] = {
    OPTION_STRING: str,
    OPTION_INTEGER: int,
    OPTION_BOOLEAN: _boolean,
    OPTION_NUMBER: float,
}


def registered_command(world: World, name: str, guild: FakeGuild | None) -> dict[str, Any]:
    """The slash command the bot registered under name: the guild's own first, then global."""
    scopes = ([guild.id] if guild is not None else []) + [None]
    for scope in scopes:
        for command in world.commands.get(scope, []):
            if command["name"] == name and command.get("type", 1) == 1:
                return command
    known = sorted(c["name"] for scope in scopes for c in world.commands.get(scope, []))
    raise LookupError(f"no slash command {name!r} is registered here; registered: {known}")


def check_visible(command: dict[str, Any], user: FakeUser, guild: FakeGuild | None) -> None:
    """Refuse, as Discord's client does by not offering it, a command whose `default_member_permissions`
    the member lacks in a server; in DMs with the bot they do not apply."""
    required = command.get("default_member_permissions")
    if guild is None or required is None:
        return
    held = guild.permissions_of(user)
    if int(required) & ~held:
        raise PermissionError(f"Discord does not offer /{command['name']} to {user.name} in {guild.name}: "
                              f"it needs permissions {required}, they have {held}")


def command_data(
    world: World, command: dict[str, Any], path: list[str], given: dict[str, Any], guild: FakeGuild | None = None
) -> dict[str, Any]:
    """The interaction `data` for command, or its subcommand along path, with the given options
    (`guild`: where it is used, whose member a user option resolves to)."""
    resolved: dict[str, Any] = {}
    data: dict[str, Any] = {
        "id": command["id"],
        "name": command["name"],
        "type": command.get("type", 1),
        "options": _options(world, command, path, given, resolved, guild),
    }
    if resolved:
        data["resolved"] = resolved
    if "guild_id" in command:
        data["guild_id"] = command["guild_id"]
    return data


def _options(
    world: World,
    parent: dict[str, Any],
    path: list[str],
    given: dict[str, Any],
    resolved: dict[str, Any],
    guild: FakeGuild | None,
) -> list[dict[str, Any]]:
    declared = {option["name"]: option for option in parent.get("options", [])}
    if path:
        sub = declared.get(path[0])
        if sub is None or sub["type"] not in (OPTION_SUB_COMMAND, OPTION_SUB_COMMAND_GROUP):
            raise LookupError(f"{parent['name']!r} has no subcommand {path[0]!r}")
        return [
            {
                "name": sub["name"],
                "type": sub["type"],
                "options": _options(world, sub, path[1:], given, resolved, guild),
            }
        ]
    unknown = set(given) - set(declared)
    if unknown:
        raise LookupError(f"{parent['name']!r} has no options {sorted(unknown)}; it has {sorted(declared)}")
    missing = [name for name, option in declared.items() if option.get("required") and name not in given]
    if missing:
        raise ValueError(f"{parent['name']!r} needs options {missing}")
    result = []
    for name, value in given.items():
        kind = declared[name]["type"]
        if kind == OPTION_ATTACHMENT:
            attachment = world.store_file(*value)
            resolved.setdefault("attachments", {})[str(attachment.id)] = attachment.payload()
            value = str(attachment.id)
        elif kind == OPTION_USER:
            value = _resolve_user(value, resolved, guild)
        elif kind in _OPTION_CONVERTERS:
            value = _OPTION_CONVERTERS[kind](value)
        else:
            raise NotImplementedError(f"option type {kind} of {name!r} is not supported by the fake")
        result.append({"name": name, "type": kind, "value": value})
    return result


def _resolve_user(user: FakeUser, resolved: dict[str, Any], guild: FakeGuild | None) -> str:
    """A user option's value is the id; the user, and in a server their membership (without `user`),
    come in `resolved`, as Discord sends them."""
    if not isinstance(user, FakeUser):
        raise TypeError(f"a user option takes a FakeUser, not {user!r}")
    resolved.setdefault("users", {})[str(user.id)] = user.payload()
    if guild is not None and user in guild.members:
        member = guild.member_payload(user)
        del member["user"]
        resolved.setdefault("members", {})[str(user.id)] = member
    return str(user.id)


def interaction_payload(world: World, interaction: FakeInteraction) -> dict[str, Any]:
    """The INTERACTION_CREATE payload: a member in a guild channel, a user in a DM."""
    channel: FakeChannel = interaction.channel
    user: FakeUser = interaction.user
    payload: dict[str, Any] = {
        "id": str(interaction.id),
        "application_id": str(world.application_id),
        "type": interaction.type,
        "data": interaction.data,
        "channel_id": str(channel.id),
        "channel": channel.payload(),
        "token": interaction.token,
        "version": 1,
        "locale": "en-US",
        "app_permissions": str(ALL_APP_PERMISSIONS),
        "entitlements": [],
        "attachment_size_limit": world.attachment_size_limit,
    }
    if channel.guild is not None:
        payload |= {
            "guild_id": str(channel.guild.id),
            "guild": {"id": str(channel.guild.id), "locale": "en-US", "features": []},
            "guild_locale": "en-US",
            "member": channel.guild.member_payload(user),
            "context": CONTEXT_GUILD,
            "authorizing_integration_owners": {"0": str(channel.guild.id)},
        }
    else:
        payload |= {"user": user.payload(), "context": CONTEXT_BOT_DM}
    if interaction.message is not None:
        payload["message"] = interaction.message.payload()
    return payload
