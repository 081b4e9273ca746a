"""A start helper's process (trainer.start_helpers tells what helpers do and who starts them): compile
the parts named on the command line into the shared compile cache, reporting each on stdout as it ends.

Apart from trainer.start_helpers because it runs a Worker, whose module imports that one.

    python -m trainer.start_helper_process --config '<WorkerConfig as JSON>' --part training   # one helper
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Sequence

from common.logs import setup_logging
from jobs.worker_config import WorkerConfig
from trainer.quiet_notices import quiet_known_noise
from trainer.start_helpers import DONE, FAILED

# Named, not __name__: a helper runs this module as __main__.
log = logging.getLogger("trainer.start_helper_process")


def exit_when_closed(fd: int, end: Callable[[], None]) -> None:
    """Call `end` once the file descriptor `fd` (the helper's stdin, which the worker holds) closes:
    the worker has ended, or no longer needs this helper. Unbuffered reads: a buffered stream's lock,
    held by this thread, would stop the interpreter's own exit."""
    while os.read(fd, 4096):
        pass
    end()


def report(outcome: str, part: str) -> None:
    """Tell the worker that `part` has ended (the protocol is this process's stdout; logs go to stderr)."""
    sys.stdout.write(f"{outcome} {part}\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """A helper: compile the parts named on the command line, reporting each as it ends."""
    from trainer.worker import Worker

    parser = argparse.ArgumentParser(prog="python -m trainer.start_helper_process",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the worker's configuration, as JSON")
    parser.add_argument("--part", action="append", required=True, help="a part to compile (repeatable)")
    args = parser.parse_args(argv)
    config = WorkerConfig(**json.loads(args.config))
    setup_logging(config.log_level)
    quiet_known_noise()
    multiprocessing.current_process().name = f"start-helper({','.join(args.part)})"
    threading.Thread(target=exit_when_closed, args=(sys.stdin.fileno(), lambda: os._exit(0)),
                     name="watch-worker", daemon=True).start()
    worker = Worker(config)
    for part in args.part:
        try:
            worker.compile_part(part)
        except Exception:  # noqa: BLE001 - the worker compiles the part itself
            log.exception("could not compile %s", part)
            report(FAILED, part)
        else:
            report(DONE, part)
    return 0


if __name__ == "__main__":
    sys.exit(main())
