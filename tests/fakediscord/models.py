"""The objects of the fake Discord: users, the guild, channels, messages, files, interactions.

Each keeps enough history for a test to ask what the bot did (every version of an edited message,
every response to an interaction) and renders itself as the JSON payload discord.py parses.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

DISCORD_EPOCH_MS = 1420070400000

# Gateway intent bits that gate the events this server sends.
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12

CHANNEL_GUILD_TEXT = 0
CHANNEL_DM = 1

# What Discord allows a bot without boosts to upload, per file.
DEFAULT_ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024

FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7

MESSAGE_DEFAULT = 0
MESSAGE_CHAT_INPUT_COMMAND = 20

INTERACTION_APPLICATION_COMMAND = 2
INTERACTION_MESSAGE_COMPONENT = 3
INTERACTION_MODAL_SUBMIT = 5

COMPONENT_BUTTON = 2
COMPONENT_STRING_SELECT = 3

# View channel, send messages, embed links, attach files, read history, use application commands.
ALL_TEXT_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 14) | (1 << 15) | (1 << 16) | (1 << 31)
ADMINISTRATOR = 1 << 3
MANAGE_GUILD = 1 << 5
ALL_PERMISSIONS = (1 << 53) - 1  # a server's owner has every permission there


def now() -> datetime:
    """Timezone-aware current time, the form Discord timestamps take."""
    return datetime.now(UTC)


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 text as Discord sends it, or None."""
    return moment.isoformat() if moment is not None else None


class Snowflakes:
    """Unique, increasing Discord ids whose timestamps are the current time.

    discord.py reads creation times out of ids (for example to pick a rate limit bucket when
    deleting a message), so ids must encode a real timestamp, not just count up.
    """

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        stamp = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        self._last = max(stamp, self._last + 1)
        return self._last


@dataclass(eq=False)
class FakeUser:
    """A Discord account: the bot itself or a person who talks to it."""

    id: int
    name: str
    bot: bool = False
    accepts_dms: bool = True

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.name,
            "global_name": self.name,
            "discriminator": "0",
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
            "flags": 0,
        }


@dataclass(eq=False)
class FakeAttachment:
    """A stored file with the URL the fake serves it at."""

    id: int
    filename: str
    data: bytes
    content_type: str | None
    url: str
    description: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": str(self.id),
            "filename": self.filename,
            "size": self.size,
            "url": self.url,
            "proxy_url": self.url,
            "content_type": self.content_type,
        }
        if self.description is not None:
            body["description"] = self.description
        return body


@dataclass(frozen=True)
class MessageVersion:
    """One state of a message; a message keeps one per create or edit, oldest first."""

    content: str
    embeds: list[dict[str, Any]]
    components: list[dict[str, Any]]
    attachments: list[FakeAttachment]
    flags: int
    at: datetime


@dataclass(eq=False)
class FakeRole:
    """A server's role; @everyone is not one of these (its id is the server's)."""

    id: int
    name: str
    position: int

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "permissions": "0",
            "position": self.position,
            "color": 0,
            "hoist": False,
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }


