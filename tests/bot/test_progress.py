"""Progress text and the edit throttle."""

import asyncio

from bot.progress import STAGE_LABELS, ThrottledEditor, format_duration, progress_bar, render_progress


def test_bar_and_durations():
    assert progress_bar(0.35, width=20) == "[#######-------------]  35%"
    assert progress_bar(1.5, width=4) == "[####] 100%"
    assert format_duration(None) == "unknown"
    assert format_duration(12.4) == "12 s"
    assert format_duration(0.2) == "under a second"
    assert format_duration(250) == "4 min 10 s"
    assert format_duration(3900) == "1 h 05 min"


def test_render_progress_shows_stage_step_and_eta():
    text = render_progress("Training", {"stage": "training", "step": 200, "total": 800, "eta_s": 95})
    assert "Training your model" in text
    assert "step 200/800" in text and " 25%" in text
    assert "1 min 35 s" in text
    resumed = render_progress("Training", {"stage": "training", "detail": "resumed at step 200"})
    assert "Stage: Training your model (resumed at step 200)" in resumed
    assert "Time left" not in render_progress("Training", {"stage": "class_images", "step": 1, "total": 4})
    assert "Time left" not in render_progress("Training", {"stage": "training", "step": 8, "total": 8, "eta_s": 0})
    queued = render_progress("Training", {}, queue_position=3)
    assert "Waiting in the queue" in queued and "Position in the queue: 3" in queued


def test_every_stage_a_worker_reports_has_words_for_people():
    from jobs.events import STAGES

    assert set(STAGES) <= set(STAGE_LABELS)
    face = render_progress("Drawing", {"stage": "refining_face", "step": 3, "total": 10, "eta_s": 2})
    assert "Stage: Refining the face" in face and "step 3/10" in face


async def test_throttle_coalesces_to_first_and_latest():
    sent: list[str] = []

    async def edit(text, image):
        sent.append(text)

    editor = ThrottledEditor(edit, interval=0.05)
    editor.update("step 0")
    await asyncio.sleep(0.01)  # the first state goes out at once
    for i in range(1, 10):
        editor.update(f"step {i}")
    await editor.flush()
    assert sent == ["step 0", "step 9"]
    editor.update("step 9")  # unchanged state: no edit
    await editor.flush()
    assert sent == ["step 0", "step 9"]


async def test_edits_are_an_interval_apart_on_the_editors_clock(monkeypatch):
    """On a clock that only the editor's own waiting moves, so nothing else running changes it."""
    now = [0.0]
    sent: list[tuple[float, str]] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds):
        now[0] += seconds
        await real_sleep(0)

    async def edit(text, image):
        sent.append((now[0], text))

    monkeypatch.setattr(asyncio, "sleep", sleep)
    editor = ThrottledEditor(edit, interval=3.0, clock=lambda: now[0])
    editor.update("step 0")
    await editor.flush()  # the first edit goes out at once
    editor.update("step 1")
    await editor.flush()  # the next waits out the interval
    now[0] += 1.0
    editor.update("step 2")
    await editor.flush()  # what is left of it
    now[0] += 5.0
    editor.update("step 3")
    await editor.flush()  # nothing is left: at once
    assert sent == [(0.0, "step 0"), (3.0, "step 1"), (6.0, "step 2"), (11.0, "step 3")]


async def test_the_interval_counts_from_when_an_edit_landed(monkeypatch):
    """An edit that met rate limits (discord.py waits out a 429 inside the call) took seconds; the
    next one still waits a whole interval after it."""
    now = [0.0]
    sent: list[tuple[float, str]] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds):
        now[0] += seconds
        await real_sleep(0)

    async def edit(text, image):
        if text == "step 0":
            now[0] += 4.0  # retried after a 429
        sent.append((now[0], text))

    monkeypatch.setattr(asyncio, "sleep", sleep)
    editor = ThrottledEditor(edit, interval=1.0, clock=lambda: now[0])
    editor.update("step 0")
    await editor.flush()
    editor.update("step 1")
    await editor.flush()
    assert sent == [(4.0, "step 0"), (5.0, "step 1")]


async def test_failed_edit_does_not_stop_later_edits():
    sent: list[str] = []

    async def edit(text, image):
        if text == "bad":
            raise RuntimeError("discord said no")
        sent.append(text)

    editor = ThrottledEditor(edit, interval=0.0)
    editor.update("bad")
    await editor.flush()
    editor.update("good")
    await editor.flush()
    await asyncio.sleep(0)
    assert sent == ["good"]


async def test_a_preview_waiting_to_be_sent_survives_newer_text_without_one():
    sent: list[tuple[str, bytes | None]] = []

    async def edit(text, image):
        sent.append((text, image))

    editor = ThrottledEditor(edit, interval=0.05)
    editor.update("step 0")
    await asyncio.sleep(0.01)
    editor.update("step 8", b"preview-png")
    editor.update("step 9")  # arrives before the interval allows another edit
    await editor.flush()
    assert sent == [("step 0", None), ("step 9", b"preview-png")]


