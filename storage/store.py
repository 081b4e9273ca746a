"""The one object the bot holds: the database and the file store of one data folder."""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType

from storage.db import Database
from storage.files import FileStore
from storage.forget import finish_interrupted_forgets

log = logging.getLogger(__name__)

DB_NAME = "avatar.db"


class Storage:
    """``db`` for the query modules (storage.users_db, .photos_db, .jobs_db, .models_db, .generations_db) and
    ``files`` for what lives on disk."""

    def __init__(self, data_dir: Path, db: Database, files: FileStore) -> None:
        self.data_dir = data_dir
        self.db = db
        self.files = files

    @classmethod
    async def open(cls, data_dir: Path) -> Storage:
        """Create the data folder if needed, open and migrate ``DATA_DIR/avatar.db``, and finish any
        /forget that a crash interrupted (the person asked; nothing may bring their data back)."""
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        files = FileStore(data_dir)
        db = await Database.open(files.root / DB_NAME)
        storage = cls(files.root, db, files)
        try:
            await finish_interrupted_forgets(storage)
        except BaseException:
            await db.close()
            raise
        log.info("storage opened at %s", files.root)
        return storage

    async def close(self) -> None:
        await self.db.close()

    async def __aenter__(self) -> Storage:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
