"""LOG_LEVEL=DEBUG writes no personal data: aiosqlite would log every statement with its values."""

from __future__ import annotations

import logging

from common.logs import setup_logging
from storage import generations_db, jobs_db, users_db
from storage.forget import forget_user
from storage.store import Storage

USER = 734_618_205_337_001_984  # shaped like a Discord id
HANDLE, PROMPT = "zqdebugmarker", "a prompt 5d1e9b riding a horse"


async def test_storage_at_debug_logs_no_sql_values(tmp_path, capsys):
    setup_logging("DEBUG")
    logging.getLogger("storage.test").debug("our own debug line")
    async with await Storage.open(tmp_path) as store:
        await users_db.set_handle(store.db, USER, HANDLE, "person")
        await jobs_db.create_job(store.db, "generate", USER, {"request": {"prompt": PROMPT}})
        await generations_db.add_generation(store.db, USER, None, None, PROMPT, "", [1], {}, [])
        await forget_user(store, USER)
    err = capsys.readouterr().err
    assert "our own debug line" in err  # DEBUG is on ...
    for value in (HANDLE, PROMPT, str(USER)):  # ... and none of the values reached the log
        assert value not in err
    assert logging.getLogger("aiosqlite").getEffectiveLevel() == logging.INFO
