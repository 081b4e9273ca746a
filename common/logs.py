"""One logging set-up for every entry point (bot, worker processes, command line).

Secrets must never reach a log line: a filter on the handler replaces the configured secrets,
anything shaped like a Discord bot token, and the token part of interaction and webhook URLs
before a record is written. discord.py's own loggers stay at INFO even when LOG_LEVEL=DEBUG: its
debug lines carry every gateway event whole, interaction tokens and the signed links of the
selfies people send included. So do Celery's and kombu's: theirs carry a job's message (prompt,
handle, photos and the attempt's token), and aiosqlite's: it logs every SQL statement with its
parameters (prompts, handles, Discord ids). (redis-py logs only command names; aiohttp's client no
request bodies.)
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterable

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"

# Discord bot tokens: base64 user id, a dot, a timestamp part, a dot, an HMAC part.
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{23,28}\.[A-Za-z0-9_-]{6,7}\.[A-Za-z0-9_-]{27,}")
# Interaction and webhook tokens travel in URL paths (/interactions/<id>/<token>/callback).
_URL_TOKEN = re.compile(r"(/(?:interactions|webhooks)/\d+/)[A-Za-z0-9_.-]{20,}")
REDACTED = "[redacted]"
# Libraries whose debug lines carry personal data or secrets: never below INFO.
QUIET_LIBRARIES = ("discord", "celery", "kombu", "aiosqlite")


class RedactSecrets(logging.Filter):
    """Rewrites each record's final message so that no secret survives formatting."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if s and len(s) >= 8]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self._clean(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._clean(record.exc_text)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True

    def _clean(self, text: str) -> str:
        text = _URL_TOKEN.sub(lambda m: m.group(1) + REDACTED, _TOKEN_SHAPE.sub(REDACTED, text))
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text


def setup_logging(level: str | int = "INFO", secrets: Iterable[str] = ()) -> None:
    """Route all logging through one stderr handler with the project's format and redaction."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(root.level, logging.INFO))


def log_with_reference(log: logging.Logger, doing: str, exc_info: BaseException | bool = True) -> str:
    """Log that `doing` failed, with the exception (by default the one being handled), under a new
    short reference; return the reference, the only detail the person who asked is shown."""
    reference = uuid.uuid4().hex[:8]
    log.error("%s failed (reference %s)", doing, reference, exc_info=exc_info)
    return reference
