"""The token never appears in a log line, whatever logs it."""

import logging

from common.logs import REDACTED, setup_logging


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


def test_interaction_tokens_are_redacted_and_discord_py_never_logs_at_debug(capsys):
    token = "aW50ZXJhY3Rpb246MTIzNDU2Nzg5MDEyMzQ1Njc4OTpSb0h0ZUhYdA"
    setup_logging("DEBUG")
    logging.getLogger("discord.webhook.async_").info(
        "Webhook ID 42 with POST https://discord.com/api/v10/interactions/123456789/%s/callback", token)
    logging.getLogger("discord.gateway").debug("For Shard ID None: WebSocket Event: {'token': '%s'}", token)
    logging.getLogger("bot.app").debug("the bot's own debug line")
    err = capsys.readouterr().err
    assert token not in err and f"/interactions/123456789/{REDACTED}/callback" in err
    assert "WebSocket Event" not in err and "the bot's own debug line" in err
    setup_logging("WARNING")
    assert logging.getLogger("discord").getEffectiveLevel() == logging.WARNING


def test_a_bot_that_cannot_start_says_why_in_one_line(monkeypatch, caplog):
    """Settings that only fail once the bot talks to Discord or Redis end with a kind line, not a
    traceback written past the log's redaction."""
    import discord
    import redis

    from bot import app
    from bot.config import Settings
    from jobs.devices import NoSuchDevice

    settings = Settings(discord_token="t" * 30)
    failures = {
        discord.Forbidden(type("R", (), {"status": 403, "reason": "Forbidden"})(), "Missing Access"): "DEV_GUILD_ID",
        redis.ConnectionError("Error 111 connecting to localhost:6379"): "REDIS_URL",
        ConnectionRefusedError(111, "Connect call failed"): "Could not reach Discord",
        NoSuchDevice("DEVICE=cuda:3, but this machine shows 1 GPU, numbered from 0."): "DEVICE=cuda:3",
        ValueError("something nobody foresaw"): "unexpected error",
    }
    for error, says in failures.items():
        async def serve(_settings, error=error):
            raise error
        monkeypatch.setattr(app, "serve", serve)
        monkeypatch.setattr(app, "setup_logging", lambda *args, **kwargs: None)
        caplog.clear()
        assert app.run_bot(settings) == (2 if isinstance(error, NoSuchDevice) else 1)  # 2: fix the settings
        [record] = [r for r in caplog.records if r.name == "bot.app"]
        assert says in record.getMessage() and record.levelno == logging.ERROR
        assert (record.exc_info is not None) == isinstance(error, ValueError)  # a traceback only when unforeseen
