"""The fake Discord server against the real discord.py client: gateway, REST, interactions, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import zlib
from collections.abc import Awaitable, Callable

import aiohttp
import discord
import pytest
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bot.endpoints import use_discord_endpoints
from tests.fakediscord import FakeDiscord
from tests.polling import wait_until

INTENTS = discord.Intents(guilds=True, dm_messages=True, guild_messages=True)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.fixture
async def fake():
    async with FakeDiscord() as server:
        use_discord_endpoints(server.api_base, server.gateway_url)
        try:
            yield server
        finally:
            use_discord_endpoints(None, None)


def make_client() -> discord.Client:
    # guild_ready_timeout: how long discord.py waits for more GUILD_CREATEs before on_ready.
    return discord.Client(intents=INTENTS, guild_ready_timeout=0.05)


@contextlib.asynccontextmanager
async def running(
    client: discord.Client,
    fake: FakeDiscord,
    *,
    identify_count: int = 1,
    setup: Callable[[], Awaitable[object]] | None = None,
):
    """Log in, run setup (e.g. a command sync), connect and wait for on_ready; close afterwards."""
    await client.login(fake.bot_token)
    if setup is not None:
        await setup()
    task = asyncio.create_task(client.connect())
    try:
        await fake.wait_connected(identify_count=identify_count)
        await asyncio.wait_for(client.wait_until_ready(), 5)
        yield client
    finally:
        await client.close()
        await asyncio.wait_for(task, 5)


def user_messages(client: discord.Client) -> asyncio.Queue[discord.Message]:
    """Queue of the messages the client receives from anyone but itself."""
    queue: asyncio.Queue[discord.Message] = asyncio.Queue()

    @client.event
    async def on_message(message: discord.Message) -> None:
        if message.author != client.user:
            queue.put_nowait(message)

    return queue


class RetryView(discord.ui.View):
    """A persistent view: no timeout, fixed custom_id, so it works on messages sent before a restart."""

    def __init__(self, pressed: asyncio.Queue[discord.Interaction]) -> None:
        super().__init__(timeout=None)
        self.pressed = pressed

    @discord.ui.button(label="Try again", custom_id="avatar:retry", style=discord.ButtonStyle.primary)
    async def retry(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        self.pressed.put_nowait(interaction)
        await interaction.response.edit_message(content="Trying again…", view=None)


def test_use_discord_endpoints_points_discord_py_elsewhere_and_back():
    original_base, original_gateway = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    use_discord_endpoints("http://127.0.0.1:9/api/v10/", "ws://127.0.0.1:9/gateway")
    try:
        assert Route("GET", "/users/@me").url == "http://127.0.0.1:9/api/v10/users/@me"
        assert DiscordWebSocket.DEFAULT_GATEWAY == yarl.URL("ws://127.0.0.1:9/gateway")
        with pytest.raises(ValueError, match="DISCORD_GATEWAY_URL"):
            use_discord_endpoints(None, "http://127.0.0.1:9/gateway")
        with pytest.raises(ValueError, match="DISCORD_API_BASE"):
            use_discord_endpoints("ws://127.0.0.1:9/api/v10", None)
    finally:
        use_discord_endpoints(None, None)
    assert (Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY) == (original_base, original_gateway)
    assert Route.BASE.startswith("https://discord.com/api/")


async def test_client_connects_and_sees_ready_and_the_guild(fake):
    client = make_client()
    async with running(client, fake):
        assert client.user.id == fake.bot_user.id
        assert client.application_id == fake.application_id
        guild = client.get_guild(fake.guild.id)
        assert guild is not None and guild.name == "Test Guild"
        assert [c.name for c in guild.text_channels] == ["general"]
        assert fake.session.intents == INTENTS.value
    assert fake.identify_count == 1
    assert ("GET", "/users/@me", 200) in [(r.method, r.path, r.status) for r in fake.requests]
    assert fake.unknown_routes == []


async def test_wrong_token_is_refused(fake):
    client = make_client()
    with pytest.raises(discord.LoginFailure):
        await client.login("not-the-token")
    await client.close()
    assert fake.requests[-1].status == 401


async def test_raw_gateway_uncompressed_heartbeat_and_bad_identify(fake):
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(fake.gateway_url + "?v=10&encoding=json") as ws,
    ):
        hello = await ws.receive_json(timeout=5)
        assert hello == {"op": 10, "d": {"heartbeat_interval": 45000}}
        await ws.send_json({"op": 1, "d": None})
        assert await ws.receive_json(timeout=5) == {"op": 11}
        await ws.send_json({"op": 2, "d": {"token": "wrong", "intents": 1, "properties": {}}})
        closing = await ws.receive(timeout=5)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4004
    assert fake.identify_count == 0


async def test_raw_gateway_identify_and_clean_close_ends_the_session(fake):
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(fake.gateway_url + "?v=10&encoding=json") as ws,
    ):
        await ws.receive_json(timeout=5)
        await ws.send_json({"op": 2, "d": {"token": fake.bot_token, "intents": 1, "properties": {}}})
        ready, guild_create = await ws.receive_json(timeout=5), await ws.receive_json(timeout=5)
        assert (ready["t"], ready["s"], guild_create["t"], guild_create["s"]) == (
            "READY",
            1,
            "GUILD_CREATE",
            2,
        )
        assert ready["d"]["user"]["id"] == str(fake.bot_user.id)
        assert ready["d"]["guilds"] == [{"id": str(fake.guild.id), "unavailable": True}]
        assert guild_create["d"]["channels"][0]["name"] == "general"
        session = fake.session
        await ws.close(code=1000)
    await fake.wait_for(lambda: session.invalidated)
    assert fake.session is None


async def test_gateway_url_is_served_for_sharded_clients(fake):
    headers = {"Authorization": f"Bot {fake.bot_token}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(fake.api_base + "/gateway/bot") as response:
            body = await response.json()
    assert (body["url"], body["shards"]) == (fake.gateway_url, 1)


async def test_gateway_frames_are_a_zlib_stream_when_asked(fake):
    url = fake.gateway_url + "?v=10&encoding=json&compress=zlib-stream"
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        inflate = zlib.decompressobj()
        for expected in ({"op": 10, "d": {"heartbeat_interval": 45000}}, {"op": 11}):
            if expected["op"] == 11:
                await ws.send_json({"op": 1, "d": None})
            frame = await ws.receive_bytes(timeout=5)
            assert frame.endswith(b"\x00\x00\xff\xff")
            assert json.loads(inflate.decompress(frame)) == expected


async def test_client_heartbeats_are_acknowledged():
    async with FakeDiscord(heartbeat_interval=0.05) as fake:
        use_discord_endpoints(fake.api_base, fake.gateway_url)
        try:
            client = make_client()
            async with running(client, fake):
                await fake.wait_for(lambda: fake.session.heartbeats >= 3)
                await fake.wait_for(lambda: math.isfinite(client.latency))
        finally:
            use_discord_endpoints(None, None)


async def test_dm_with_attachment_arrives_and_can_be_read(fake):
    client = make_client()
    received = user_messages(client)
    alice = fake.add_user("alice")
    async with running(client, fake):
        sent = await fake.send_dm(alice, "my selfie", attachments=[("me.png", PNG, "image/png")])
        message = await asyncio.wait_for(received.get(), 5)
        assert (message.id, message.author.id, message.content) == (sent.id, alice.id, "my selfie")
        assert isinstance(message.channel, discord.DMChannel)
        [attachment] = message.attachments
        assert (attachment.filename, attachment.content_type, attachment.size) == (
            "me.png",
            "image/png",
            len(PNG),
        )
        assert await attachment.read() == PNG
    assert fake.unknown_routes == []


async def test_dm_events_need_the_direct_messages_intent(fake):
    client = discord.Client(
        intents=discord.Intents(guilds=True, guild_messages=True), guild_ready_timeout=0.05
    )
    alice = fake.add_user("alice")
    async with running(client, fake):
        await fake.send_dm(alice, "hello?")
        assert [e["t"] for e in fake.session.events] == ["READY", "GUILD_CREATE"]


@pytest.mark.parametrize("in_guild", [False, True], ids=["dm", "guild"])
async def test_slash_command_defer_then_followup_file(fake, in_guild):
    client = make_client()
    tree = app_commands.CommandTree(client)
    calls: asyncio.Queue[tuple[discord.Interaction, str, int]] = asyncio.Queue()

    @tree.command(description="Make pictures of you")
    async def imagine(interaction: discord.Interaction, prompt: str, count: int = 1) -> None:
        calls.put_nowait((interaction, prompt, count))
        await interaction.response.defer()
        await interaction.followup.send("Here you go", file=discord.File(io.BytesIO(PNG), "avatar.png"))

    alice = fake.add_user("alice")
    async with running(client, fake, setup=tree.sync):
        [registered] = fake.commands()
        assert registered["name"] == "imagine"
        assert [(o["name"], o["type"]) for o in registered["options"]] == [("prompt", 3), ("count", 4)]
        record = await fake.invoke_command(
            alice, "imagine", {"prompt": "a cat", "count": "2"}, in_guild=in_guild
        )
        interaction, prompt, count = await asyncio.wait_for(calls.get(), 5)
        assert (prompt, count) == ("a cat", 2)
        assert interaction.user.id == alice.id
        assert interaction.guild_id == (fake.guild.id if in_guild else None)
        await fake.wait_for(lambda: record.followups)

    assert [(r.kind, r.type) for r in record.responses] == [("callback", 5), ("followup", None)]
    [followup] = record.followups
    assert followup.content == "Here you go"
    assert [(a.filename, a.data) for a in followup.attachments] == [("avatar.png", PNG)]
    expected_channel = fake.guild_channel if in_guild else fake.dm_channel_of(alice)
    assert followup in fake.messages_in(expected_channel)
    assert record.original.flags & 128  # the "thinking…" placeholder a deferral leaves
    with pytest.raises(LookupError, match="no options"):
        await fake.invoke_command(alice, "imagine", {"prompt": "x", "size": 3})
    assert fake.unknown_routes == []


async def test_guild_command_with_attachment_option_and_ephemeral_reply(fake):
    client = make_client()
    tree = app_commands.CommandTree(client)
    guild = discord.Object(fake.guild.id)

    @tree.command(description="Add a photo", guild=guild)
    async def photo(interaction: discord.Interaction, image: discord.Attachment, private: bool) -> None:
        data = await image.read()
        await interaction.response.send_message(f"{image.filename}: {len(data)} bytes", ephemeral=private)

    bob = fake.add_user("bob")
    async with running(client, fake, setup=lambda: tree.sync(guild=guild)):
        assert fake.commands() == [] and [c["name"] for c in fake.commands(guild=True)] == ["photo"]
        command_id = fake.commands(guild=True)[0]["id"]
        await tree.sync(guild=guild)
        assert fake.commands(guild=True)[0]["id"] == command_id  # a bulk overwrite keeps ids

        image = ("face.png", PNG, "image/png")
        record = await fake.invoke_command(bob, "photo", {"image": image, "private": True}, in_guild=True)
        reply = await fake.wait_for(lambda: record.original)
        channel = client.get_channel(fake.guild_channel.id)
        with pytest.raises(discord.NotFound):
            await channel.fetch_message(reply.id)
        with pytest.raises(TypeError):
            await fake.invoke_command(bob, "photo", {"image": image, "private": "no"}, in_guild=True)
    assert record.callback_type == 4
    assert reply.content == f"face.png: {len(PNG)} bytes"
    assert reply.ephemeral


async def test_user_options_member_permissions_and_default_permissions(fake):
    """A user option arrives resolved (as a Member in the guild, a User in a DM); the member's own
    permissions come with the interaction; a command needing Manage Server is offered in the guild
    only to those who have it (or Administrator, or the owner), and in DMs to anyone."""
    client = make_client()
    tree = app_commands.CommandTree(client)
    seen: list[tuple[str, int, bool]] = []

    @tree.command(description="Look someone up")
    @app_commands.default_permissions(manage_guild=True)
    async def whois(interaction: discord.Interaction, user: discord.User) -> None:
        seen.append((type(user).__name__, user.id, interaction.permissions.manage_guild))
        await interaction.response.send_message(user.name, ephemeral=True)

    bob, mona, ada = fake.add_user("bob"), fake.add_user("mona"), fake.add_user("ada")
    fake.grant(mona, 1 << 5)  # Manage Server
    fake.grant(ada, 1 << 3)  # Administrator
    async with running(client, fake, setup=tree.sync):
        assert fake.commands()[0]["default_member_permissions"] == str(1 << 5)
        with pytest.raises(PermissionError):
            await fake.invoke_command(bob, "whois", {"user": mona}, in_guild=True)
        for person in (mona, ada, fake.guild.owner):
            record = await fake.invoke_command(person, "whois", {"user": bob}, in_guild=True)
            await fake.wait_for(lambda record=record: record.original)
        record = await fake.invoke_command(bob, "whois", {"user": mona})
        await fake.wait_for(lambda: record.original)
    assert record.original.content == "mona"
    assert seen == [("Member", bob.id, True), ("Member", bob.id, True), ("Member", bob.id, True),
                    ("User", mona.id, False)]


async def test_persistent_view_button_press_reaches_the_callback(fake):
    client = make_client()
    pressed: asyncio.Queue[discord.Interaction] = asyncio.Queue()
    alice = fake.add_user("alice")
    async with running(client, fake):
        user = await client.fetch_user(alice.id)
        sent = await user.send("Training failed.", view=RetryView(pressed))
        message = fake.message(sent.id)
        assert [b["custom_id"] for b in message.buttons] == ["avatar:retry"]

        record = await fake.press_button(alice, message.id, "avatar:retry")
        interaction = await asyncio.wait_for(pressed.get(), 5)
        assert (interaction.user.id, interaction.message.id) == (alice.id, message.id)
        await fake.wait_for(lambda: message.edited)

    assert record.callback_type == 7
    assert [v.content for v in message.history] == ["Training failed.", "Trying again…"]
    assert message.components == []
    with pytest.raises(LookupError, match="no button"):
        await fake.press_button(alice, message, "avatar:retry")


class ShapeMenu(discord.ui.View):
    def __init__(self, chosen: asyncio.Queue[list[str]]) -> None:
        super().__init__(timeout=None)
        self.chosen = chosen

    @discord.ui.select(custom_id="avatar:shape", placeholder="Shape",
                       options=[discord.SelectOption(label=s, value=s) for s in ("square", "portrait")])
    async def shape(self, interaction: discord.Interaction, select: discord.ui.Select) -> None:
        await self.chosen.put(select.values)
        await interaction.response.edit_message(content=f"Shape: {select.values[0]}", view=self)


async def test_a_string_select_choice_reaches_the_callback_with_its_values(fake):
    client = make_client()
    chosen: asyncio.Queue[list[str]] = asyncio.Queue()
    alice = fake.add_user("alice")
    async with running(client, fake):
        user = await client.fetch_user(alice.id)
        sent = await user.send("Pick a shape", view=ShapeMenu(chosen))
        message = fake.message(sent.id)
        [menu] = message.selects
        assert (menu["type"], menu["placeholder"]) == (3, "Shape")

        record = await fake.choose(alice, message, "avatar:shape", ["portrait"])
        assert await asyncio.wait_for(chosen.get(), 5) == ["portrait"]
        await fake.wait_for(lambda: message.content == "Shape: portrait")
        assert record.callback_type == 7 and record.data["component_type"] == 3
        # What a person cannot pick in Discord's menu, a test cannot either.
        with pytest.raises(ValueError, match="offers"):
            await fake.choose(alice, message, "avatar:shape", ["round"])
        with pytest.raises(ValueError, match="1 to 1 values"):
            await fake.choose(alice, message, "avatar:shape", ["square", "portrait"])
        with pytest.raises(LookupError, match="no select menu"):
            await fake.choose(alice, message, "avatar:size", ["square"])


async def test_message_edits_with_bot_token_keep_history_and_files(fake):
    client = make_client()
    alice = fake.add_user("alice")
    async with running(client, fake):
        user = await client.fetch_user(alice.id)
        sent = await user.send("Training: 0%")
        sent = await sent.edit(
            content="Training: 50%", attachments=[discord.File(io.BytesIO(PNG), "preview.png")]
        )
        sent = await sent.edit(content="Training: done")

    message = fake.message(sent.id)
    assert [v.content for v in message.history] == ["Training: 0%", "Training: 50%", "Training: done"]
    assert [[a.filename for a in v.attachments] for v in message.history] == [
        [],
        ["preview.png"],
        ["preview.png"],
    ]
    assert message.attachments[0].data == PNG
    assert [v.at for v in message.history] == sorted(v.at for v in message.history)
    assert [r.method for r in fake.requests_to("PATCH", r"/channels/\d+/messages/\d+")] == ["PATCH", "PATCH"]
    assert fake.bot_messages_to(alice) == [message]


async def test_rate_limited_send_is_retried_and_lands_once(fake):
    client = make_client()
    alice = fake.add_user("alice")
    async with running(client, fake):
        user = await client.fetch_user(alice.id)
        fake.rate_limit_next("POST", r"/channels/\d+/messages", retry_after=0.2)
        await user.send("Your model is ready")

    sends = fake.requests_to("POST", r"/channels/\d+/messages")
    assert [r.status for r in sends] == [429, 200]
    assert [m.content for m in fake.bot_messages_to(alice)] == ["Your model is ready"]
    assert sends[1].body["content"] == "Your model is ready"


async def test_restarted_client_handles_buttons_on_old_messages(fake):
    alice = fake.add_user("alice")
    first = make_client()
    async with running(first, fake):
        user = await first.fetch_user(alice.id)
        sent = await user.send("Training failed.", view=RetryView(asyncio.Queue()))
    await fake.wait_for(lambda: fake.session is None)

    second = make_client()
    pressed: asyncio.Queue[discord.Interaction] = asyncio.Queue()
    second.add_view(RetryView(pressed))
    async with running(second, fake, identify_count=2):
        await fake.press_button(alice, sent.id, "avatar:retry")
        interaction = await asyncio.wait_for(pressed.get(), 5)
        assert interaction.message.id == sent.id
        await fake.wait_for(lambda: fake.message(sent.id).edited)
    assert fake.message(sent.id).content == "Trying again…"


async def test_resumed_session_gets_the_events_it_missed(fake):
    client = make_client()
    received = user_messages(client)
    alice = fake.add_user("alice")
    async with running(client, fake):
        session = fake.session
        await fake.disconnect_bot(resumable=True)
        await fake.send_dm(alice, "sent while you were away")
        message = await asyncio.wait_for(received.get(), 5)
        assert message.content == "sent while you were away"
        assert fake.session is session and session.resumes == 1
    assert fake.identify_count == 1


async def test_subcommand_reply_lands_in_the_dm(fake):
    client = make_client()
    tree = app_commands.CommandTree(client)
    photos = app_commands.Group(name="photos", description="Your photos")

    @photos.command(description="Forget your photos")
    async def clear(interaction: discord.Interaction, keep: int) -> None:
        await interaction.response.send_message(f"Deleted all but {keep}.")

    tree.add_command(photos)
    alice = fake.add_user("alice")
    async with running(client, fake, setup=tree.sync):
        await fake.invoke_command(alice, "photos clear", {"keep": 3})
        reply = await fake.wait_for_message(fake.dm_channel_of(alice), lambda m: m.from_bot)
    assert reply.content == "Deleted all but 3."
    assert reply.interaction.data["options"] == [
        {"name": "clear", "type": 1, "options": [{"name": "keep", "type": 4, "value": 3}]}
    ]


class QuickReidentifyClient(discord.Client):
    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """discord.py's default sleeps 5 s before every IDENTIFY but the first."""


