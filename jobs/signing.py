"""Signed frames: what the bot and its Celery workers write to Redis, and check before they trust it.

Anyone who can write to Redis could otherwise run jobs on the GPUs or hand a person pictures and models
that no worker made. Every job, rider and event travels as a frame

    <job id>.<HMAC-SHA256, hex>.<JSON body>

signed with the shared `JOB_SECRET` over its purpose ("job" or "event"), the job id and the body. A
reader checks the frame's size first (`max_bytes`: nothing larger is even looked at), then its MAC in
constant time, and only then decodes the body; anything else raises `BadFrame`, which says why in
words fit for a log line (never the frame's content). The job id stays readable, so the bot can find
and remove a person's frames (`/forget`) without the secret's help.
"""

from __future__ import annotations

import hashlib
import hmac

MIN_SECRET_CHARS = 32
MAC_HEX_CHARS = 64
MAX_JOB_ID_CHARS = 20
MB = 1024 * 1024
# The largest legitimate message, as Redis holds it: 30 photos (MAX_PHOTOS; each a 512x512 PNG, at most
# about 0.8 MB) and a checkpoint of a rank-16 SD1.5 LoRA (weights and Adam moments, about 38 MB) come
# to about 62 MB, which JSON's base64 and then Celery's (the job travels inside a task message) turn
# into about 110 MB. README: MAX_JOB_MESSAGE_MB.
DEFAULT_MAX_MESSAGE_MB = 192
GENERATE_SECRET = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


class BadFrame(ValueError):
    """A frame that is refused: too large, unsigned, signed with another secret, or malformed."""


def secret_problem(secret: str) -> str | None:
    """What is wrong with JOB_SECRET, in one line for the person setting it up; None when it will do."""
    how = (f"generate one with {GENERATE_SECRET} and put the same value in the .env of the bot and of "
           "every GPU worker")
    if not secret:
        return f"JOB_SECRET is not set; with JOB_BACKEND=celery the bot and its workers sign every job with it: {how}."
    if len(secret) < MIN_SECRET_CHARS:
        return f"JOB_SECRET is too short ({len(secret)} characters, at least {MIN_SECRET_CHARS}): {how}."
    return None


def _mac(secret: bytes, purpose: str, job_id: int, body: bytes | memoryview) -> str:
    signer = hmac.new(secret, f"{purpose}\n{job_id}\n".encode(), hashlib.sha256)
    signer.update(body)
    return signer.hexdigest()


def seal(secret: bytes, purpose: str, job_id: int, body: str) -> str:
    """`body` signed for `purpose` and job `job_id`, as one frame."""
    raw = body.encode()
    return f"{job_id}.{_mac(secret, purpose, job_id, raw)}.{body}"


def job_id_of(frame: bytes | str) -> int | None:
    """The job id a frame names (not checked: for finding frames, never for trusting them)."""
    head = frame[: MAX_JOB_ID_CHARS + 1]
    head = head.encode() if isinstance(head, str) else head
    number, dot, _ = head.partition(b".")
    return int(number) if dot and number.isdigit() else None


def too_large(size: int, max_bytes: int) -> str:
    return f"it is {size / MB:.1f} MB, over the cap of {max_bytes / MB:.0f} MB (MAX_JOB_MESSAGE_MB)"


def unseal(secret: bytes, purpose: str, frame: bytes | str, max_bytes: int) -> tuple[int, bytes]:
    """The job id and body of a frame signed for `purpose`; BadFrame when it is not one."""
    if len(frame) > max_bytes:  # checked before anything is copied or decoded
        raise BadFrame(too_large(len(frame), max_bytes))
    raw = frame.encode() if isinstance(frame, str) else frame
    if len(raw) > max_bytes:  # a str's UTF-8 may be longer than the str
        raise BadFrame(too_large(len(raw), max_bytes))
    first = raw.find(b".", 0, MAX_JOB_ID_CHARS + 1)
    second = first + 1 + MAC_HEX_CHARS
    if first < 1 or not raw[:first].isdigit() or raw[second : second + 1] != b".":
        raise BadFrame("it is not a signed frame")
    job_id = int(raw[:first])
    body = memoryview(raw)[second + 1 :]
    given = raw[first + 1 : second]
    if not hmac.compare_digest(given, _mac(secret, purpose, job_id, body).encode()):
        raise BadFrame("its signature is not valid (not signed with this JOB_SECRET)")
    return job_id, bytes(body)