@dataclass(eq=False)
class FakeGuild:
    """A server the bot is a member of, with its text channels, roles and members."""

    id: int
    name: str
    owner: FakeUser
    members: list[FakeUser] = field(default_factory=list)
    channels: list[FakeChannel] = field(default_factory=list)
    roles: list[FakeRole] = field(default_factory=list)
    member_roles: dict[int, list[FakeRole]] = field(default_factory=dict)  # user id -> their roles
    joined_at: datetime = field(default_factory=now)
    granted: dict[int, int] = field(default_factory=dict)  # user id -> permissions beyond ALL_TEXT_PERMISSIONS

    def permissions_of(self, user: FakeUser) -> int:
        """The member's permissions in the server's channels (no channel overwrites here), computed as
        Discord does: the owner, and an Administrator, have all of them."""
        held = ALL_TEXT_PERMISSIONS | self.granted.get(user.id, 0)
        return ALL_PERMISSIONS if user is self.owner or held & ADMINISTRATOR else held

    def member_payload(self, user: FakeUser, *, with_permissions: bool = True) -> dict[str, Any]:
        """A guild member object; an interaction's carries the member's permissions in the channel,
        the REST API's does not."""
        body: dict[str, Any] = {
            "user": user.payload(),
            "roles": [str(role.id) for role in self.member_roles.get(user.id, [])],
            "joined_at": iso(self.joined_at),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "nick": None,
            "avatar": None,
        }
        if with_permissions:
            body["permissions"] = str(self.permissions_of(user))
        return body

    def payload(self) -> dict[str, Any]:
        """The full GUILD_CREATE payload."""
        return {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "owner_id": str(self.owner.id),
            "unavailable": False,
            "large": False,
            "member_count": len(self.members),
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "features": [],
            "mfa_level": 0,
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "nsfw_level": 0,
            "system_channel_id": None,
            "joined_at": iso(self.joined_at),
            "roles": [
                {
                    "id": str(self.id),
                    "name": "@everyone",
                    "permissions": str(ALL_TEXT_PERMISSIONS),
                    "position": 0,
                    "color": 0,
                    "hoist": False,
                    "managed": False,
                    "mentionable": False,
                    "flags": 0,
                }
            ]
            + [role.payload() for role in self.roles],
            "emojis": [],
            "stickers": [],
            "channels": [channel.payload() for channel in self.channels],
            "members": [self.member_payload(user) for user in self.members],
            "threads": [],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }


@dataclass(eq=False)
class FakeChannel:
    """A guild text channel or a DM channel between the bot and one user."""

    id: int
    type: int
    name: str = ""
    guild: FakeGuild | None = None
    recipient: FakeUser | None = None
    messages: list[FakeMessage] = field(default_factory=list)
    nsfw: bool = False  # a guild channel marked age-restricted

    def payload(self) -> dict[str, Any]:
        if self.type == CHANNEL_DM:
            assert self.recipient is not None
            return {
                "id": str(self.id),
                "type": CHANNEL_DM,
                "recipients": [self.recipient.payload()],
                "last_message_id": None,
                "flags": 0,
            }
        assert self.guild is not None
        return {
            "id": str(self.id),
            "type": self.type,
            "guild_id": str(self.guild.id),
            "name": self.name,
            "position": self.guild.channels.index(self),
            "permission_overwrites": [],
            "topic": None,
            "nsfw": self.nsfw,
            "parent_id": None,
            "rate_limit_per_user": 0,
            "last_message_id": None,
            "flags": 0,
        }


