"""One way to report an unexpected failure: the details go to the log under a short reference, and
the person is shown only the reference, which the operator can look up."""

from __future__ import annotations

import logging
import uuid


def log_with_reference(log: logging.Logger, doing: str, exc_info: BaseException | bool = True) -> str:
    """Log that `doing` failed, with the exception (by default the one being handled), under a new
    reference; return the reference for the message a person sees."""
    reference = uuid.uuid4().hex[:8]
    log.error("%s failed (reference %s)", doing, reference, exc_info=exc_info)
    return reference
