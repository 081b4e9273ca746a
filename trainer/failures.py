"""Any exception from a job, turned into the error event its owner reads."""

from __future__ import annotations

import logging

from common.logs import log_with_reference
from jobs import events
from jobs.events import Event
from jobs.requests import BadRequest
from trainer.errors import ModelUnavailable, OutOfMemory, TrainerError

log = logging.getLogger(__name__)


def describe_failure(exc: BaseException) -> Event:
    """Turn any exception from a job into an error event a person can read."""
    if isinstance(exc, ModelUnavailable):  # the operator's to mend: the details (paths, hints) go to the log
        log.error("the base model is unavailable: %s", exc.message)
        return events.Error("The GPU worker could not load its base model, so it cannot run jobs until the "
                            "server's operator fixes that (the details are in the worker's log).", exc.code)
    if isinstance(exc, TrainerError | BadRequest):
        return events.Error(exc.message, exc.code)
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        oom = OutOfMemory("The GPU ran out of memory. Try fewer or smaller pictures at once; if it keeps "
                          "happening, tell the server's operator.")
        return events.Error(oom.message, oom.code)
    if isinstance(exc, OSError) and exc.errno == 28:
        return events.Error("The server's disk is full; the operator has to free some space.", "disk_full")
    reference = log_with_reference(log, "a job", exc)
    return events.Error(f"Something went wrong on the GPU worker (reference {reference}).", "internal")
