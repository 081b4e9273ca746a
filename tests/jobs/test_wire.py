"""Job payloads and events survive the JSON a distributed queue carries, and bad messages are refused."""

from __future__ import annotations

import pytest

from jobs import events, signing, wire
from jobs.payloads import (
    GenerateInputs,
    GenerateOutput,
    GenerateParams,
    Picture,
    TrainInputs,
    TrainOutput,
    TrainParams,
    VariationOf,
    WorkItem,
)
from jobs.requests import GenerateRequest, TrainConfig

SECRET, CAP = b"k" * 32, 1024 * 1024

TRAIN = WorkItem(7, TrainParams("zqjane", "woman", TrainConfig(steps=5, lora_targets=("to_q",))),
                 TrainInputs([b"\x89PNG one", b"\x00\xff two"], None))
GENERATE = WorkItem(8, GenerateParams(GenerateRequest("on a horse", num_images=2, seed=4, aspect="portrait"),
                                      model_id=3, adapter_key="model-3", handle="zqjane", class_word="woman",
                                      variation_of=VariationOf(5, 1), allow_flagged=True),
                    GenerateInputs(lora=b"LORA", init_image=b"\x89PNG"))
EVENTS = [
    events.Stage("training", "step one"), events.Progress(3, 10, loss=0.25, eta_s=1.5),
    events.Preview(4, b"\x89PNG", flagged=True), events.Checkpoint(5, b"PK\x03\x04"),
    events.Done(TrainOutput(b"lora", None, {"handle": "zqjane"}, 10, 0.1, [Picture(b"\x89PNG", 1, "a photo", flagged=False)],
                            ["a hint"])),
    events.Done(GenerateOutput([Picture(b"\x89PNG", 3, flagged=True), Picture(b"\x89PNG2", 4)])),
    events.Error("Out of memory.", "out_of_memory"), events.AdapterLoaded("model-3"), events.Claimed(),
    events.WorkerLost("gone"),
]


@pytest.mark.parametrize("item", [TRAIN, GENERATE], ids=["train", "generate"])
def test_work_items_come_back_whole_with_their_bytes(item: WorkItem):
    back = wire.item_from_dict(wire.loads(wire.dumps(wire.item_to_dict(item))))
    assert back == item and back.kind == item.kind
    assert "__bytes__" in wire.dumps(wire.item_to_dict(item))


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_every_event_comes_back_as_itself(event):
    envelope = wire.Envelope(7, "token", "gpu-a0", event)
    assert wire.envelope_from_frame(wire.envelope_to_frame(envelope, SECRET), SECRET, CAP) == envelope


@pytest.mark.parametrize("item", [TRAIN, GENERATE], ids=["train", "generate"])
def test_a_job_comes_back_with_its_token_and_expiry(item: WorkItem):
    job = wire.SignedJob(item, "t0k", 1234.5)
    assert wire.job_from_frame(wire.job_to_frame(job, SECRET), SECRET, CAP) == job


@pytest.mark.parametrize("text", [
    "not json", "[]", "{}", '{"job_id": 1, "token": "t", "worker": "w"}',
    '{"job_id": "x", "token": "t", "worker": "w", "event": {"type": "stage", "stage": "training"}}',
    '{"job_id": 1, "token": "t", "worker": "w", "event": {"type": "nonsense"}}',
    '{"job_id": 1, "token": "t", "worker": "w", "event": {"type": "stage", "stage": "flying"}}',
    '{"job_id": 1, "token": "t", "worker": "w", "event": {"type": "progress", "step": "many"}}',
])
def test_a_malformed_event_message_is_refused_as_a_value_error(text: str):
    """Even signed with the secret (a worker of another version, say)."""
    with pytest.raises(ValueError):
        wire.envelope_from_frame(signing.seal(SECRET, wire.EVENT, 1, text), SECRET, CAP)


def test_a_frame_that_names_another_job_than_it_carries_is_refused():
    envelope = wire.Envelope(7, "token", "gpu-a0", events.Claimed())
    body = wire.envelope_to_frame(envelope, SECRET).split(".", 2)[2]
    with pytest.raises(signing.BadFrame, match="another job"):
        wire.envelope_from_frame(signing.seal(SECRET, wire.EVENT, 8, body), SECRET, CAP)
    body = wire.job_to_frame(wire.SignedJob(TRAIN, "t", 1.0), SECRET).split(".", 2)[2]
    with pytest.raises(signing.BadFrame, match="another job"):
        wire.job_from_frame(signing.seal(SECRET, wire.JOB, 8, body), SECRET, CAP)


def test_a_job_never_passes_for_an_event_nor_an_event_for_a_job():
    job = wire.job_to_frame(wire.SignedJob(TRAIN, "t", 1.0), SECRET)
    event = wire.envelope_to_frame(wire.Envelope(7, "t", "w", events.Claimed()), SECRET)
    with pytest.raises(signing.BadFrame, match="signature"):
        wire.envelope_from_frame(job, SECRET, CAP)
    with pytest.raises(signing.BadFrame, match="signature"):
        wire.job_from_frame(event, SECRET, CAP)


@pytest.mark.parametrize("data", [
    None, {}, {"job_id": 1, "kind": "paint", "params": {}, "inputs": {}},
    {"job_id": 1, "kind": "train", "params": {"handle": "a"}, "inputs": {"photos": []}},
    {"job_id": 1, "kind": "generate", "params": {"request": {"prompt": "x", "num_images": "lots"}}, "inputs": {}},
])
def test_a_malformed_work_item_is_refused_as_a_value_error(data):
    with pytest.raises(ValueError):
        wire.item_from_dict(data)


def test_bytes_anywhere_in_plain_json_come_back_as_bytes():
    value = {"images": [{"png": b"\x89PNG", "seed": 3}], "loss": 0.5}
    assert wire.loads(wire.dumps(value)) == value
    assert "__bytes__" in wire.dumps(b"x") and wire.loads(wire.dumps({"__bytes__": 1})) == {"__bytes__": 1}


def test_an_item_is_sent_without_the_lora_a_worker_already_holds():
    assert GENERATE.without_lora().inputs == GenerateInputs(lora=None, init_image=b"\x89PNG")
    assert GENERATE.inputs.lora == b"LORA"  # the original keeps it, should it have to go elsewhere
    assert TRAIN.without_lora() is TRAIN and TRAIN.adapter_key is None and GENERATE.adapter_key == "model-3"


def test_an_item_refuses_inputs_of_the_other_kind():
    with pytest.raises(TypeError):
        WorkItem(1, TRAIN.params, GenerateInputs())
