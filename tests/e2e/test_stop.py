"""End to end: `python -m bot` stopped by a signal mid-training, as `docker stop` (SIGTERM) and Ctrl-C
(SIGINT) stop it, then started again.

The bot runs as a process of its own (tests.e2e.harness.BotSubprocess): the signal, its exit status,
its log and its heartbeat file are what an operator and Docker see.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from tests.e2e.harness import (
    BotSubprocess,
    e2e_settings,
    ready_to_train,
    samples_message,
    start_training,
    stored_rows,
)
from tests.polling import wait_until

pytestmark = pytest.mark.slow

STOPPED_LINE = re.compile(r"^\S+ \S+ INFO +MainProcess bot\.app: stopped$", re.MULTILINE)


def health(path) -> subprocess.CompletedProcess[str]:
    """What Docker's HEALTHCHECK runs."""
    return subprocess.run([sys.executable, "-m", "bot.health", str(path)], capture_output=True, text=True,
                          timeout=60)


def training_of(data_dir, owner: int) -> dict:
    [job] = stored_rows(data_dir, "SELECT * FROM jobs WHERE owner = ? AND kind = 'train'", (owner,))
    return job


async def test_sigterm_mid_training_keeps_the_checkpoint_says_so_and_the_next_start_resumes(fake, tmp_path):
    alice = fake.add_user("alice")
    data_dir, heartbeat = tmp_path / "data", tmp_path / "heartbeat"
    settings = e2e_settings(fake, data_dir, train_steps=60, heartbeat_file=heartbeat)
    first = BotSubprocess(fake, settings, tmp_path / "first.log")
    second = BotSubprocess(fake, settings, tmp_path / "second.log")
    try:
        await first.start()
        assert await wait_until(heartbeat.exists)
        assert health(heartbeat).returncode == 0
        await ready_to_train(fake, alice, "zqalice")
        progress = await start_training(fake, alice)

        def checkpointed() -> bool:  # a training past its first checkpoint, still running
            job = training_of(data_dir, alice.id)
            return job["state"] == "running" and job["checkpoint_path"] is not None
        assert await wait_until(checkpointed), "the training never stored a checkpoint"

        first.send_signal(signal.SIGTERM)
        assert await first.exit_status() == 0, first.log()
        log = first.log()
        assert STOPPED_LINE.search(log), log
        assert "SIGTERM received: stopping" in log and "workers stopped" in log
        stopped_at = [int(step) for step in re.findall(r"job \d+ checkpointed at step (\d+)", log)][-1]
        await fake.wait_for(lambda: "continues from its last checkpoint once the bot is back" in progress.content,
                            timeout=10)
        assert "The bot stopped your training for a restart" in progress.content
        assert re.search(r"step \d+/60", progress.content)  # the last progress shown stays, the note under it
        job = training_of(data_dir, alice.id)
        assert job["state"] == "running" and (data_dir / job["checkpoint_path"]).is_file()  # kept for the restart
        assert not heartbeat.exists() and health(heartbeat).returncode == 1  # Docker would see it unhealthy
        edits_before = len(progress.history)

        await second.start()
        await fake.wait_for(lambda: samples_message(fake, alice), timeout=300)
        job = training_of(data_dir, alice.id)
        assert (job["state"], job["attempts"], job["restarts"]) == ("succeeded", 1, 1)
        later = [version.content for version in progress.history[edits_before:]]
        assert any(f"resumed at step {stopped_at}" in text for text in later), later  # not from step 0
        assert later[-1].endswith("Done! Your model is ready.")

        second.send_signal(signal.SIGINT)  # Ctrl-C takes the same way out
        assert await second.exit_status() == 0, second.log()
        assert STOPPED_LINE.search(second.log()) and "SIGINT received: stopping" in second.log()
    finally:
        first.kill()
        second.kill()
    assert fake.unknown_routes == []
