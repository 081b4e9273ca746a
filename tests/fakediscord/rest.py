"""The REST half of the fake Discord: the /api/v10 routes a discord.py bot calls, and served files.

Requests are checked the way Discord checks them where a bot could get it wrong (bot token, message
length, empty messages, file size, editing someone else's message, answering an interaction twice,
DMs to a user who closed them), and every request is logged. A route the fake does not know answers
404 and is recorded, so a test can assert the bot only used routes that exist.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mimetypes
import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .models import (
    CHANNEL_DM,
    FLAG_EPHEMERAL,
    FLAG_LOADING,
    INTERACTION_APPLICATION_COMMAND,
    MESSAGE_CHAT_INPUT_COMMAND,
    MESSAGE_DEFAULT,
    FakeAttachment,
    FakeChannel,
    FakeGuild,
    FakeInteraction,
    FakeMessage,
    RateLimitRule,
    RequestRecord,
)
from .world import World

log = logging.getLogger(__name__)

API_PREFIX = "/api/v10"
UNKNOWN_ROUTE = "unknown"
# Where a handler leaves the request's parsed JSON payload for the request log.
PAYLOAD_KEY = web.RequestKey("payload", object)
MAX_CONTENT_LENGTH = 2000
MAX_EMBEDS = 10
MAX_ATTACHMENTS = 10
MAX_ACTION_ROWS = 5  # a message's rows of components, and buttons in one row
MAX_ROW_ITEMS = 5
COMMAND_NAME = re.compile(r"^[-_\w]{1,32}$")


def json_response(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """JSON with the bare `application/json` content type: discord.py compares it exactly and
    would otherwise hand the bot a string."""
    return web.Response(
        body=json.dumps(body).encode(),
        status=status,
        headers={"Content-Type": "application/json"} | (headers or {}),
    )


class DiscordError(Exception):
    """An error answer in Discord's JSON shape ({message, code[, errors]})."""

    def __init__(self, status: int, code: int, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors

    def response(self) -> web.Response:
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors is not None:
            body["errors"] = self.errors
        return json_response(body, status=self.status)


def invalid_form(field: str, code: str, message: str) -> DiscordError:
    return DiscordError(
        400, 50035, "Invalid Form Body", {field: {"_errors": [{"code": code, "message": message}]}}
    )


def rate_limited_response(rule: RateLimitRule) -> web.Response:
    """A 429 with the headers discord.py reads; without `Via` it would take it for a Cloudflare ban."""
    headers = {
        "X-RateLimit-Limit": "5",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": f"{time.time() + rule.retry_after:.3f}",
        "X-RateLimit-Reset-After": f"{rule.retry_after:.3f}",
        "X-RateLimit-Bucket": hashlib.sha1(f"{rule.method} {rule.path.pattern}".encode()).hexdigest()[:16],
        "X-RateLimit-Scope": "user",
        "Retry-After": str(max(1, round(rule.retry_after))),
        "Via": "1.1 google",
    }
    body = {"message": "You are being rate limited.", "retry_after": rule.retry_after, "global": False}
    return json_response(body, status=429, headers=headers)


@dataclass(frozen=True)
class Upload:
    """A file part of a multipart request, files[index]."""

    index: int
    filename: str
    data: bytes


async def read_body(request: web.Request) -> tuple[Any, list[Upload]]:
    """The JSON payload (payload_json for multipart) and the uploaded files."""
    if request.content_type == "multipart/form-data":
        payload: Any = None
        uploads: list[Upload] = []
        reader = await request.multipart()
        async for part in reader:
            name = part.name or ""
            if name == "payload_json":
                payload = json.loads(await part.text())
            elif match := re.fullmatch(r"files\[(\d+)\]", name):
                uploads.append(Upload(int(match[1]), part.filename or "file", bytes(await part.read())))
        return payload, uploads
    if request.can_read_body:
        return await request.json(), []
    return None, []


class RestApi:
    """aiohttp handlers for the Discord HTTP API, reading and changing a World."""

    def __init__(self, world: World, *, token: str, gateway_url: str) -> None:
        self._world = world
        self._token = token
        self._gateway_url = gateway_url

    # wiring --------------------------------------------------------------------------------

    def routes(self) -> list[web.AbstractRouteDef]:
        def api(method: str, path: str, handler: Any) -> web.RouteDef:
            return web.route(method, API_PREFIX + path, handler)

        return [
            api("GET", "/gateway", self.get_gateway),
            api("GET", "/gateway/bot", self.get_gateway_bot),
            api("GET", "/users/@me", self.get_me),
            api("POST", "/users/@me/channels", self.create_dm),
            api("GET", "/users/{user_id}", self.get_user),
            api("GET", "/applications/@me", self.get_application),
            api("GET", "/oauth2/applications/@me", self.get_application),
            api("GET", "/applications/{app_id}/commands", self.get_commands),
            api("PUT", "/applications/{app_id}/commands", self.put_commands),
            api("GET", "/applications/{app_id}/guilds/{guild_id}/commands", self.get_commands),
            api("PUT", "/applications/{app_id}/guilds/{guild_id}/commands", self.put_commands),
            api("GET", "/guilds/{guild_id}/members/{user_id}", self.get_member),
            api("GET", "/channels/{channel_id}", self.get_channel),
            api("POST", "/channels/{channel_id}/typing", self.typing),
            api("POST", "/channels/{channel_id}/messages", self.post_message),
            api("GET", "/channels/{channel_id}/messages/{message_id}", self.get_message),
            api("PATCH", "/channels/{channel_id}/messages/{message_id}", self.edit_message),
            api("DELETE", "/channels/{channel_id}/messages/{message_id}", self.delete_message),
            api(
                "PUT", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self.add_reaction
            ),
            api(
                "DELETE",
                "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me",
                self.remove_reaction,
            ),
            api("POST", "/interactions/{interaction_id}/{token}/callback", self.interaction_callback),
            api("POST", "/webhooks/{app_id}/{token}", self.post_followup),
            api("GET", "/webhooks/{app_id}/{token}/messages/{message_id}", self.get_webhook_message),
            api("PATCH", "/webhooks/{app_id}/{token}/messages/{message_id}", self.edit_webhook_message),
            api("DELETE", "/webhooks/{app_id}/{token}/messages/{message_id}", self.delete_webhook_message),
            web.get("/attachments/{attachment_id}/{filename}", self.get_attachment),
        ]

    async def unknown_route(self, request: web.Request) -> web.Response:
        log.warning("fake Discord: unknown route %s %s", request.method, request.path)
        raise DiscordError(404, 0, "404: Not Found")

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Inject rate limits, check the bot token, turn DiscordError into responses, log the request."""
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await handler(request)
        path = (
            request.path.removeprefix(API_PREFIX)
            if request.path.startswith(API_PREFIX + "/")
            else request.path
        )
        rule = self._world.take_rate_limit(request.method, path)
        if rule is not None:
            response: web.StreamResponse = rate_limited_response(rule)
        else:
            try:
                if request.path.startswith(API_PREFIX + "/") and not path.startswith(
                    ("/webhooks/", "/interactions/")
                ):
                    self._check_token(request)
                response = await handler(request)
            except DiscordError as error:
                response = error.response()
        unknown = request.match_info.route.name == UNKNOWN_ROUTE
        record = RequestRecord(
            request.method, path, response.status, dict(request.query), request.get(PAYLOAD_KEY)
        )
        self._world.record_request(record, unknown=unknown)
        return response

    def _check_token(self, request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bot {self._token}":
            raise DiscordError(401, 0, "401: Unauthorized")

    async def _read(self, request: web.Request) -> tuple[Any, list[Upload]]:
        payload, uploads = await read_body(request)
        request[PAYLOAD_KEY] = payload
        return payload, uploads

    # lookups -------------------------------------------------------------------------------

    def _channel(self, request: web.Request) -> FakeChannel:
        channel = self._world.channels.get(_snowflake(request.match_info["channel_id"]))
        if channel is None:
            raise DiscordError(404, 10003, "Unknown Channel")
        return channel

    def _message(self, request: web.Request) -> FakeMessage:
        channel = self._channel(request)
        message = self._world.messages.get(_snowflake(request.match_info["message_id"]))
        # Ephemeral messages exist only for their interaction's webhook, never for the bot token.
        if message is None or message.channel is not channel or message.deleted or message.ephemeral:
            raise DiscordError(404, 10008, "Unknown Message")
        return message

    def _application(self, request: web.Request) -> None:
        if _snowflake(request.match_info["app_id"]) != self._world.application_id:
            raise DiscordError(404, 10002, "Unknown Application")

    def _webhook_interaction(self, request: web.Request) -> FakeInteraction:
        """The interaction whose token this webhook URL carries; tokens die when expired."""
        if _snowflake(request.match_info["app_id"]) != self._world.application_id:
            raise DiscordError(404, 10015, "Unknown Webhook")
        token = request.match_info["token"]
        interaction = next((i for i in self._world.interactions.values() if i.token == token), None)
        if interaction is None:
            raise DiscordError(404, 10015, "Unknown Webhook")
        if interaction.expired:
            raise DiscordError(401, 50027, "Invalid Webhook Token")
        return interaction

    # gateway, users, application -----------------------------------------------------------

    async def get_gateway(self, request: web.Request) -> web.Response:
        return json_response({"url": self._gateway_url})

    async def get_gateway_bot(self, request: web.Request) -> web.Response:
        limit = {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}
        return json_response({"url": self._gateway_url, "shards": 1, "session_start_limit": limit})

    async def get_me(self, request: web.Request) -> web.Response:
        body = self._world.bot_user.payload() | {"verified": True, "mfa_enabled": False, "locale": "en-US"}
        return json_response(body)

    async def get_user(self, request: web.Request) -> web.Response:
        user = self._world.users.get(_snowflake(request.match_info["user_id"]))
        if user is None:
            raise DiscordError(404, 10013, "Unknown User")
        return json_response(user.payload())

    async def create_dm(self, request: web.Request) -> web.Response:
        payload, _ = await self._read(request)
        user = self._world.users.get(_snowflake(str((payload or {}).get("recipient_id"))))
        if user is None or user.bot:
            raise DiscordError(404, 10013, "Unknown User")
        return json_response(self._world.dm_channel(user).payload())

    async def get_application(self, request: web.Request) -> web.Response:
        world = self._world
        return json_response(
            {
                "id": str(world.application_id),
                "name": world.bot_user.name,
                "description": "",
                "icon": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": world.owner.payload(),
                "team": None,
                "verify_key": "0" * 64,
                "flags": 0,
                "bot": world.bot_user.payload(),
            }
        )

    def _guild_scope(self, request: web.Request) -> int | None:
        self._application(request)
        if "guild_id" not in request.match_info:
            return None
        return self._guild(request).id

    def _guild(self, request: web.Request) -> FakeGuild:
        guild = self._world.find_guild(_snowflake(request.match_info["guild_id"]))
        if guild is None:
            raise DiscordError(404, 10004, "Unknown Guild")
        return guild

    async def get_member(self, request: web.Request) -> web.Response:
        guild = self._guild(request)
        user = next((u for u in guild.members if u.id == _snowflake(request.match_info["user_id"])), None)
        if user is None:
            raise DiscordError(404, 10007, "Unknown Member")
        return json_response(guild.member_payload(user, with_permissions=False))

    async def get_commands(self, request: web.Request) -> web.Response:
        return json_response(self._world.commands.get(self._guild_scope(request), []))

    async def put_commands(self, request: web.Request) -> web.Response:
        """Bulk overwrite: the new list replaces the old; a command keeps its id across syncs."""
        guild_id = self._guild_scope(request)
        payload, _ = await self._read(request)
        previous = {(c["name"], c["type"]): c["id"] for c in self._world.commands.get(guild_id, [])}
        stored = []
        for index, command in enumerate(payload):
            kind = command.get("type", 1)
            name = command.get("name", "")
            if kind == 1 and not (COMMAND_NAME.match(name) and name == name.lower()):
                raise invalid_form(
                    f"{index}.name", "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid"
                )
            if kind == 1 and not 1 <= len(command.get("description", "")) <= 100:
                raise invalid_form(
                    f"{index}.description", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
                )
            entry = {
                "default_member_permissions": None,
                "nsfw": False,
                "options": [],
                "description": "",
            } | command
            if entry["default_member_permissions"] is not None:  # a bit set: sent either way, stored as a string
                entry["default_member_permissions"] = str(int(entry["default_member_permissions"]))
            entry |= {
                "id": previous.get((name, kind), str(self._world.ids.next())),
                "application_id": str(self._world.application_id),
                "version": str(self._world.ids.next()),
                "type": kind,
            }
            if guild_id is not None:
                entry["guild_id"] = str(guild_id)
            stored.append(entry)
        self._world.commands[guild_id] = stored
        self._world.notify()
        return json_response(stored)

    # channels and messages -----------------------------------------------------------------

    async def get_channel(self, request: web.Request) -> web.Response:
        return json_response(self._channel(request).payload())

    async def typing(self, request: web.Request) -> web.Response:
        self._channel(request)
        return web.Response(status=204)

    async def post_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        payload, uploads = await self._read(request)
        if channel.type == CHANNEL_DM and channel.recipient is not None and not channel.recipient.accepts_dms:
            raise DiscordError(403, 50007, "Cannot send messages to this user")
        fields = self._message_fields(payload or {}, uploads, None)
        message = self._world.create_message(channel, self._world.bot_user, **fields)
        return json_response(message.payload())

    async def get_message(self, request: web.Request) -> web.Response:
        return json_response(self._message(request).payload())

    async def edit_message(self, request: web.Request) -> web.Response:
        message = self._message(request)
        payload, uploads = await self._read(request)
        if message.author is not self._world.bot_user:
            raise DiscordError(403, 50005, "Cannot edit a message authored by another user")
        self._world.edit_message(message, **self._message_fields(payload or {}, uploads, message))
        return json_response(message.payload())

    async def delete_message(self, request: web.Request) -> web.Response:
        message = self._message(request)
        if message.author is not self._world.bot_user and message.channel.type == CHANNEL_DM:
            raise DiscordError(403, 50003, "Cannot execute action on a DM channel")
        self._world.delete_message(message)
        return web.Response(status=204)

    async def add_reaction(self, request: web.Request) -> web.Response:
        message = self._message(request)
        emoji = request.match_info["emoji"]
        if emoji not in message.reactions:
            message.reactions.append(emoji)
            self._world.notify()
        return web.Response(status=204)

    async def remove_reaction(self, request: web.Request) -> web.Response:
        message = self._message(request)
        emoji = request.match_info["emoji"]
        if emoji in message.reactions:
            message.reactions.remove(emoji)
            self._world.notify()
        return web.Response(status=204)

    async def get_attachment(self, request: web.Request) -> web.Response:
        attachment = self._world.attachments.get(_snowflake(request.match_info["attachment_id"]))
        if attachment is None:
            raise DiscordError(404, 0, "404: Not Found")
        return web.Response(
            body=attachment.data, content_type=attachment.content_type or "application/octet-stream"
        )

    def _message_fields(
        self, payload: dict[str, Any], uploads: list[Upload], current: FakeMessage | None
    ) -> dict[str, Any]:
        """The message fields a create or edit sets, validated as Discord validates them."""
        fields: dict[str, Any] = {}
        if "content" in payload:
            fields["content"] = payload["content"] or ""
        if "embeds" in payload:
            fields["embeds"] = payload["embeds"] or []
        if "components" in payload:
            fields["components"] = payload["components"] or []
        if "flags" in payload:
            fields["flags"] = payload["flags"] or 0
        if "attachments" in payload or uploads:
            fields["attachments"] = self._attachments(
                payload, uploads, current.attachments if current else []
            )

        def final(name: str, default: Any) -> Any:
            return fields.get(name, getattr(current, name) if current is not None else default)

        if len(final("content", "")) > MAX_CONTENT_LENGTH:
            raise invalid_form(
                "content", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_CONTENT_LENGTH} or fewer in length."
            )
        if len(final("embeds", [])) > MAX_EMBEDS:
            raise invalid_form("embeds", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_EMBEDS} or fewer in length.")
        rows = final("components", [])
        if len(rows) > MAX_ACTION_ROWS:
            raise invalid_form("components", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_ACTION_ROWS} or fewer in length.")
        for n, row in enumerate(rows):
            if len(row.get("components", [])) > MAX_ROW_ITEMS:
                raise invalid_form(f"components.{n}.components", "BASE_TYPE_MAX_LENGTH",
                                   f"Must be {MAX_ROW_ITEMS} or fewer in length.")
        if len(final("attachments", [])) > MAX_ATTACHMENTS:
            raise invalid_form(
                "attachments", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_ATTACHMENTS} or fewer in length."
            )
        if not any(final(name, []) for name in ("content", "embeds", "attachments", "components")):
            raise DiscordError(400, 50006, "Cannot send an empty message")
        return fields

    def _attachments(
        self, payload: dict[str, Any], uploads: list[Upload], existing: list[FakeAttachment]
    ) -> list[FakeAttachment]:
        """Attachments after the request: listed existing ones are kept, uploads are added.

        Without an `attachments` list every upload is appended; with one, entries name either an
        existing attachment id or an upload index (files[n]), as discord.py sends them.
        """
        limit = self._world.attachment_size_limit
        for upload in uploads:
            if len(upload.data) > limit:
                raise DiscordError(413, 40005, "Request entity too large")
        pending = {upload.index: upload for upload in uploads}
        kept = {attachment.id: attachment for attachment in existing}
        if "attachments" not in payload:
            return existing + [self._store(upload, {}) for upload in uploads]
        result = []
        for entry in payload["attachments"] or []:
            key = int(entry["id"])
            if key in kept:
                result.append(kept[key])
            elif key in pending:
                result.append(self._store(pending.pop(key), entry))
            else:
                raise invalid_form("attachments", "ATTACHMENT_NOT_FOUND", f"Unknown attachment {key}")
        return result + [self._store(upload, {}) for upload in pending.values()]

    def _store(self, upload: Upload, entry: dict[str, Any]) -> FakeAttachment:
        filename = entry.get("filename") or upload.filename
        content_type = mimetypes.guess_type(filename)[0]
        return self._world.store_file(filename, upload.data, content_type, entry.get("description"))

    # interactions --------------------------------------------------------------------------

    async def interaction_callback(self, request: web.Request) -> web.Response:
        interaction = self._world.interactions.get(_snowflake(request.match_info["interaction_id"]))
        if interaction is None or interaction.token != request.match_info["token"] or interaction.expired:
            raise DiscordError(404, 10062, "Unknown interaction")
        payload, uploads = await self._read(request)
        if interaction.callback is not None:
            raise DiscordError(400, 40060, "Interaction has already been acknowledged.")
        kind = payload.get("type")
        data = payload.get("data") or {}
        message: FakeMessage | None = None
        if kind == 4:
            message = self._create_response_message(interaction, self._message_fields(data, uploads, None))
            interaction.original = message
        elif kind == 5:
            flags = FLAG_LOADING | (data.get("flags", 0) & FLAG_EPHEMERAL)
            message = self._create_response_message(interaction, {"flags": flags})
            interaction.original = message
        elif kind in (6, 7):
            if interaction.message is None:
                raise invalid_form(
                    "type", "INTERACTION_RESPONSE_TYPE_INVALID", "Interaction has no message to update"
                )
            message = interaction.message
            if kind == 7:
                self._world.edit_message(message, **self._message_fields(data, uploads, message))
            interaction.original = message
        elif kind == 9:
            if not data.get("custom_id") or not data.get("title"):
                raise invalid_form("data", "BASE_TYPE_REQUIRED", "A modal needs a custom_id and a title")
        else:
            raise invalid_form(
                "type", "INTERACTION_RESPONSE_TYPE_INVALID", f"Unsupported callback type {kind}"
            )
        self._world.record_response(interaction, "callback", payload, message)
        if request.query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        summary: dict[str, Any] = {
            "id": str(interaction.id),
            "type": interaction.type,
            "response_message_loading": kind == 5,
            "response_message_ephemeral": bool(message and message.ephemeral),
        }
        resource: dict[str, Any] = {"type": kind}
        if message is not None:
            summary["response_message_id"] = str(message.id)
            resource["message"] = message.payload()
        return json_response({"interaction": summary, "resource": resource})

    def _create_response_message(self, interaction: FakeInteraction, fields: dict[str, Any]) -> FakeMessage:
        kind = (
            MESSAGE_CHAT_INPUT_COMMAND
            if interaction.type == INTERACTION_APPLICATION_COMMAND
            else MESSAGE_DEFAULT
        )
        return self._world.create_message(
            interaction.channel,
            self._world.bot_user,
            type=kind,
            interaction=interaction,
            webhook_id=self._world.application_id,
            **fields,
        )

    async def post_followup(self, request: web.Request) -> web.Response:
        interaction = self._webhook_interaction(request)
        payload, uploads = await self._read(request)
        if interaction.callback is None:
            raise DiscordError(404, 10015, "Unknown Webhook")
        message = self._create_response_message(
            interaction, self._message_fields(payload or {}, uploads, None)
        )
        interaction.followups.append(message)
        self._world.record_response(interaction, "followup", payload, message)
        if request.query.get("wait") in ("1", "true", "True"):
            return json_response(message.payload())
        return web.Response(status=204)

    def _webhook_message(self, interaction: FakeInteraction, message_id: str) -> FakeMessage:
        if message_id == "@original":
            message = interaction.original
        else:
            message = next((m for m in interaction.followups if m.id == _snowflake(message_id)), None)
        if message is None or message.deleted:
            raise DiscordError(404, 10008, "Unknown Message")
        return message

    async def get_webhook_message(self, request: web.Request) -> web.Response:
        interaction = self._webhook_interaction(request)
        return json_response(self._webhook_message(interaction, request.match_info["message_id"]).payload())

    async def edit_webhook_message(self, request: web.Request) -> web.Response:
        interaction = self._webhook_interaction(request)
        message = self._webhook_message(interaction, request.match_info["message_id"])
        payload, uploads = await self._read(request)
        fields = self._message_fields(payload or {}, uploads, message)
        if "flags" not in fields and message.flags & FLAG_LOADING:
            fields["flags"] = message.flags & ~FLAG_LOADING
        self._world.edit_message(message, **fields)
        kind = "edit_original" if message is interaction.original else "edit_followup"
        self._world.record_response(interaction, kind, payload, message)
        return json_response(message.payload())

    async def delete_webhook_message(self, request: web.Request) -> web.Response:
        interaction = self._webhook_interaction(request)
        message = self._webhook_message(interaction, request.match_info["message_id"])
        self._world.delete_message(message)
        kind = "delete_original" if message is interaction.original else "delete_followup"
        self._world.record_response(interaction, kind, {}, message)
        return web.Response(status=204)


def _snowflake(text: str) -> int:
    """An id from a URL or body; anything that is not a number matches nothing."""
    return int(text) if text.isdigit() else -1
