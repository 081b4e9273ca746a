"""The token never appears in a log line, whatever logs it."""

import logging

import pytest

from trainer.logs import REDACTED, setup_logging


@pytest.fixture(autouse=True)
def restore_root_logger():
    """setup_logging replaces the root handlers; later tests must not log into this test's stderr."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_secret_and_token_shapes_are_redacted(capsys):
    secret = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GaBcDe.abcdefghijklmnopqrstuvwxyz0123"
    setup_logging("DEBUG", secrets=["plain-secret-value"])
    log = logging.getLogger("test.logs")
    log.info("connecting with %s", secret)
    log.warning("config had plain-secret-value inside")
    try:
        raise RuntimeError(f"bad token {secret}")
    except RuntimeError:
        log.exception("failed")
    err = capsys.readouterr().err
    assert secret not in err and "plain-secret-value" not in err
    assert err.count(REDACTED) == 3
    assert "connecting with" in err and "RuntimeError" in err
