"""Database schema as an ordered list of migration steps, applied by ``PRAGMA user_version``.

Steps are append-only: a database at version N has run exactly the first N steps, so an old
data folder is upgraded in place and keeps its rows. Never edit a step that has shipped; add one.
"""

from __future__ import annotations

import logging

import aiosqlite

log = logging.getLogger(__name__)

# Step 1: the tables. Times are Unix seconds (REAL); JSON columns hold text; Discord ids are INTEGER.
_V1 = [
    """CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        handle TEXT UNIQUE COLLATE NOCASE,
        class_word TEXT,
        settings TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL
    )""",
    """CREATE TABLE photos (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        owner INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        sha256 TEXT NOT NULL,
        phash TEXT NOT NULL,
        path TEXT NOT NULL,
        byte_size INTEGER NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        face_box TEXT,
        quality_flags TEXT NOT NULL DEFAULT '[]',
        created_at REAL NOT NULL,
        UNIQUE (owner, sha256)
    )""",
    """CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL CHECK (kind IN ('train', 'generate')),
        owner INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        state TEXT NOT NULL DEFAULT 'queued'
            CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
        params TEXT NOT NULL DEFAULT '{}',
        progress TEXT NOT NULL DEFAULT '{}',
        channel_id INTEGER,
        message_id INTEGER,
        result TEXT,
        error TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        updated_at REAL NOT NULL
    )""",
    "CREATE INDEX jobs_by_owner ON jobs (owner, kind, state)",
    """CREATE TABLE models (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        owner INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        job_id INTEGER REFERENCES jobs(id) ON DELETE SET NULL,
        lora_path TEXT NOT NULL,
        base_model TEXT NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}',
        active INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    )""",
    # At most one active model per person, enforced by the database rather than by care.
    "CREATE UNIQUE INDEX models_one_active ON models (owner) WHERE active = 1",
    """CREATE TABLE generations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        owner INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        model_id INTEGER REFERENCES models(id) ON DELETE SET NULL,
        job_id INTEGER REFERENCES jobs(id) ON DELETE SET NULL,
        prompt TEXT NOT NULL,
        negative TEXT NOT NULL DEFAULT '',
        seeds TEXT NOT NULL DEFAULT '[]',
        params TEXT NOT NULL DEFAULT '{}',
        paths TEXT NOT NULL DEFAULT '[]',
        channel_id INTEGER,
        message_id INTEGER,
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX generations_by_owner ON generations (owner)",
]

# Step 2: crash safety for the job queue (leases, attempts, resumable checkpoints, cancellation),
# the index that makes claiming the next job cheap, and message lookup for buttons after a restart.
_V2 = [
    "ALTER TABLE jobs ADD COLUMN worker_id TEXT",
    "ALTER TABLE jobs ADD COLUMN lease_expires_at REAL",
    "ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE jobs ADD COLUMN checkpoint_path TEXT",
    "ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX jobs_by_state ON jobs (state, kind, id)",
    "CREATE INDEX generations_by_message ON generations (message_id)",
]

# Step 3: bot restarts counted apart from attempts, so a restart does not use up the one retry a
# job gets when its worker dies.
_V3 = [
    "ALTER TABLE jobs ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0",
]

# Step 4: the message with a finished training's sample pictures, so /forget can delete it too.
_V4 = [
    "ALTER TABLE jobs ADD COLUMN result_channel_id INTEGER",
    "ALTER TABLE jobs ADD COLUMN result_message_id INTEGER",
]

# Step 5: crash-safe /forget and picture retention. A person in `forgotten` is being deleted: their
# files go first, then their rows and this one together, and a start finishes what a crash
# interrupted. Meanwhile nothing new of theirs may be stored (the triggers), so nothing can be left
# behind. Generations are looked up by age to delete their pictures after PICTURE_RETENTION_DAYS.
_V5 = [
    "CREATE TABLE forgotten (user_id INTEGER PRIMARY KEY, started_at REAL NOT NULL)",
    *(
        f"""CREATE TRIGGER {table}_of_the_forgotten BEFORE INSERT ON {table}
            WHEN EXISTS (SELECT 1 FROM forgotten WHERE user_id = NEW.owner)
            BEGIN SELECT RAISE(ABORT, 'this person is being forgotten'); END"""
        for table in ("photos", "jobs", "models", "generations")
    ),
    "CREATE INDEX generations_by_age ON generations (created_at)",
]

# Step 6: running it for a community. `consents`: a person's yes before their first photo is kept
# (gone with them on /forget). `bans` and `guild_limits` are the operators' records, which outlive a
# forgotten person. `usage` counts what quotas limit (id, kind, time only), kept for 8 days so that
# /forget cannot reset a day's quota. `admin_actions`: who did what with /admin. A job records
# the server it counts against (NULL: none, e.g. a user-installed app in DMs).
_V6 = [
    """CREATE TABLE consents (
        user_id INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
        text_sha256 TEXT NOT NULL,
        accepted_at REAL NOT NULL
    )""",
    """CREATE TABLE bans (
        user_id INTEGER PRIMARY KEY,
        banned_by INTEGER NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        banned_at REAL NOT NULL
    )""",
    """CREATE TABLE guild_limits (
        guild_id INTEGER PRIMARY KEY,
        limits TEXT NOT NULL DEFAULT '{}',
        updated_by INTEGER NOT NULL,
        updated_at REAL NOT NULL
    )""",
    """CREATE TABLE usage (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        owner INTEGER NOT NULL,
        guild_id INTEGER,
        kind TEXT NOT NULL CHECK (kind IN ('train', 'picture', 'flagged')),
        amount INTEGER NOT NULL DEFAULT 1,
        at REAL NOT NULL
    )""",
    "CREATE INDEX usage_by_owner ON usage (owner, kind, at)",
    "CREATE INDEX usage_by_guild ON usage (guild_id, kind, at)",
    """CREATE TABLE admin_actions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        admin_id INTEGER NOT NULL,
        guild_id INTEGER,
        action TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        at REAL NOT NULL
    )""",
    "ALTER TABLE jobs ADD COLUMN guild_id INTEGER",
]

# Step 7: a person's own defaults for /imagine (/settings), one row per person who set any, gone with
# them on /forget. Typed columns rather than the users row's JSON `settings`: each value is read
# without parsing and NULL means "not set, use the built-in default". Which values are valid (styles,
# shapes, how many pictures) is the code's to say, so it is checked there, and a stored value the
# code no longer knows is ignored rather than refused. Like the other tables of a person, nothing may
# be stored for them while they are being forgotten.
_V7 = [
    """CREATE TABLE user_settings (
        user_id INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
        negative_prompt TEXT,
        style TEXT,
        aspect TEXT,
        num_images INTEGER,
        face_pass INTEGER CHECK (face_pass IN (0, 1)),
        updated_at REAL NOT NULL
    )""",
    """CREATE TRIGGER user_settings_of_the_forgotten BEFORE INSERT ON user_settings
        WHEN EXISTS (SELECT 1 FROM forgotten WHERE user_id = NEW.user_id)
        BEGIN SELECT RAISE(ABORT, 'this person is being forgotten'); END""",
]

MIGRATIONS: list[list[str]] = [_V1, _V2, _V3, _V4, _V5, _V6, _V7]
LATEST_VERSION = len(MIGRATIONS)


class SchemaTooNewError(RuntimeError):
    """The database was written by a newer release; running older code on it could lose data."""


async def schema_version(conn: aiosqlite.Connection) -> int:
    """Return the schema version recorded in the database file."""
    async with conn.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def migrate(conn: aiosqlite.Connection, target: int | None = None) -> int:
    """Bring the database up to ``target`` (the latest by default), one step per transaction, and return
    the version reached.

    Each step and its ``user_version`` bump commit together, so a crash mid-upgrade leaves the
    database at the last completed step. ``BEGIN IMMEDIATE`` makes two processes starting at once
    take turns; the version is read again inside the lock so a step never runs twice.
    The connection must be in autocommit mode (``isolation_level=None``).
    """
    target = LATEST_VERSION if target is None else target
    if target > LATEST_VERSION:
        raise ValueError(f"no migration step for version {target}")
    while True:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            version = await schema_version(conn)
            if version > LATEST_VERSION:
                raise SchemaTooNewError(
                    f"database schema version {version} is newer than this code ({LATEST_VERSION}); "
                    "update the bot before opening this data folder"
                )
            if version >= target:
                await conn.execute("COMMIT")
                return version
            for statement in MIGRATIONS[version]:
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {version + 1}")
            await conn.execute("COMMIT")
            log.info("database schema migrated to version %d", version + 1)
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
