"""Stopping the bot: signals, the order of a graceful stop, what people are told, the heartbeat.

tests/e2e/test_stop.py stops a real `python -m bot` mid-training; these check each piece alone.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import AsyncMock

import pytest

from bot.app import AvatarBot, run_until_stopped, stop_on_signals
from bot.config import load_settings
from bot.health import STALE_AFTER_S, beat, main, problem
from bot.notifier import Notifier
from jobs.events import Progress
from storage import jobs_db
from tests.polling import wait_until


class StubBot:
    """What run_until_stopped uses of the bot: `start` runs until `close`; `set_up` as the real one."""

    def __init__(self, set_up: bool) -> None:
        self.set_up = set_up
        self.started, self.closed = asyncio.Event(), asyncio.Event()
        self.close_calls = 0
        self.start_cancelled = False

    async def start(self, token: str) -> None:
        self.started.set()
        try:
            await self.closed.wait()
        except asyncio.CancelledError:
            self.start_cancelled = True
            raise

    async def close(self) -> None:
        self.close_calls += 1
        self.closed.set()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_sigterm_and_sigint_close_the_bot_and_return_normally(sig):
    bot, stop = StubBot(set_up=True), asyncio.Event()
    with stop_on_signals(stop):
        running = asyncio.create_task(run_until_stopped(bot, "token", stop))
        await bot.started.wait()
        os.kill(os.getpid(), sig)
        await asyncio.wait_for(running, 30)  # returns: no KeyboardInterrupt, no exception
    assert bot.close_calls == 1 and not bot.start_cancelled
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers go with the bot
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler


async def test_a_signal_during_set_up_cuts_it_short_before_closing():
    """Closing alone would let a set-up still under way start workers after the close."""
    bot, stop = StubBot(set_up=False), asyncio.Event()
    with stop_on_signals(stop):
        running = asyncio.create_task(run_until_stopped(bot, "token", stop))
        await bot.started.wait()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(running, 30)
    assert bot.start_cancelled and bot.close_calls == 1


async def test_a_second_signal_while_stopping_hands_the_next_one_back_to_the_system():
    """The operator's way out of a stop that hangs: the third signal is not caught any more."""
    stop = asyncio.Event()
    with stop_on_signals(stop):
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 30)
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL  # one signal: still caught
        os.kill(os.getpid(), signal.SIGTERM)
        assert await wait_until(lambda: signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
        assert signal.getsignal(signal.SIGINT) == signal.default_int_handler


async def test_an_error_of_the_bot_itself_is_raised_not_swallowed():
    class Refusing(StubBot):
        async def start(self, token: str) -> None:
            raise RuntimeError("login refused")

    with pytest.raises(RuntimeError, match="login refused"):
        await run_until_stopped(Refusing(set_up=False), "token", asyncio.Event())


def _settings(tmp_path: Path, **env: str):
    return load_settings({"DISCORD_TOKEN": "t" * 30, "DATA_DIR": str(tmp_path / "data"), **env}, env_file=None)


async def test_close_stops_the_workers_then_tells_people_then_leaves_discord_once(tmp_path):
    heartbeat = tmp_path / "heartbeat"
    bot = AvatarBot(_settings(tmp_path, HEARTBEAT_FILE=str(heartbeat)), SimpleNamespace(), SimpleNamespace())
    bot.set_up = True
    heartbeat.write_text("1\n")
    order: list[str] = []
    bot.scheduler.stop = AsyncMock(side_effect=lambda: order.append("workers stopped"))  # type: ignore[method-assign]
    bot.notifier.bot_stopping = AsyncMock(side_effect=lambda timeout: order.append("people told"))  # type: ignore[method-assign]
    await asyncio.gather(bot.close(), bot.close())  # docker stop's SIGTERM, then `async with` leaving
    await bot.close()
    assert order == ["workers stopped", "people told"]
    assert bot.is_closed() and not heartbeat.exists()


def _notifier(jobs: list[SimpleNamespace]) -> tuple[Notifier, dict[int, AsyncMock]]:
    """A notifier over `jobs`, each answered through an interaction whose edits are recorded."""
    notifier = Notifier(SimpleNamespace(store=SimpleNamespace(db=None), settings=SimpleNamespace(progress_interval_s=0),
                                        scheduler=SimpleNamespace(waiting_for_a_worker=lambda: False)))
    edits = {}
    for job in jobs:
        edits[job.id] = AsyncMock()
        notifier.attach_interaction(job.id, SimpleNamespace(edit_original_response=edits[job.id],
                                                            is_expired=lambda: False))
    return notifier, edits


def _job(job_id: int, kind: str, state: str, checkpoint: str | None = None, step: int = 0) -> SimpleNamespace:
    return SimpleNamespace(id=job_id, kind=kind, state=state, checkpoint_path=checkpoint, channel_id=1,
                           message_id=job_id, progress={"stage": "training", "step": step, "total": 60})


async def test_each_waiting_or_running_job_says_what_the_stop_means_for_it(monkeypatch):
    jobs = [_job(1, "train", "running", "users/5/checkpoints/a.zip", step=9), _job(2, "train", "running"),
            _job(3, "train", "queued"), _job(4, "generate", "queued")]
    monkeypatch.setattr(jobs_db, "jobs_in_states", AsyncMock(return_value=jobs))
    monkeypatch.setattr(jobs_db, "queue_position", AsyncMock(return_value=1))
    notifier, edits = _notifier(jobs)
    await notifier.bot_stopping(timeout=10)
    text = {job_id: edit.await_args.kwargs["content"] for job_id, edit in edits.items()}
    assert text[1].endswith("The bot stopped your training for a restart; it continues from its last "
                            "checkpoint once the bot is back.") and "step 9/60" in text[1]
    assert text[2].endswith("it starts again once the bot is back.")  # no checkpoint yet: from the start
    assert text[3].endswith("your training keeps its place in the queue.") and "Position in the queue: 1" in text[3]
    assert text[4].endswith("your pictures will be drawn once it is back.")


async def test_the_stop_note_goes_under_the_latest_progress_shown_not_the_older_stored_one(monkeypatch):
    """The scheduler writes progress to the database at most once a second; the message is newer."""
    stored = _job(1, "train", "running", "users/5/checkpoints/a.zip", step=8)
    monkeypatch.setattr(jobs_db, "jobs_in_states", AsyncMock(return_value=[stored]))
    notifier, edits = _notifier([stored])
    await notifier.job_updated(_job(1, "train", "running", step=11), Progress("training", 11, 60, 0.1, 5.0))
    await notifier.bot_stopping(timeout=10)
    last = edits[1].await_args.kwargs["content"]
    assert "step 11/60" in last and "continues from its last checkpoint" in last


async def test_a_stop_does_not_wait_on_discord_for_ever(monkeypatch, caplog):
    job = _job(1, "train", "running")
    monkeypatch.setattr(jobs_db, "jobs_in_states", AsyncMock(return_value=[job]))
    notifier, edits = _notifier([job])

    async def never_answered(**kwargs: object) -> None:
        await asyncio.Event().wait()
    edits[1].side_effect = never_answered
    await asyncio.wait_for(notifier.bot_stopping(timeout=0.1), 30)
    assert "stopping without telling everyone" in caplog.text


def test_the_health_check_says_healthy_only_while_the_heartbeat_is_fresh(tmp_path, capsys):
    path = tmp_path / "heartbeat"
    assert "not connected" in problem(path)
    beat(path)
    written = path.stat().st_mtime
    assert problem(path, now=written + 1) is None
    assert "no heartbeat for" in problem(path, now=written + STALE_AFTER_S + 1)
    assert main(["health", str(path)]) == 0 and capsys.readouterr().out == "healthy\n"
    path.unlink()
    assert main(["health", str(path)]) == 1 and "not connected" in capsys.readouterr().out


def test_a_heartbeat_file_in_a_folder_that_cannot_be_written_is_refused_at_start(tmp_path):
    from bot.config import ConfigError

    with pytest.raises(ConfigError) as info:
        _settings(tmp_path, HEARTBEAT_FILE=str(tmp_path / "missing" / "heartbeat"))
    assert info.value.problems == [f"HEARTBEAT_FILE='{tmp_path / 'missing' / 'heartbeat'}' is not in a writable "
                                   "folder; point it at a file in one (e.g. /tmp/bot-heartbeat) or leave it unset."]
    assert _settings(tmp_path).heartbeat_file is None
