"""FakeDiscord: a small Discord (REST + gateway) on 127.0.0.1 for end-to-end tests of a real bot.

It runs in the test's own event loop, next to the discord.py client under test:

    async with FakeDiscord() as fake:
        use_discord_endpoints(fake.api_base, fake.gateway_url)
        ... start the bot with fake.bot_token ...
        await fake.wait_connected()
        alice = fake.add_user("alice")
        await fake.send_dm(alice, attachments=[("me.jpg", data, "image/jpeg")])
        interaction = await fake.invoke_command(alice, "imagine", {"prompt": "a cat"})
        await fake.wait_for(lambda: interaction.followups)

Everything the bot did is kept for inspection: messages with every edit, interaction responses in
order, and the log of HTTP requests (with routes the fake does not know listed apart).
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from aiohttp import web

from .gateway import Gateway, GatewaySession
from .interactions import check_visible, command_data, interaction_payload, registered_command
from .models import (
    COMPONENT_BUTTON,
    COMPONENT_STRING_SELECT,
    INTERACTION_APPLICATION_COMMAND,
    INTERACTION_MESSAGE_COMPONENT,
    INTERACTION_MODAL_SUBMIT,
    FakeAttachment,
    FakeChannel,
    FakeGuild,
    FakeInteraction,
    FakeMessage,
    FakeRole,
    FakeUser,
    RateLimitRule,
    RequestRecord,
)
from .rest import API_PREFIX, UNKNOWN_ROUTE, RestApi
from .world import World

log = logging.getLogger(__name__)

GATEWAY_PATH = "/gateway"

FileSpec = tuple[str, bytes, str | None]


class FakeDiscord:
    """The fake server and the test-facing API to act as users and inspect what the bot did."""

    def __init__(
        self,
        *,
        heartbeat_interval: float = 45.0,
        bot_name: str = "avatar-bot",
        guild_name: str = "Test Guild",
        bot_token: str = "fake-bot-token",
    ) -> None:
        self.bot_token = bot_token
        self._heartbeat_interval = heartbeat_interval
        self._bot_name = bot_name
        self._guild_name = guild_name
        self._runner: web.AppRunner | None = None
        self._world: World | None = None
        self._gateway: Gateway | None = None
        self.base_url = ""

    # lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1 (bound first, since URLs in payloads name the port)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._world = World(self.base_url, bot_name=self._bot_name, guild_name=self._guild_name)
        self._gateway = Gateway(
            self._world,
            token=self.bot_token,
            heartbeat_interval=self._heartbeat_interval,
            ready_payload=self._ready_payload,
            guild_payloads=lambda: [guild.payload() for guild in self.world.guilds],
        )
        self._world.publish = self._gateway.dispatch
        rest = RestApi(self._world, token=self.bot_token, gateway_url=self.gateway_url)
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[rest.middleware])
        app.router.add_get(GATEWAY_PATH, self._gateway.handle)
        app.router.add_routes(rest.routes())
        app.router.add_route("*", "/{tail:.*}", rest.unknown_route, name=UNKNOWN_ROUTE)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        log.debug("fake Discord listening on %s", self.base_url)

    async def close(self) -> None:
        if self._gateway is not None:
            await self._gateway.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def world(self) -> World:
        if self._world is None:
            raise RuntimeError("FakeDiscord is not started; use `async with FakeDiscord() as fake`")
        return self._world

    @property
    def gateway(self) -> Gateway:
        if self._gateway is None:
            raise RuntimeError("FakeDiscord is not started; use `async with FakeDiscord() as fake`")
        return self._gateway

    # addresses and fixed objects -----------------------------------------------------------

    @property
    def api_base(self) -> str:
        """What DISCORD_API_BASE should be, e.g. http://127.0.0.1:PORT/api/v10."""
        return self.base_url + API_PREFIX

    @property
    def gateway_url(self) -> str:
        """What DISCORD_GATEWAY_URL should be, e.g. ws://127.0.0.1:PORT/gateway."""
        return self.base_url.replace("http://", "ws://", 1) + GATEWAY_PATH

    @property
    def application_id(self) -> int:
        return self.world.application_id

    @property
    def bot_user(self) -> FakeUser:
        return self.world.bot_user

    @property
    def guild(self) -> FakeGuild:
        return self.world.guild

    @property
    def guild_channel(self) -> FakeChannel:
        """The guild's #general text channel."""
        return self.guild.channels[0]

    @property
    def attachment_size_limit(self) -> int:
        return self.world.attachment_size_limit

    @attachment_size_limit.setter
    def attachment_size_limit(self, value: int) -> None:
        self.world.attachment_size_limit = value

    def _ready_payload(self, session: GatewaySession) -> dict[str, Any]:
        return {
            "v": 10,
            "user": self.bot_user.payload() | {"verified": True, "mfa_enabled": False},
            "guilds": [{"id": str(guild.id), "unavailable": True} for guild in self.world.guilds],
            "session_id": session.id,
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
        }

    # users ---------------------------------------------------------------------------------

    def add_user(self, name: str, *, accepts_dms: bool = True) -> FakeUser:
        """A person who is a member of the test guild and can DM the bot."""
        user = self.world.new_user(name, accepts_dms=accepts_dms)
        self.guild.members.append(user)
        return user

    def grant(self, user: FakeUser, permissions: int) -> None:
        """Give a member of the test guild these permissions too (e.g. models.MANAGE_GUILD)."""
        self.guild.granted[user.id] = self.guild.granted.get(user.id, 0) | permissions

    def add_outsider(self, name: str) -> FakeUser:
        """A person who shares no server with the bot (they found it elsewhere) and can DM it."""
        return self.world.new_user(name)

    # servers, roles, members ---------------------------------------------------------------

    def add_guild(self, name: str, *, owner: FakeUser | None = None) -> FakeGuild:
        """Another server the bot has joined (a connected bot gets its GUILD_CREATE)."""
        return self.world.new_guild(name, owner or self.world.owner)

    def add_role(self, name: str, *, guild: FakeGuild | None = None) -> FakeRole:
        """A new role of the server (the test guild by default); a connected bot gets GUILD_ROLE_CREATE."""
        return self.world.new_role(guild or self.guild, name)

    def add_member(self, user: FakeUser, *, guild: FakeGuild | None = None, roles: Iterable[FakeRole] = ()) -> None:
        """Make user a member of the server, with the given roles. Like Discord without the
        privileged members intent, the bot is sent no event: it learns it from the API."""
        target = guild or self.guild
        if user not in target.members:
            target.members.append(user)
        target.member_roles[user.id] = list(roles)
        self.world.notify()

    def remove_member(self, user: FakeUser, *, guild: FakeGuild | None = None) -> None:
        """The person leaves (or is kicked from) the server."""
        target = guild or self.guild
        target.members.remove(user)
        target.member_roles.pop(user.id, None)
        self.world.notify()

    def give_role(self, user: FakeUser, role: FakeRole, *, guild: FakeGuild | None = None) -> None:
        target = guild or self.guild
        if role not in target.member_roles.setdefault(user.id, []):
            target.member_roles[user.id].append(role)
        self.world.notify()

    def take_role(self, user: FakeUser, role: FakeRole, *, guild: FakeGuild | None = None) -> None:
        target = guild or self.guild
        target.member_roles[user.id] = [r for r in target.member_roles.get(user.id, []) if r is not role]
        self.world.notify()

    def dm_channel_of(self, user: FakeUser) -> FakeChannel:
        return self.world.dm_channel(user)

    # gateway -------------------------------------------------------------------------------

    @property
    def session(self) -> GatewaySession | None:
        """The bot's connected gateway session, if any."""
        return self.gateway.current

    @property
    def identify_count(self) -> int:
        """How many times a client has IDENTIFYed (a RESUME does not count)."""
        return self.gateway.identify_count

    async def wait_connected(self, *, identify_count: int = 1, timeout: float = 5.0) -> GatewaySession:
        """Wait until `identify_count` IDENTIFYs were answered and a session is connected.

        READY and GUILD_CREATE are sent by then; the client's on_ready follows after its
        guild_ready_timeout. After a restart, pass identify_count=2 to wait for the new client.
        """
        return await self.wait_for(
            lambda: self.gateway.identify_count >= identify_count and self.session, timeout=timeout
        )

    async def disconnect_bot(self, *, resumable: bool = True) -> None:
        """Close the bot's gateway socket. It may RESUME if resumable, else it must IDENTIFY anew."""
        await self.gateway.disconnect(resumable=resumable)

    def _require_connected(self) -> None:
        """Events need a gateway session; one whose socket dropped gets them when it resumes."""
        if not self.gateway.live_sessions:
            raise RuntimeError("no bot has a gateway session; await fake.wait_connected() first")

    # acting as users -----------------------------------------------------------------------

    async def send_dm(
        self, user: FakeUser, content: str = "", attachments: Iterable[FileSpec] = ()
    ) -> FakeMessage:
        """A DM from user to the bot; attachments are (filename, bytes, content_type) triples."""
        self._require_connected()
        files = [self.world.store_file(name, data, content_type) for name, data, content_type in attachments]
        return self.world.create_message(self.dm_channel_of(user), user, content=content, attachments=files)

    async def invoke_command(
        self,
        user: FakeUser,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        in_guild: bool = False,
        channel: FakeChannel | None = None,
    ) -> FakeInteraction:
        """Run a registered slash command as user, in their DM with the bot or in a guild channel.

        name may be "group sub" for subcommands. Option values are converted to the types the
        registered command declares; an attachment option takes a (filename, bytes, content_type), a
        user option a FakeUser. In the guild, a command whose default permissions the user lacks
        raises PermissionError: Discord would not offer it to them.
        """
        self._require_connected()
        channel = channel or (self.guild_channel if in_guild else self.dm_channel_of(user))
        command_name, *path = name.split()
        command = registered_command(self.world, command_name, channel.guild)
        check_visible(command, user, channel.guild)
        data = command_data(self.world, command, path, dict(options or {}), channel.guild)
        return self._dispatch_interaction(INTERACTION_APPLICATION_COMMAND, user, channel, data)

    async def press_button(
        self, user: FakeUser, message: FakeMessage | int, custom_id: str
    ) -> FakeInteraction:
        """Click the button with custom_id on a message; it must exist there and be enabled."""
        self._require_connected()
        target = message if isinstance(message, FakeMessage) else self.message(message)
        button = target.button(custom_id)
        if button.get("disabled"):
            raise ValueError(f"button {custom_id!r} on message {target.id} is disabled")
        data = {"custom_id": custom_id, "component_type": COMPONENT_BUTTON}
        return self._dispatch_interaction(
            INTERACTION_MESSAGE_COMPONENT, user, target.channel, data, message=target
        )

    async def choose(
        self, user: FakeUser, message: FakeMessage | int, custom_id: str, values: Sequence[str]
    ) -> FakeInteraction:
        """Pick `values` in the string select menu with custom_id on a message, as a person would: the
        menu must be enabled, and the values among its options, as many as it allows."""
        self._require_connected()
        target = message if isinstance(message, FakeMessage) else self.message(message)
        menu = target.select(custom_id)
        if menu.get("disabled"):
            raise ValueError(f"select menu {custom_id!r} on message {target.id} is disabled")
        offered = [option["value"] for option in menu.get("options", [])]
        if unknown := [value for value in values if value not in offered]:
            raise ValueError(f"select menu {custom_id!r} offers {offered}, not {unknown}")
        low, high = menu.get("min_values", 1), menu.get("max_values", 1)
        if not low <= len(values) <= high:
            raise ValueError(f"select menu {custom_id!r} takes {low} to {high} values, not {len(values)}")
        data = {"custom_id": custom_id, "component_type": COMPONENT_STRING_SELECT, "values": list(values)}
        return self._dispatch_interaction(
            INTERACTION_MESSAGE_COMPONENT, user, target.channel, data, message=target
        )

    async def submit_modal(
        self, user: FakeUser, opened_by: FakeInteraction, values: Mapping[str, str]
    ) -> FakeInteraction:
        """Fill in and submit the modal the bot answered `opened_by` with; values go by text input label."""
        self._require_connected()
        modal = next((r.payload["data"] for r in opened_by.responses if r.type == 9), None)
        if modal is None:
            raise LookupError(f"interaction {opened_by.id} was not answered with a modal")
        rows = []
        for row in modal.get("components", []):
            inputs = []
            for field in row.get("components", []):
                label = field.get("label")
                if label not in values and field.get("required", True):
                    raise ValueError(f"the modal's required field {label!r} has no value")
                # Discord's form lets no more (nor fewer, once typed in) characters through than the field allows.
                value = values.get(label, "")
                if len(value) > field.get("max_length", 4000) or (value and len(value) < field.get("min_length", 0)):
                    raise ValueError(f"{len(value)} characters do not fit the modal's field {label!r}")
                inputs.append({"type": field["type"], "custom_id": field["custom_id"], "value": value})
            rows.append({"type": row["type"], "components": inputs})
        data = {"custom_id": modal["custom_id"], "components": rows}
        return self._dispatch_interaction(
            INTERACTION_MODAL_SUBMIT, user, opened_by.channel, data, message=opened_by.message
        )

    def expire_interaction(self, interaction: FakeInteraction) -> None:
        """Make the interaction's token invalid, as Discord does after 15 minutes."""
        interaction.expired = True

    def _dispatch_interaction(
        self,
        kind: int,
        user: FakeUser,
        channel: FakeChannel,
        data: dict[str, Any],
        *,
        message: FakeMessage | None = None,
    ) -> FakeInteraction:
        world = self.world
        interaction = FakeInteraction(
            id=world.ids.next(),
            token=world.new_interaction_token(),
            type=kind,
            user=user,
            channel=channel,
            data=data,
            message=message,
        )
        world.interactions[interaction.id] = interaction
        self.gateway.dispatch("INTERACTION_CREATE", interaction_payload(world, interaction), 0)
        world.notify()
        return interaction

    # injected failures ---------------------------------------------------------------------

    def rate_limit_next(
        self, method: str, path_regex: str, *, retry_after: float = 0.3, times: int = 1
    ) -> RateLimitRule:
        """Answer the next `times` requests matching method and path (re.fullmatch on the path
        after /api/v10, e.g. r"/channels/\\d+/messages") with HTTP 429 and retry_after seconds."""
        rule = RateLimitRule(method.upper(), re.compile(path_regex), retry_after, times)
        self.world.rate_limits.append(rule)
        return rule

    # inspection ----------------------------------------------------------------------------

    def message(self, message_id: int) -> FakeMessage:
        try:
            return self.world.messages[message_id]
        except KeyError:
            raise LookupError(f"no message {message_id}") from None

    def messages_in(self, channel: FakeChannel | int, *, include_deleted: bool = False) -> list[FakeMessage]:
        """Messages in a channel, oldest first, ephemeral ones included (see FakeMessage.ephemeral)."""
        target = channel if isinstance(channel, FakeChannel) else self.world.channels[channel]
        return [m for m in target.messages if include_deleted or not m.deleted]

    def bot_messages_to(self, user: FakeUser) -> list[FakeMessage]:
        """What the bot has said in its DM with user, oldest first."""
        return [m for m in self.messages_in(self.dm_channel_of(user)) if m.from_bot]

    def file(self, attachment_id: int) -> FakeAttachment:
        return self.world.attachments[attachment_id]

    def commands(self, *, guild: bool = False) -> list[dict[str, Any]]:
        """The registered slash commands: global ones, or the test guild's with guild=True."""
        return list(self.world.commands.get(self.guild.id if guild else None, []))

    @property
    def interactions(self) -> list[FakeInteraction]:
        return list(self.world.interactions.values())

    @property
    def requests(self) -> list[RequestRecord]:
        return list(self.world.requests)

    @property
    def unknown_routes(self) -> list[RequestRecord]:
        return list(self.world.unknown_routes)

    def requests_to(self, method: str, path_regex: str) -> list[RequestRecord]:
        pattern = re.compile(path_regex)
        return [r for r in self.world.requests if r.method == method.upper() and pattern.fullmatch(r.path)]

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Wait until predicate() is truthy and return its value; it is re-checked on every change
        the fake sees (requests, messages, edits, interaction responses, gateway sessions)."""
        return await self.world.wait_for(predicate, timeout)

    async def wait_for_message(
        self,
        channel: FakeChannel | int,
        predicate: Callable[[FakeMessage], bool] = lambda message: True,
        *,
        timeout: float = 5.0,
    ) -> FakeMessage:
        """The first (oldest) message in channel matching predicate, once there is one."""
        return await self.wait_for(
            lambda: next((m for m in self.messages_in(channel) if predicate(m)), None), timeout=timeout
        )
