"""What the bot and its Celery workers accept from Redis: signed frames of a bounded size, and items of
a queue that kombu can read; everything else is refused before it is decoded."""

from __future__ import annotations

import base64
import json

import pytest

from jobs import celery_transport, signing, wire
from jobs.celery_protocol import job_of_message, new_task_id
from jobs.celery_transport import message_problem
from jobs.signing import BadFrame, seal, secret_problem, unseal
from tests.work_items import JOB_SECRET, train_item

SECRET = JOB_SECRET.encode()


def test_a_frame_signed_with_the_secret_comes_back_and_names_its_job():
    frame = seal(SECRET, "job", 42, '{"a": 1}')
    assert unseal(SECRET, "job", frame, 1000) == (42, b'{"a": 1}')
    assert unseal(SECRET, "job", frame.encode(), 1000) == (42, b'{"a": 1}')
    assert signing.job_id_of(frame) == 42 and signing.job_id_of(b"not a frame") is None


@pytest.mark.parametrize(("frame", "reason"), [
    ("not json", "not a signed frame"),
    ('{"job_id": 1}', "not a signed frame"),
    ("1." + "0" * 64 + '.{"a": 1}', "signature is not valid"),  # forged
    ("1.abc.{}", "not a signed frame"),
    (seal(b"another secret of the right length!!", "job", 1, "{}"), "signature is not valid"),
    (seal(SECRET, "event", 1, "{}"), "signature is not valid"),  # signed for another purpose
    (seal(SECRET, "job", 1, "{}").replace("1.", "2.", 1), "signature is not valid"),  # moved to another job
    (seal(SECRET, "job", 1, "{}") + " ", "signature is not valid"),  # changed
], ids=["garbage", "json", "forged", "short-mac", "other-secret", "other-purpose", "other-job", "changed"])
def test_a_frame_not_signed_for_this_purpose_with_this_secret_is_refused(frame: str, reason: str):
    with pytest.raises(BadFrame, match=reason):
        unseal(SECRET, "job", frame, 1000)


def test_an_oversize_frame_is_refused_before_it_is_checked_or_decoded(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("an oversize frame was looked into")

    monkeypatch.setattr(signing, "_mac", never)
    monkeypatch.setattr(wire, "loads", never)
    frame = "1." + "0" * 64 + "." + "x" * 2000
    with pytest.raises(BadFrame, match="over the cap"):
        unseal(SECRET, "job", frame, 1000)
    with pytest.raises(BadFrame, match="over the cap"):
        wire.job_from_frame(frame.encode(), SECRET, 1000)
    with pytest.raises(BadFrame, match="over the cap"):
        wire.envelope_from_frame(frame, SECRET, 1000)


def test_job_secret_must_be_set_and_long():
    assert "is not set" in secret_problem("") and "secrets.token_urlsafe" in secret_problem("")
    assert "too short (8 characters, at least 32)" in secret_problem("password")
    assert secret_problem(JOB_SECRET) is None


def kombu_message(content: bytes, **fields) -> bytes:
    """A message as kombu's Redis transport keeps it in a queue (`fields` replace its own)."""
    return json.dumps({
        "body": base64.b64encode(content).decode(), "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"task": "avatar.run_job", "id": new_task_id(7), "argsrepr": "<job 7>"},
        "properties": {"delivery_tag": "d1", "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": "avatar.jobs"}}} | fields).encode()


@pytest.mark.parametrize(("item", "reason"), [
    (b"not json", "not JSON"), (b"\xff\xfe", "not JSON"), (b"[" * 100_000, "not JSON"), (b"[]", "not a message"),
    (b"{}", "not a message"), (b'{"body": 1}', "not a message"),
    (b'{"body": "", "properties": {"delivery_tag": "x"}}', "not a message"),
    (kombu_message(b"[]", properties={"delivery_tag": "d", "body_encoding": "base64", "delivery_info": {}}),
     "not a message"),
    (kombu_message(b"[]", body="!!!"), "not base64"),
], ids=["text", "binary", "deep", "list", "empty", "body", "no-delivery-info", "no-routing", "bad-base64"])
def test_an_item_kombu_could_not_read_is_named_as_such(item: bytes, reason: str):
    assert reason in message_problem(item, 1 << 20)


def test_a_task_message_passes_and_names_its_job():
    message = kombu_message(json.dumps([[seal(SECRET, "job", 7, "{}")], {}, {}]).encode())
    assert message_problem(message, 1 << 20) is None
    assert job_of_message(message) == 7 and job_of_message(b'{"root_id": "x"}') is None
    assert job_of_message(json.dumps([json.loads(message), "", "avatar.jobs"]).encode()) == 7  # as `unacked` keeps it


def test_an_oversize_item_of_a_queue_is_dropped_before_it_is_decoded(monkeypatch):
    class NoJson:
        @staticmethod
        def loads(*args, **kwargs):
            raise AssertionError("an oversize item was decoded")

    monkeypatch.setattr(celery_transport, "json", NoJson)
    assert "over the cap" in message_problem(b"{" + b" " * 5000 + b"}", 4096)


def test_an_item_the_transport_refuses_is_popped_as_if_the_queue_were_empty(monkeypatch, caplog):
    """What kombu sees of a refused item is a BRPOP that timed out: nothing to deliver, no error."""
    import redis

    message = kombu_message(b"[]")
    answers = iter([(b"avatar.jobs", b"not json"), (b"avatar.jobs", message)])
    monkeypatch.setattr(redis.Redis, "parse_response", lambda self, connection, command, **options: next(answers))
    client = celery_transport._CheckedRedis(max_message_bytes=1 << 20)
    assert client.parse_response(None, "BRPOP") is None
    assert "dropped an item of queue avatar.jobs: it is not JSON" in caplog.text
    assert client.parse_response(None, "BRPOP") == (b"avatar.jobs", message)


def test_a_job_frame_refers_to_no_other_job():
    frame = wire.job_to_frame(wire.SignedJob(train_item(9), "t", 1.0), SECRET)
    assert signing.job_id_of(frame) == 9
