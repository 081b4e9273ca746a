"""The /imagine path's messages and buttons, with stand-ins for Discord's objects."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from unittest.mock import AsyncMock

from bot.config import load_settings
from storage import generations as generations_db

PROMPT = "<@123456789012345678> and <@&223456789012345678> with @everyone in **paris**"


def _settings(tmp_path: Path):
    return load_settings({"DISCORD_TOKEN": "t" * 30, "DATA_DIR": str(tmp_path)}, env_file=None)


async def test_the_bot_sends_no_mentions(tmp_path):
    from bot.app import AvatarBot

    bot = AvatarBot(_settings(tmp_path), SimpleNamespace(), SimpleNamespace())
    assert bot.allowed_mentions is not None and bot.allowed_mentions.to_dict() == {"parse": []}


async def test_a_prompt_is_echoed_with_its_markdown_and_mentions_made_harmless(monkeypatch):
    from bot.notifier import Notifier

    monkeypatch.setattr(generations_db, "set_generation_message", AsyncMock())
    notifier = Notifier(SimpleNamespace(store=SimpleNamespace(db=None)))
    message = SimpleNamespace(channel=SimpleNamespace(id=1), id=2)
    interaction = SimpleNamespace(edit_original_response=AsyncMock(return_value=message))
    notifier.attach_interaction(3, interaction)
    job = SimpleNamespace(id=3, kind="generate", state="succeeded", owner=5, params={"request": {"prompt": PROMPT}})
    await notifier.job_finished(job, {"generation_id": 9, "images": [{"png": b"I", "seed": 42}]})
    first_line = interaction.edit_original_response.await_args.kwargs["content"].split("\n")[0]
    for mention in ("<@123456789012345678>", "<@&223456789012345678>", "@everyone"):
        assert mention not in first_line
    assert first_line.startswith("**<@\u200b123456789012345678>")
    assert first_line.endswith(r"in \*\*paris\*\***")  # only the outer pair makes it bold
