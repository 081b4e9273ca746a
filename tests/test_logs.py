"""The token never appears in a log line, whatever logs it."""

import logging

from trainer.logs import REDACTED, setup_logging


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
