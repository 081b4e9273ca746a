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


def command_data(
    world: World, command: dict[str, Any], path: list[str], given: dict[str, Any]
) -> dict[str, Any]:
    """The interaction `data` for command, or its subcommand along path, with the given options."""
    resolved: dict[str, Any] = {}
    data: dict[str, Any] = {
        "id": command["id"],
        "name": command["name"],
        "type": command.get("type", 1),
        "options": _options(world, command, path, given, resolved),
    }
    if resolved:
        data["resolved"] = resolved
    if "guild_id" in command:
        data["guild_id"] = command["guild_id"]
    return data


def _options(
    world: World, parent: dict[str, Any], path: list[str], given: dict[str, Any], resolved: dict[str, Any]
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
                "options": _options(world, sub, path[1:], given, resolved),
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
        elif kind in _OPTION_CONVERTERS:
            value = _OPTION_CONVERTERS[kind](value)
        else:
            raise NotImplementedError(f"option type {kind} of {name!r} is not supported by the fake")
        result.append({"name": name, "type": kind, "value": value})
    return result


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
