"""Point discord.py at a Discord-compatible server other than discord.com (the end-to-end tests' fake).

discord.py builds every REST URL from `Route.BASE` (interaction callbacks and webhook follow-ups
included) and opens its first gateway socket at `DiscordWebSocket.DEFAULT_GATEWAY` (a plain
`Client` does not ask GET /gateway/bot; it falls back to DEFAULT_GATEWAY again after an invalid
session, and otherwise reconnects to the `resume_gateway_url` the server sends in READY). Those two
class attributes are therefore all that needs to change. Attachment and CDN URLs come from the
server's own payloads, so they need nothing.
"""

from __future__ import annotations

import logging

import yarl
from discord.gateway import DiscordWebSocket
from discord.http import Route

log = logging.getLogger(__name__)

_DISCORD_API_BASE = Route.BASE
_DISCORD_GATEWAY = DiscordWebSocket.DEFAULT_GATEWAY


def use_discord_endpoints(api_base: str | None, gateway_url: str | None) -> None:
    """Use api_base (e.g. http://127.0.0.1:8080/api/v10) and gateway_url (e.g. ws://127.0.0.1:8080/gateway).

    None (or empty) restores discord.com for that half. Call before the client logs in.
    """
    api = (api_base or "").strip().rstrip("/")
    gateway = (gateway_url or "").strip()
    if api and yarl.URL(api).scheme not in ("http", "https"):
        raise ValueError(
            f"DISCORD_API_BASE must be an http(s) URL such as http://127.0.0.1:8080/api/v10, not {api!r}"
        )
    if gateway and yarl.URL(gateway).scheme not in ("ws", "wss"):
        raise ValueError(
            f"DISCORD_GATEWAY_URL must be a ws(s) URL such as ws://127.0.0.1:8080/gateway, not {gateway!r}"
        )
    Route.BASE = api or _DISCORD_API_BASE
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway) if gateway else _DISCORD_GATEWAY
    if api or gateway:
        log.info("Using Discord API %s and gateway %s", Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY)
