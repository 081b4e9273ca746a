"""A fake Discord server (REST + gateway) that a real discord.py client connects to in tests."""

from .gateway import GatewaySession
from .server import FakeDiscord
from .state import (
    FakeAttachment,
    FakeChannel,
    FakeGuild,
    FakeInteraction,
    FakeMessage,
    FakeUser,
    MessageVersion,
    RequestRecord,
    ResponseRecord,
)

__all__ = [
    "FakeAttachment",
    "FakeChannel",
    "FakeDiscord",
    "FakeGuild",
    "FakeInteraction",
    "FakeMessage",
    "FakeUser",
    "GatewaySession",
    "MessageVersion",
    "RequestRecord",
    "ResponseRecord",
]