async def test_invalid_session_makes_the_client_identify_again(fake):
    client = QuickReidentifyClient(intents=INTENTS, guild_ready_timeout=0.05)
    received = user_messages(client)
    alice = fake.add_user("alice")
    async with running(client, fake):
        await fake.disconnect_bot(resumable=False)
        await fake.wait_connected(identify_count=2)
        await fake.send_dm(alice, "hello again")
        assert (await asyncio.wait_for(received.get(), 5)).content == "hello again"


async def test_discord_rules_are_enforced_and_unknown_routes_recorded(fake):
    client = make_client()
    alice = fake.add_user("alice")
    closed = fake.add_user("closed", accepts_dms=False)
    async with running(client, fake):
        user = await client.fetch_user(alice.id)
        with pytest.raises(discord.HTTPException) as too_long:
            await user.send("x" * 2001)
        assert (too_long.value.status, too_long.value.code) == (400, 50035)
        with pytest.raises(discord.Forbidden) as dms_closed:
            await (await client.fetch_user(closed.id)).send("hi")
        assert dms_closed.value.code == 50007
        with pytest.raises(discord.NotFound):
            await client.http.request(Route("GET", "/guilds/{guild_id}/audit-logs", guild_id=fake.guild.id))
        alice_says = await fake.send_dm(alice, "hi")
        dm = await user.create_dm()
        with pytest.raises(discord.Forbidden):
            await dm.get_partial_message(alice_says.id).edit(content="edited by the bot")
        ok = await user.send("fine")
        await ok.add_reaction("✅")
        await ok.delete()
        assert (await client.fetch_channel(dm.id)).recipient.id == alice.id
        await dm.typing()
        fake.attachment_size_limit = 100
        with pytest.raises(discord.HTTPException) as too_big:
            await dm.send(file=discord.File(io.BytesIO(PNG), "big.png"))
        assert (too_big.value.status, too_big.value.code) == (413, 40005)

    assert [(r.method, r.path) for r in fake.unknown_routes] == [
        ("GET", f"/guilds/{fake.guild.id}/audit-logs")
    ]
    assert [r.status for r in fake.requests_to("POST", r"/channels/\d+/typing")] == [204]
    assert [m.content for m in fake.bot_messages_to(alice)] == []
    deleted = fake.messages_in(fake.dm_channel_of(alice), include_deleted=True)[-1]
    assert (deleted.content, deleted.reactions, deleted.deleted) == ("fine", ["✅"], True)
    assert fake.messages_in(fake.dm_channel_of(closed)) == []


