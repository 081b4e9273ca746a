"""The account cog's start: what it prepares before the first command."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from bot.cogs import account


async def test_the_word_list_is_read_at_start_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first /handle of a process would otherwise read wordfreq's list on the event loop."""
    threads: list[threading.Thread] = []
    monkeypatch.setattr(account, "load_word_list", lambda: threads.append(threading.current_thread()))
    bot: Any = object()
    await account.AccountCog(bot).cog_load()
    assert len(threads) == 1 and threads[0] is not threading.main_thread()
