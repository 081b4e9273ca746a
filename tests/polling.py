"""Waiting in tests for something that happens in another task, thread or process.

Both helpers return the predicate's first truthy value, or its last (falsy) one once `timeout` has
passed, so the test's own assertion says what did not happen. The default is generous: it only
bounds a failure, and a busy 2-core machine can be several times slower than an idle one. FakeDiscord's `wait_for` needs no
polling: it re-checks on every change the fake sees.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def wait_until(predicate: Callable[[], Any | Awaitable[Any]], timeout: float = 300.0,
                     interval: float = 0.05) -> Any:
    """Check `predicate` (plain or async) every `interval` seconds, letting the event loop run in
    between, until it is truthy or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value or time.monotonic() >= deadline:
            return value
        await asyncio.sleep(interval)


def wait_until_sync(predicate: Callable[[], Any], timeout: float = 300.0, interval: float = 0.05) -> Any:
    """`wait_until` for code outside an event loop: sleeps between checks."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(interval)
    return value
