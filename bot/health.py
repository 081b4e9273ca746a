"""The bot's heartbeat file, and `python -m bot.health`, the check Docker's HEALTHCHECK runs on it.

While the bot is connected to Discord, its event loop rewrites `HEARTBEAT_FILE` every
`HEARTBEAT_INTERVAL_S` seconds. The check reads only the file's age, so it imports nothing of
discord.py and costs a few milliseconds: a missing file or one older than `STALE_AFTER_S` means the
bot is not connected (a refused token, no network, a reconnect that does not succeed) or its event
loop is stuck, and Docker marks the container unhealthy with that reason.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HEARTBEAT_INTERVAL_S = 10.0
STALE_AFTER_S = 60.0  # several missed beats: one late beat on a busy host is no alarm


def beat(path: Path) -> None:
    """Say "connected and responsive" now."""
    path.write_text(f"{time.time():.0f}\n")


def problem(path: Path, now: float | None = None) -> str | None:
    """Why the bot is unhealthy according to its heartbeat file, or None when it is healthy."""
    now = time.time() if now is None else now
    try:
        age = now - path.stat().st_mtime
    except FileNotFoundError:
        return "no heartbeat: the bot is not connected to Discord (starting, stopped, or see its log)"
    if age > STALE_AFTER_S:
        return (f"no heartbeat for {age:.0f} s: the bot lost its connection to Discord or is stuck "
                "(see its log)")
    return None


def main(argv: list[str]) -> int:
    """Exit 0 when healthy, 1 (Docker's "unhealthy") with the reason on stdout otherwise."""
    where = argv[1] if len(argv) > 1 else os.environ.get("HEARTBEAT_FILE", "")
    if not where:
        sys.stdout.write("HEARTBEAT_FILE is not set, so the bot writes no heartbeat to check.\n")
        return 1
    reason = problem(Path(where))
    sys.stdout.write(f"{reason or 'healthy'}\n")  # Docker shows it in `docker inspect`
    return 1 if reason else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