async def test_expired_interaction_token_rejects_followups(fake):
    client = make_client()
    tree = app_commands.CommandTree(client)
    done: asyncio.Queue[BaseException | None] = asyncio.Queue()

    @tree.command(description="Train your model")
    async def train(interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True)
        fake.expire_interaction(record)
        try:
            await interaction.edit_original_response(content="50%")
        except discord.HTTPException as error:
            done.put_nowait(error)

    alice = fake.add_user("alice")
    async with running(client, fake, setup=tree.sync):
        record = await fake.invoke_command(alice, "train")
        error = await asyncio.wait_for(done.get(), 5)
    assert (error.status, error.code) == (401, 50027)
    assert [r.kind for r in record.responses] == ["callback"]
    assert record.original.ephemeral


async def test_servers_roles_and_members_as_the_client_sees_them(fake):
    """A second server, roles created before and after connecting, and members fetched through the
    API as Discord answers: with their roles, or 404 Unknown Member once they left."""
    alice, eve = fake.add_user("alice"), fake.add_outsider("eve")
    artists = fake.add_role("Artists")
    fake.give_role(alice, artists)
    client = make_client()
    async with running(client, fake):
        club = fake.add_guild("Photo Club")
        late = fake.add_role("Latecomers", guild=club)
        # Polled: the client's state changes after the fake's last change, which wakes no fake.wait_for.
        await wait_until(lambda: (g := client.get_guild(club.id)) is not None and g.get_role(late.id) is not None)
        fake.add_member(alice, guild=club, roles=[late])
        guild = client.get_guild(fake.guild.id)
        member = await guild.fetch_member(alice.id)
        assert [r.name for r in member.roles] == ["@everyone", "Artists"]
        in_club = await client.get_guild(club.id).fetch_member(alice.id)
        assert [r.name for r in in_club.roles] == ["@everyone", "Latecomers"]
        fake.take_role(alice, artists)
        assert [r.name for r in (await guild.fetch_member(alice.id)).roles] == ["@everyone"]
        with pytest.raises(discord.NotFound) as outside:
            await guild.fetch_member(eve.id)
        assert outside.value.code == 10007
        fake.remove_member(alice, guild=club)
        with pytest.raises(discord.NotFound):
            await client.get_guild(club.id).fetch_member(alice.id)
    assert fake.unknown_routes == []


async def test_an_interaction_in_a_server_carries_the_members_roles(fake):
    alice = fake.add_user("alice")
    role = fake.add_role("Members")
    fake.give_role(alice, role)
    client = make_client()
    tree = app_commands.CommandTree(client)
    seen: asyncio.Queue[list[str]] = asyncio.Queue()

    @tree.command(name="ping", description="Ping")
    async def ping(interaction: discord.Interaction) -> None:
        seen.put_nowait([r.name for r in interaction.user.roles])
        await interaction.response.send_message("pong", ephemeral=True)

    async with running(client, fake, setup=tree.sync):
        await fake.invoke_command(alice, "ping", in_guild=True)
        assert await asyncio.wait_for(seen.get(), 5) == ["@everyone", "Members"]
