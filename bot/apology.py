"""The one way the bot says that something failed on its side: kind words and a reference that
the operator finds in the log next to the details."""

from __future__ import annotations

import logging

from common.logs import log_with_reference


def sorry(logger: logging.Logger, doing: str, then: str = "Please try again later.", *, while_: str = "",
          exc_info: BaseException | bool = True) -> str:
    """Log that `doing` failed, under a new reference, and return what the person is told: that it
    failed on the bot's side (`while_` says during what), the reference, and `then`, what to do."""
    reference = log_with_reference(logger, doing, exc_info)
    during = f" {while_}" if while_ else ""
    return f"Sorry, something went wrong on my side{during} (reference `{reference}`). {then}"