@dataclass(eq=False)
class FakeMessage:
    """A message with its full edit history; the attributes read the latest version."""

    id: int
    channel: FakeChannel
    author: FakeUser
    versions: list[MessageVersion]
    type: int = MESSAGE_DEFAULT
    interaction: FakeInteraction | None = None
    webhook_id: int | None = None
    reactions: list[str] = field(default_factory=list)
    deleted_at: datetime | None = None

    @property
    def latest(self) -> MessageVersion:
        return self.versions[-1]

    @property
    def content(self) -> str:
        return self.latest.content

    @property
    def embeds(self) -> list[dict[str, Any]]:
        return self.latest.embeds

    @property
    def components(self) -> list[dict[str, Any]]:
        return self.latest.components

    @property
    def attachments(self) -> list[FakeAttachment]:
        return self.latest.attachments

    @property
    def flags(self) -> int:
        return self.latest.flags

    @property
    def history(self) -> list[MessageVersion]:
        """Every version, the original first."""
        return list(self.versions)

    @property
    def edited(self) -> bool:
        return len(self.versions) > 1

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & FLAG_EPHEMERAL)

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None

    @property
    def from_bot(self) -> bool:
        return self.author.bot

    @property
    def buttons(self) -> list[dict[str, Any]]:
        """Every button on the message, in reading order, as the component JSON the bot sent."""
        return [c for c in _walk_components(self.components) if c.get("type") == COMPONENT_BUTTON]

    def button(self, custom_id: str) -> dict[str, Any]:
        """The button with this custom_id; LookupError names the ones that exist."""
        for button in self.buttons:
            if button.get("custom_id") == custom_id:
                return button
        present = [b.get("custom_id") for b in self.buttons]
        raise LookupError(f"message {self.id} has no button {custom_id!r}; its buttons are {present}")

    @property
    def selects(self) -> list[dict[str, Any]]:
        """Every string select menu on the message, in reading order, as the component JSON the bot sent."""
        return [c for c in _walk_components(self.components) if c.get("type") == COMPONENT_STRING_SELECT]

    def select(self, custom_id: str) -> dict[str, Any]:
        """The select menu with this custom_id; LookupError names the ones that exist."""
        for menu in self.selects:
            if menu.get("custom_id") == custom_id:
                return menu
        present = [m.get("custom_id") for m in self.selects]
        raise LookupError(f"message {self.id} has no select menu {custom_id!r}; its menus are {present}")

    def payload(self) -> dict[str, Any]:
        version = self.latest
        body: dict[str, Any] = {
            "id": str(self.id),
            "channel_id": str(self.channel.id),
            "author": self.author.payload(),
            "content": version.content,
            "timestamp": iso(self.versions[0].at),
            "edited_timestamp": iso(version.at) if self.edited else None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [a.payload() for a in version.attachments],
            "embeds": version.embeds,
            "components": version.components,
            "pinned": False,
            "type": self.type,
            "flags": version.flags,
        }
        if self.channel.guild is not None:
            body["guild_id"] = str(self.channel.guild.id)
        if self.webhook_id is not None:
            body["webhook_id"] = str(self.webhook_id)
            body["application_id"] = str(self.webhook_id)
        return body


def _walk_components(components: list[dict[str, Any]]):
    for component in components:
        yield component
        yield from _walk_components(component.get("components", []))


@dataclass(frozen=True)
class ResponseRecord:
    """One thing the bot did with an interaction's token, in the order it happened.

    kind is one of: callback, edit_original, delete_original, followup, edit_followup,
    delete_followup. payload is the JSON body (for multipart, its payload_json); message is the
    message the call created or changed, if any.
    """

    kind: str
    payload: dict[str, Any]
    message: FakeMessage | None
    at: datetime

    @property
    def type(self) -> int | None:
        """The interaction callback type (4 reply, 5 deferred, 6 deferred update, 7 update, 9 modal)."""
        return self.payload.get("type") if self.kind == "callback" else None


@dataclass(eq=False)
class FakeInteraction:
    """An interaction the fake sent to the bot, and everything the bot answered."""

    id: int
    token: str
    type: int
    user: FakeUser
    channel: FakeChannel
    data: dict[str, Any]
    message: FakeMessage | None = None
    responses: list[ResponseRecord] = field(default_factory=list)
    original: FakeMessage | None = None
    followups: list[FakeMessage] = field(default_factory=list)
    expired: bool = False

    @property
    def callback(self) -> ResponseRecord | None:
        """The initial response, if the bot has sent one."""
        return next((r for r in self.responses if r.kind == "callback"), None)

    @property
    def callback_type(self) -> int | None:
        callback = self.callback
        return callback.type if callback is not None else None

    @property
    def guild(self) -> FakeGuild | None:
        return self.channel.guild


@dataclass(frozen=True)
class RequestRecord:
    """One HTTP request the bot made: path is relative to the API base for API routes."""

    method: str
    path: str
    status: int
    query: dict[str, str]
    body: Any


@dataclass
class RateLimitRule:
    """A pending injected 429 for requests whose method and path match."""

    method: str
    path: re.Pattern[str]
    retry_after: float
    remaining: int

    def matches(self, method: str, path: str) -> bool:
        return self.remaining > 0 and method.upper() == self.method and self.path.fullmatch(path) is not None
