"""`python -m trainer ...`: see trainer/cli.py. Prints the result lines, or a readable error."""

from __future__ import annotations

import sys

from tqdm.contrib.logging import logging_redirect_tqdm

from common.logs import setup_logging
from jobs.requests import BadRequest
from trainer.cli import run
from trainer.errors import TrainerError
from trainer.quiet_notices import quiet_known_noise


def main(argv: list[str] | None = None) -> int:
    setup_logging("INFO")
    quiet_known_noise()
    try:
        with logging_redirect_tqdm():
            lines = run(argv)
    except (TrainerError, BadRequest) as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped.", file=sys.stderr)
        return 130
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
