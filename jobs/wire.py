"""JSON for work items and events, which carry bytes (photos, LoRA files, pictures).

A distributed queue carries text. Bytes become `{"__bytes__": "<base64>"}` on the way out and bytes
again on the way in, so the queue can use JSON (never pickle: a message from the broker must not be
able to run code in the bot or a worker). Items and events are checked against their types on the
way in (pydantic), so a malformed message raises `ValueError` instead of reaching the code.
What goes through Redis is also signed (`jobs.signing`), and checked before it is decoded.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from pydantic import TypeAdapter

from jobs.events import Event
from jobs.payloads import GenerateInputs, GenerateParams, JobKind, TrainInputs, TrainParams, WorkItem
from jobs.signing import BadFrame, seal, unseal

_BYTES = "__bytes__"
# What a signed frame is for (`jobs.signing`): a job never passes for an event, nor an event for a job.
JOB, EVENT = "job", "event"


def _encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {_BYTES: base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_BYTES} and isinstance(value[_BYTES], str):
            return base64.b64decode(value[_BYTES])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def dumps(value: Any) -> str:
    return json.dumps(_encode(value), separators=(",", ":"))


def loads(text: str | bytes) -> Any:
    return _decode(json.loads(text))


# Callers pass `type(x)`: a class is hashable, but mypy does not take type[X] for the cache's
# Hashable argument (python/mypy#17730), hence their `type: ignore[arg-type]`.
@cache
def _adapter(kind: Any) -> TypeAdapter[Any]:
    return TypeAdapter(kind)


def item_to_dict(item: WorkItem) -> dict[str, Any]:
    return {"job_id": item.job_id, "kind": item.kind,
            "params": _adapter(type(item.params)).dump_python(item.params),  # type: ignore[arg-type]  # python/mypy#17730
            "inputs": _adapter(type(item.inputs)).dump_python(item.inputs)}  # type: ignore[arg-type]  # python/mypy#17730


@dataclass(frozen=True)
class _ItemFields:
    job_id: int
    kind: JobKind
    params: dict[str, Any]
    inputs: dict[str, Any]


def item_from_dict(data: Any) -> WorkItem:
    fields = _adapter(_ItemFields).validate_python(data)
    train = fields.kind == "train"
    return WorkItem(fields.job_id,
                    _adapter(TrainParams if train else GenerateParams).validate_python(fields.params),
                    _adapter(TrainInputs if train else GenerateInputs).validate_python(fields.inputs))


def event_to_dict(event: Event) -> dict[str, Any]:
    return _adapter(type(event)).dump_python(event)  # type: ignore[arg-type]  # python/mypy#17730


def event_from_dict(data: Any) -> Event:
    return _adapter(Event).validate_python(data)


@dataclass(frozen=True)
class Envelope:
    """An event of one attempt of a job, as a Celery worker sends it to the bot."""

    job_id: int
    token: str
    worker: str
    event: Event = field(repr=False)


def envelope_to_frame(envelope: Envelope, secret: bytes) -> str:
    """The envelope as a frame signed with the shared secret (`jobs.signing`), for the events list."""
    return seal(secret, EVENT, envelope.job_id,
                dumps({"job_id": envelope.job_id, "token": envelope.token, "worker": envelope.worker,
                       "event": event_to_dict(envelope.event)}))


def envelope_from_frame(frame: str | bytes, secret: bytes, max_bytes: int) -> Envelope:
    """An envelope from the events list; BadFrame (a ValueError) unless the bot's workers signed it."""
    job_id, body = unseal(secret, EVENT, frame, max_bytes)
    envelope = _adapter(Envelope).validate_python(loads(body))
    if envelope.job_id != job_id:
        raise BadFrame("it names another job than it carries")
    return envelope


@dataclass(frozen=True)
class SignedJob:
    """A job as the bot sends it to a Celery worker (through a queue, or as a rider): the item, the
    token of its attempt, and when the message stops being valid (Unix time, the bot's clock)."""

    item: WorkItem = field(repr=False)
    token: str = field(repr=False)
    expires_at: float


@dataclass(frozen=True)
class _JobFields:
    item: dict[str, Any]
    token: str
    expires_at: float


def job_to_frame(job: SignedJob, secret: bytes) -> str:
    return seal(secret, JOB, job.item.job_id,
                dumps({"item": item_to_dict(job.item), "token": job.token, "expires_at": job.expires_at}))


def job_from_frame(frame: str | bytes, secret: bytes, max_bytes: int) -> SignedJob:
    """A job from a queue or a rider list; BadFrame (a ValueError) unless the bot signed it."""
    job_id, body = unseal(secret, JOB, frame, max_bytes)
    fields = _adapter(_JobFields).validate_python(loads(body))
    item = item_from_dict(fields.item)
    if item.job_id != job_id:
        raise BadFrame("it names another job than it carries")
    return SignedJob(item, fields.token, fields.expires_at)
