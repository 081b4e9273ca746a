"""Child processes start without the bot's secrets in their environment.

A spawned child inherits the environment whole, and it stays readable in /proc/<pid>/environ while
the child runs. Workers and photo-intake processes need none of these: the bot reads its settings
once, at start, and passes each process what it needs as arguments.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# The bot's Discord token, the secret that signs jobs, Redis's URL (its password).
SECRET_VARIABLES = ("DISCORD_TOKEN", "JOB_SECRET", "REDIS_URL")

_environment_lock = threading.Lock()


@contextmanager
def secrets_withheld() -> Iterator[None]:
    """The process environment without SECRET_VARIABLES for the block, while a child process starts."""
    with _environment_lock:
        saved = {name: os.environ.pop(name) for name in SECRET_VARIABLES if name in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)
