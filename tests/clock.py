"""A clock that tests move by hand, for code that takes a `clock` (the scheduler, quotas, access)."""

from __future__ import annotations

import time


class FakeClock:
    """Returns `now`, which stays put until a test changes it: time passes without waiting."""

    def __init__(self, now: float | None = None) -> None:
        self.now = float(int(time.time())) if now is None else now

    def __call__(self) -> float:
        return self.now
