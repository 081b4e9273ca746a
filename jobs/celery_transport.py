"""kombu's Redis transport, made to drop what is not a task message instead of dying on it.

kombu decodes each item it pops from a queue before Celery sees it: one item that is not JSON, or not
shaped like a message, raises out of the worker's event loop and Celery stops the worker
("Unrecoverable error"; celery/celery#4308). Here the popped item is checked first, on the client
that pops it: one larger than the cap (`max_message_bytes` of the broker transport options) is
dropped without being decoded, and one that kombu could not turn into a message is dropped too. Each
drop is logged (never the item); the worker goes on serving. What passes is a message kombu can read;
Celery deals with the rest (a body it cannot decode, an unknown task) by logging and acknowledging it,
and the task refuses a job that the bot did not sign (`jobs.signing`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

from jobs.signing import DEFAULT_MAX_MESSAGE_MB, MB, too_large

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES_OPTION = "max_message_bytes"


def message_problem(item: bytes, max_bytes: int) -> str | None:
    """Why kombu could not take `item` as a message (in words for the log), or None when it can."""
    if len(item) > max_bytes:
        return too_large(len(item), max_bytes)
    try:
        message = json.loads(item)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested past the parser's depth
        return "it is not JSON"
    if not isinstance(message, dict):
        return "it is not a message"
    properties, body = message.get("properties"), message.get("body")
    delivery = properties.get("delivery_info") if isinstance(properties, dict) else None
    if not (isinstance(properties, dict) and isinstance(properties.get("delivery_tag"), str)
            and isinstance(delivery, dict) and isinstance(delivery.get("exchange"), str)
            and isinstance(delivery.get("routing_key"), str) and isinstance(body, str)
            and isinstance(message.get("headers", {}), dict)):
        return "it is not a message"
    if properties.get("body_encoding") == "base64":
        try:
            base64.b64decode(body, validate=True)
        except binascii.Error:
            return "its body is not base64"
    return None


class _CheckedRedis(redis.Redis):
    """The client a channel pops messages with: BRPOP's answer is checked before kombu decodes it."""

    def __init__(self, *args: Any, max_message_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_message_bytes = max_message_bytes

    def parse_response(self, connection: Any, command_name: str | bytes, **options: Any) -> Any:
        response = super().parse_response(connection, command_name, **options)
        if command_name == "BRPOP" and response:
            queue, item = response
            problem = message_problem(item, self.max_message_bytes)
            if problem is not None:
                log.error("dropped an item of queue %s: %s", queue.decode(errors="replace"), problem)
                return None  # as when BRPOP times out: nothing is delivered, the worker polls again
        return response


class Channel(kombu_redis.Channel):
    def _get_client(self) -> Any:
        super()._get_client()  # checks the redis-py version
        options = self.connection.client.transport_options
        cap = int(options.get(MAX_MESSAGE_BYTES_OPTION, DEFAULT_MAX_MESSAGE_MB * MB))
        return functools.partial(_CheckedRedis, max_message_bytes=cap)


class Transport(kombu_redis.Transport):
    Channel = Channel
