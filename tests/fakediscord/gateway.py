"""The fake gateway: the websocket a discord.py client keeps open to receive events.

It speaks gateway v10 with JSON encoding, plain or with zlib-stream transport compression (what
discord.py asks for when the zstandard module is absent): HELLO, IDENTIFY -> READY + GUILD_CREATE,
heartbeats, RESUME with replay of missed events, INVALID_SESSION for sessions it no longer knows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from .models import INTENT_GUILDS
from .world import World

log = logging.getLogger(__name__)

OP_DISPATCH = 0
OP_HEARTBEAT = 1
OP_IDENTIFY = 2
OP_PRESENCE_UPDATE = 3
OP_VOICE_STATE_UPDATE = 4
OP_RESUME = 6
OP_REQUEST_GUILD_MEMBERS = 8
OP_INVALID_SESSION = 9
OP_HELLO = 10
OP_HEARTBEAT_ACK = 11

CLOSE_UNKNOWN_OPCODE = 4001
CLOSE_DECODE_ERROR = 4002
CLOSE_AUTHENTICATION_FAILED = 4004
# Codes discord.py answers by reconnecting and trying to RESUME.
CLOSE_RECONNECT = 4000
CLOSE_SESSION_TIMED_OUT = 4009

SUPPORTED_COMPRESSION = (None, "zlib-stream")


class _Connection:
    """One websocket; frames go out through a queue so their order is the order they were sent."""

    def __init__(self, ws: web.WebSocketResponse, *, zlib_stream: bool) -> None:
        self.ws = ws
        self._deflate = zlib.compressobj() if zlib_stream else None
        self._outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.closed_by_server = False
        self.heartbeats = 0

    def send(self, frame: dict[str, Any]) -> None:
        self._outbox.put_nowait(frame)

    async def run_writer(self) -> None:
        while (frame := await self._outbox.get()) is not None:
            raw = json.dumps(frame, separators=(",", ":"))
            try:
                if self._deflate is None:
                    await self.ws.send_str(raw)
                else:
                    data = self._deflate.compress(raw.encode()) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
                    await self.ws.send_bytes(data)
            except ConnectionError:
                log.debug("fake gateway: socket closed while sending %s", frame.get("t") or frame["op"])
                return

    def stop_writer(self) -> None:
        self._outbox.put_nowait(None)

    async def close(self, code: int) -> None:
        self.closed_by_server = True
        await self.ws.close(code=code)


@dataclass(eq=False)
class GatewaySession:
    """A gateway session: survives a dropped socket so the client can RESUME it.

    events holds every dispatch with its sequence number, so a resume replays what was missed.
    """

    id: str
    intents: int
    seq: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    connection: _Connection | None = None
    invalidated: bool = False
    resumes: int = 0

    @property
    def connected(self) -> bool:
        return self.connection is not None

    @property
    def heartbeats(self) -> int:
        """Heartbeats received on the current socket."""
        return self.connection.heartbeats if self.connection is not None else 0

    def dispatch(self, event: str, data: dict[str, Any]) -> None:
        self.seq += 1
        frame = {"op": OP_DISPATCH, "t": event, "s": self.seq, "d": data}
        self.events.append(frame)
        if self.connection is not None:
            self.connection.send(frame)


class Gateway:
    """Accepts gateway websockets and delivers events to every live session of the bot."""

    def __init__(
        self,
        world: World,
        *,
        token: str,
        heartbeat_interval: float,
        ready_payload: Callable[[GatewaySession], dict[str, Any]],
        guild_payloads: Callable[[], list[dict[str, Any]]],
    ) -> None:
        self._world = world
        self._token = token
        self._heartbeat_interval_ms = int(heartbeat_interval * 1000)
        self._ready_payload = ready_payload
        self._guild_payloads = guild_payloads
        self.sessions: list[GatewaySession] = []
        self.identify_count = 0
        self._connections: set[_Connection] = set()

    @property
    def live_sessions(self) -> list[GatewaySession]:
        return [s for s in self.sessions if not s.invalidated]

    @property
    def current(self) -> GatewaySession | None:
        """The most recently identified session that is still connected."""
        return next((s for s in reversed(self.sessions) if s.connected and not s.invalidated), None)

    def dispatch(self, event: str, data: dict[str, Any], intent: int) -> None:
        """Send an event to every live session whose intents include `intent` (0: always)."""
        for session in self.live_sessions:
            if intent and not session.intents & intent:
                continue
            session.dispatch(event, data)

    async def disconnect(self, *, resumable: bool) -> None:
        """Drop the bot's sockets; when not resumable the sessions are forgotten too."""
        for session in self.live_sessions:
            connection = session.connection
            if not resumable:
                session.invalidated = True
            if connection is not None:
                await connection.close(CLOSE_RECONNECT if resumable else CLOSE_SESSION_TIMED_OUT)
        self._world.notify()

    async def close(self) -> None:
        for connection in list(self._connections):
            await connection.close(1001)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        compress = request.query.get("compress")
        encoding = request.query.get("encoding", "json")
        if encoding != "json" or compress not in SUPPORTED_COMPRESSION:
            log.error("fake gateway: unsupported encoding=%s compress=%s", encoding, compress)
            return web.json_response(
                {"message": f"unsupported encoding={encoding} compress={compress}"}, status=400
            )

        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        connection = _Connection(ws, zlib_stream=compress == "zlib-stream")
        self._connections.add(connection)
        writer = asyncio.create_task(connection.run_writer())
        connection.send({"op": OP_HELLO, "d": {"heartbeat_interval": self._heartbeat_interval_ms}})
        session: GatewaySession | None = None
        try:
            async for message in ws:
                frame = _decode(message)
                if frame is None:
                    await connection.close(CLOSE_DECODE_ERROR)
                    break
                session = await self._on_frame(connection, session, frame)
        finally:
            connection.stop_writer()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            self._connections.discard(connection)
            if session is not None and session.connection is connection:
                session.connection = None
                # A client that closes cleanly (1000/1001) ends its session, as on Discord.
                if not connection.closed_by_server and ws.close_code in (1000, 1001):
                    session.invalidated = True
            self._world.notify()
        return ws

    async def _on_frame(
        self, connection: _Connection, session: GatewaySession | None, frame: dict[str, Any]
    ) -> GatewaySession | None:
        op, data = frame.get("op"), frame.get("d")
        if op in (OP_IDENTIFY, OP_RESUME) and not isinstance(data, dict):
            await connection.close(CLOSE_DECODE_ERROR)
        elif op == OP_HEARTBEAT:
            connection.heartbeats += 1
            connection.send({"op": OP_HEARTBEAT_ACK})
            self._world.notify()
        elif op == OP_IDENTIFY:
            if data.get("token") != self._token:
                await connection.close(CLOSE_AUTHENTICATION_FAILED)
                return session
            session = self._identify(connection, int(data.get("intents", 0)))
        elif op == OP_RESUME:
            session = self._resume(connection, data)
        elif op in (OP_PRESENCE_UPDATE, OP_VOICE_STATE_UPDATE, OP_REQUEST_GUILD_MEMBERS):
            log.debug("fake gateway: ignoring op %s", op)
        else:
            await connection.close(CLOSE_UNKNOWN_OPCODE)
        return session

    def _identify(self, connection: _Connection, intents: int) -> GatewaySession:
        session = GatewaySession(id=secrets.token_hex(16), intents=intents, connection=connection)
        self.sessions.append(session)
        self.identify_count += 1
        session.dispatch("READY", self._ready_payload(session))
        if intents & INTENT_GUILDS:
            for guild in self._guild_payloads():
                session.dispatch("GUILD_CREATE", guild)
        self._world.notify()
        return session

    def _resume(self, connection: _Connection, data: dict[str, Any]) -> GatewaySession | None:
        session = next((s for s in self.live_sessions if s.id == data.get("session_id")), None)
        if session is None or data.get("token") != self._token:
            connection.send({"op": OP_INVALID_SESSION, "d": False})
            return None
        session.connection = connection
        session.resumes += 1
        last_seen = data.get("seq") or 0
        for frame in session.events:
            if frame["s"] > last_seen:
                connection.send(frame)
        session.dispatch("RESUMED", {})
        self._world.notify()
        return session


def _decode(message: Any) -> dict[str, Any] | None:
    """A client frame as a dict; None for anything that is not a JSON object in a text frame."""
    if message.type != WSMsgType.TEXT:
        return None
    try:
        frame = json.loads(message.data)
    except ValueError:
        return None
    return frame if isinstance(frame, dict) else None
