"""Job payloads and events survive the JSON a distributed queue carries."""

from __future__ import annotations

from jobs import wire
from jobs.payloads import WorkItem


def test_bytes_anywhere_in_a_payload_come_back_as_bytes():
    item = WorkItem(7, "train", {"handle": "zqjane", "config": {"steps": 5}},
                    {"photos": [b"\x89PNG one", b"\x00\xff two"], "checkpoint": None})
    back = wire.item_from_dict(wire.loads(wire.dumps(wire.item_to_dict(item))))
    assert back == item
    event = {"type": "done", "result": {"images": [{"png": b"\x89PNG", "seed": 3}], "loss": 0.5}}
    assert wire.loads(wire.dumps(event)) == event
    assert "__bytes__" in wire.dumps(b"x") and wire.loads(wire.dumps({"__bytes__": 1})) == {"__bytes__": 1}
