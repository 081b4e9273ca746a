"""`python -m bot`: validate the settings, then run the bot until interrupted."""

from __future__ import annotations

import sys

from bot.config import ConfigError, load_settings
from bot.setup_help import SETUP_MESSAGE


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        if any(p.startswith("DISCORD_TOKEN") for p in exc.problems):
            print(SETUP_MESSAGE, file=sys.stderr)
        others = [p for p in exc.problems if not p.startswith("DISCORD_TOKEN")]
        if others:
            print("Please fix these settings (environment or .env):", file=sys.stderr)
            for problem in others:
                print(f"  - {problem}", file=sys.stderr)
        return 2
    from bot.app import run_bot  # imported late: a config error should not wait for discord.py

    return run_bot(settings)


if __name__ == "__main__":
    sys.exit(main())