def test_a_queued_job_says_when_no_worker_is_online_to_take_it():
    from bot.progress import NO_WORKER_ONLINE
    from bot.views import queued_text

    assert NO_WORKER_ONLINE in render_progress("Training", {}, 2, no_worker=True)
    assert NO_WORKER_ONLINE not in render_progress("Training", {}, 2)
    # Once running, a worker has it: the note would be wrong.
    assert NO_WORKER_ONLINE not in render_progress("Training", {"stage": "training"}, None, no_worker=True)
    assert queued_text(3, no_worker=True) == f"Queued (position 3). {NO_WORKER_ONLINE}"
    assert queued_text(3) == "Queued (position 3)."
    assert queued_text(None, no_worker=True) == "Starting…"


async def test_a_refused_reroll_is_told_only_to_the_person_who_pressed(monkeypatch):
    """After a public "thinking" deferral Discord turns the first followup into that public message,
    whatever its flags say: the refusal must come after the deferral is deleted."""
    from types import SimpleNamespace
    from unittest.mock import AsyncMock, MagicMock

    from bot.access import Grant
    from bot.config import Settings
    from bot.safety import Safety
    from bot.scheduler import Refused
    from bot.views import _queue_generation
    from storage import generations_db

    generation = SimpleNamespace(owner=7, params={"request": {"prompt": "x"}})
    monkeypatch.setattr(generations_db, "get_generation", AsyncMock(return_value=generation))
    calls = MagicMock()  # one parent records the order of the calls below
    for name in ("defer", "delete_original_response", "send"):
        setattr(calls, name, AsyncMock())
    interaction = SimpleNamespace(
        user=SimpleNamespace(id=7), channel=None,
        client=SimpleNamespace(store=SimpleNamespace(db=None), safety=Safety(Settings()), scheduler=SimpleNamespace(
            enqueue_generate=AsyncMock(side_effect=Refused("You already have 3 pictures waiting.")),
            check_generate=AsyncMock()),
            access=SimpleNamespace(require=AsyncMock(return_value=Grant(None)))),
        response=SimpleNamespace(defer=calls.defer, is_done=lambda: calls.defer.await_count > 0),
        delete_original_response=calls.delete_original_response,
        followup=SimpleNamespace(send=calls.send))
    await _queue_generation(interaction, 1, None)
    assert [c[0] for c in calls.mock_calls] == ["defer", "delete_original_response", "send"]
    assert calls.send.await_args.kwargs == {"ephemeral": True}
    assert calls.send.await_args.args == ("You already have 3 pictures waiting.",)


async def test_a_model_trained_without_sample_pictures_is_announced_without_them(monkeypatch):
    from types import SimpleNamespace
    from unittest.mock import AsyncMock

    from bot.config import Settings
    from bot.notifier import Notifier
    from bot.safety import Safety

    recorded = AsyncMock()
    monkeypatch.setattr("bot.notifier.jobs_db.set_result_message", recorded)
    sent = SimpleNamespace(id=9, channel=SimpleNamespace(id=8))
    notifier = Notifier(SimpleNamespace(store=SimpleNamespace(db="db"), safety=Safety(Settings())))
    channel = SimpleNamespace(send=AsyncMock(return_value=sent))
    notifier._dm = AsyncMock(return_value=channel)
    job = SimpleNamespace(id=4, kind="train", state="succeeded", owner=5, params={"handle": "zqjane"},
                          channel_id=None, message_id=None)
    await notifier.job_finished(job, {"samples": [], "hints": ["zqjane person on the moon"]})
    text, files = channel.send.await_args.args[0], channel.send.await_args.kwargs["files"]
    assert files == [] and "Here is" not in text
    assert "I couldn't draw its sample pictures this time; `/imagine` shows you **zqjane**." in text
    assert "`/imagine prompt:zqjane person on the moon`" in text
    recorded.assert_awaited_once_with("db", 4, 8, 9)  # /forget deletes that message too


async def test_a_failed_picture_request_repeats_the_prompt_it_replaces():
    from types import SimpleNamespace
    from unittest.mock import AsyncMock

    from bot.notifier import Notifier

    notifier, channel = Notifier(SimpleNamespace()), SimpleNamespace(send=AsyncMock())
    notifier._dm = AsyncMock(return_value=channel)
    job = SimpleNamespace(id=6, kind="generate", state="failed", owner=5, channel_id=None, message_id=None,
                          error="The GPU ran out of memory.", params={"request": {"prompt": "zqjane on a *tiny* horse"}})
    await notifier.job_finished(job, {})
    assert channel.send.await_args.args[0] == ("Sorry, no pictures this time: The GPU ran out of memory.\n"
                                               "Your prompt was: **zqjane on a \\*tiny\\* horse**")
