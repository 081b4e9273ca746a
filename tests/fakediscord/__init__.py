"""A fake Discord server (REST + gateway) that a real discord.py client connects to in tests."""

from .gateway import GatewaySession
from .models import (
    FakeAttachment,
    FakeChannel,
    FakeGuild,
    FakeInteraction,
    FakeMessage,
    FakeRole,
    FakeUser,
    MessageVersion,
    RequestRecord,
    ResponseRecord,
)
from .server import FakeDiscord

__all__ = [
    "FakeAttachment",
    "FakeChannel",
    "FakeDiscord",
    "FakeGuild",
    "FakeInteraction",
    "FakeMessage",
    "FakeRole",
    "FakeUser",
    "GatewaySession",
    "MessageVersion",
    "RequestRecord",
    "ResponseRecord",
]
