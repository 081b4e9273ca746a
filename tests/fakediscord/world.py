"""The registry of everything the fake Discord knows, and the change signal tests wait on."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Callable
from typing import Any

from .models import (
    CHANNEL_DM,
    CHANNEL_GUILD_TEXT,
    DEFAULT_ATTACHMENT_SIZE_LIMIT,
    INTENT_DIRECT_MESSAGES,
    INTENT_GUILD_MESSAGES,
    INTENT_GUILDS,
    MESSAGE_DEFAULT,
    FakeAttachment,
    FakeChannel,
    FakeGuild,
    FakeInteraction,
    FakeMessage,
    FakeRole,
    FakeUser,
    MessageVersion,
    RateLimitRule,
    RequestRecord,
    ResponseRecord,
    Snowflakes,
    now,
)

EventSink = Callable[[str, dict[str, Any], int], None]


# The longest a waiter accepts no change at all, whatever it asked: on a busy 2-core machine a photo's
# check or a model's load can keep the bot quiet for tens of seconds.
MIN_QUIET_S = 60.0


class World:
    """Registry of everything the fake knows, with change notification for waiting tests.

    Message changes are published as gateway events through `publish`, which the gateway
    installs; the intent argument says which intent a session needs to receive the event.
    """

    def __init__(self, base_url: str, *, bot_name: str, guild_name: str) -> None:
        self.base_url = base_url
        self.ids = Snowflakes()
        self.users: dict[int, FakeUser] = {}
        self.channels: dict[int, FakeChannel] = {}
        self.messages: dict[int, FakeMessage] = {}
        self.attachments: dict[int, FakeAttachment] = {}
        self.interactions: dict[int, FakeInteraction] = {}
        self.commands: dict[int | None, list[dict[str, Any]]] = {}
        self.requests: list[RequestRecord] = []
        self.unknown_routes: list[RequestRecord] = []
        self.rate_limits: list[RateLimitRule] = []
        self.publish: EventSink = lambda event, data, intent: None
        self._changed = asyncio.Event()
        self._tokens = (f"itok-{n}" for n in itertools.count(1))
        self.attachment_size_limit = DEFAULT_ATTACHMENT_SIZE_LIMIT
        self.bot_user = self.new_user(bot_name, bot=True)
        self.application_id = self.bot_user.id
        self.owner = self.new_user("owner")
        self.guilds: list[FakeGuild] = []
        self.guild = self.new_guild(guild_name, self.owner)

    # change notification -------------------------------------------------------------------

    def notify(self) -> None:
        """Wake every waiter; each re-checks its condition."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float) -> Any:
        """Return predicate()'s first truthy value, re-checking after every change.

        `timeout` is how long the fake may go without any change (at least `MIN_QUIET_S`): a bot that
        keeps talking (progress edits of a training) is slow, not stuck, however busy the machine.
        The test's own time limit (pytest-timeout) bounds the whole wait."""
        timeout = max(timeout, MIN_QUIET_S)
        while True:
            changed = self._changed
            result = predicate()
            if result:
                return result
            try:
                async with asyncio.timeout(timeout):
                    await changed.wait()
            except TimeoutError:
                recent = ", ".join(f"{r.method} {r.path} -> {r.status}" for r in self.requests[-8:])
                raise TimeoutError(
                    f"condition not met, and nothing changed for {timeout}s; last requests: [{recent}]; "
                    f"unknown routes: {[f'{r.method} {r.path}' for r in self.unknown_routes]}"
                ) from None

    # creation ------------------------------------------------------------------------------

    def new_user(self, name: str, *, bot: bool = False, accepts_dms: bool = True) -> FakeUser:
        user = FakeUser(id=self.ids.next(), name=name, bot=bot, accepts_dms=accepts_dms)
        self.users[user.id] = user
        self.notify()
        return user

    def new_guild(self, name: str, owner: FakeUser) -> FakeGuild:
        """A server with a #general channel that the bot has joined: a connected bot gets its
        GUILD_CREATE, as when it is invited."""
        guild = FakeGuild(id=self.ids.next(), name=name, owner=owner, members=[self.bot_user, owner])
        self.new_text_channel(guild, "general")
        self.guilds.append(guild)
        self.publish("GUILD_CREATE", guild.payload(), INTENT_GUILDS)
        self.notify()
        return guild

    def find_guild(self, guild_id: int) -> FakeGuild | None:
        return next((guild for guild in self.guilds if guild.id == guild_id), None)

    def new_role(self, guild: FakeGuild, name: str) -> FakeRole:
        role = FakeRole(id=self.ids.next(), name=name, position=len(guild.roles) + 1)
        guild.roles.append(role)
        self.publish("GUILD_ROLE_CREATE", {"guild_id": str(guild.id), "role": role.payload()}, INTENT_GUILDS)
        self.notify()
        return role

    def new_text_channel(self, guild: FakeGuild, name: str, *, nsfw: bool = False) -> FakeChannel:
        """A text channel (`nsfw`: age-restricted); one made after the bot connected is not announced."""
        channel = FakeChannel(id=self.ids.next(), type=CHANNEL_GUILD_TEXT, name=name, guild=guild, nsfw=nsfw)
        guild.channels.append(channel)
        self.channels[channel.id] = channel
        return channel

    def dm_channel(self, user: FakeUser) -> FakeChannel:
        """The DM channel between the bot and user, opened on first use as Discord does."""
        for channel in self.channels.values():
            if channel.type == CHANNEL_DM and channel.recipient is user:
                return channel
        channel = FakeChannel(id=self.ids.next(), type=CHANNEL_DM, recipient=user)
        self.channels[channel.id] = channel
        self.notify()
        return channel

    def store_file(
        self, filename: str, data: bytes, content_type: str | None, description: str | None = None
    ) -> FakeAttachment:
        attachment_id = self.ids.next()
        attachment = FakeAttachment(
            id=attachment_id,
            filename=filename,
            data=data,
            content_type=content_type,
            url=f"{self.base_url}/attachments/{attachment_id}/{_url_safe(filename)}",
            description=description,
        )
        self.attachments[attachment.id] = attachment
        return attachment

    def new_interaction_token(self) -> str:
        return next(self._tokens)

    # messages ------------------------------------------------------------------------------

    def create_message(
        self,
        channel: FakeChannel,
        author: FakeUser,
        *,
        content: str = "",
        embeds: list[dict[str, Any]] | None = None,
        components: list[dict[str, Any]] | None = None,
        attachments: list[FakeAttachment] | None = None,
        flags: int = 0,
        type: int = MESSAGE_DEFAULT,
        interaction: FakeInteraction | None = None,
        webhook_id: int | None = None,
    ) -> FakeMessage:
        version = MessageVersion(
            content=content,
            embeds=list(embeds or []),
            components=list(components or []),
            attachments=list(attachments or []),
            flags=flags,
            at=now(),
        )
        message = FakeMessage(
            id=self.ids.next(),
            channel=channel,
            author=author,
            versions=[version],
            type=type,
            interaction=interaction,
            webhook_id=webhook_id,
        )
        channel.messages.append(message)
        self.messages[message.id] = message
        if not message.ephemeral:
            self.publish("MESSAGE_CREATE", message.payload(), _message_intent(channel))
        self.notify()
        return message

    def edit_message(self, message: FakeMessage, **changes: Any) -> FakeMessage:
        """Append a version with the given fields (content, embeds, components, attachments, flags) changed."""
        version = MessageVersion(
            content=changes.get("content", message.content),
            embeds=list(changes.get("embeds", message.embeds)),
            components=list(changes.get("components", message.components)),
            attachments=list(changes.get("attachments", message.attachments)),
            flags=changes.get("flags", message.flags),
            at=now(),
        )
        message.versions.append(version)
        if not message.ephemeral:
            self.publish("MESSAGE_UPDATE", message.payload(), _message_intent(message.channel))
        self.notify()
        return message

    def delete_message(self, message: FakeMessage) -> None:
        message.deleted_at = now()
        if not message.ephemeral:
            data = {"id": str(message.id), "channel_id": str(message.channel.id)}
            if message.channel.guild is not None:
                data["guild_id"] = str(message.channel.guild.id)
            self.publish("MESSAGE_DELETE", data, _message_intent(message.channel))
        self.notify()

    def record_response(
        self, interaction: FakeInteraction, kind: str, payload: dict[str, Any], message: FakeMessage | None
    ) -> None:
        interaction.responses.append(ResponseRecord(kind=kind, payload=payload, message=message, at=now()))
        self.notify()

    # requests ------------------------------------------------------------------------------

    def record_request(self, record: RequestRecord, *, unknown: bool) -> None:
        self.requests.append(record)
        if unknown:
            self.unknown_routes.append(record)
        self.notify()

    def take_rate_limit(self, method: str, path: str) -> RateLimitRule | None:
        """Consume one injected 429 matching this request, if any is pending."""
        for rule in self.rate_limits:
            if rule.matches(method, path):
                rule.remaining -= 1
                return rule
        return None


def _message_intent(channel: FakeChannel) -> int:
    return INTENT_DIRECT_MESSAGES if channel.type == CHANNEL_DM else INTENT_GUILD_MESSAGES


def _url_safe(filename: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", filename) or "file"
