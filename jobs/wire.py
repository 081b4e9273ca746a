"""JSON for job payloads and events that carry bytes (photos, LoRA files, pictures).

Work items and events hold raw bytes; a distributed queue carries text. Bytes become
`{"__bytes__": "<base64>"}` on the way out and bytes again on the way in, so the queue can use
JSON (never pickle: a message from the broker must not be able to run code in the bot or a worker).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from jobs.payloads import WorkItem

_BYTES = "__bytes__"


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


def item_to_dict(item: WorkItem) -> dict[str, Any]:
    return {"job_id": item.job_id, "kind": item.kind, "params": item.params, "blobs": item.blobs}


def item_from_dict(data: dict[str, Any]) -> WorkItem:
    return WorkItem(data["job_id"], data["kind"], data["params"], data["blobs"])
