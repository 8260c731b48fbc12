"""The results schema in PostgreSQL: its tables (DDL), the migrations that bring a database
up to :data:`SCHEMA_VERSION` (the SQLite adapter's numbering), and the migration itself, in
one transaction under an advisory lock."""

from __future__ import annotations

from typing import Final

import psycopg

from chipscale.errors import StoreError

#: Bump with a migration in :data:`MIGRATIONS` when the schema changes. The numbering is
#: the SQLite adapter's: a version means the same tables in both stores.
SCHEMA_VERSION: Final = 4

# Key columns use the "C" collation: the byte order of UTF-8, as SQLite compares text, so
# both stores list jobs and results in the same order (and memcmp keeps inserts cheap).
_CREATE_V1 = """
CREATE TABLE schema_version (
    version       integer PRIMARY KEY,
    applied_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE jobs (
    job           text COLLATE "C" PRIMARY KEY,
    source        text NOT NULL,
    zoom          integer,
    model_name    text,
    model_version text,
    classes       jsonb NOT NULL DEFAULT '[]',
    tiles_total   bigint,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    extra         jsonb NOT NULL DEFAULT '{}'
);
-- No foreign key to jobs: a worker may write results of a job it never registered.
-- output is json, not jsonb: json keeps the model's text as written, so the class order
-- that exports show when a job records no classes is the model's, as with SQLite (jsonb
-- reorders keys by length), and json skips the conversion on the write path.
CREATE TABLE results (
    job           text COLLATE "C" NOT NULL,
    z             integer NOT NULL,
    x             bigint NOT NULL,
    y             bigint NOT NULL,
    status        text NOT NULL CHECK (status IN ('ok', 'empty', 'error')),
    output        json,
    model_name    text,
    model_version text,
    error         text,
    attempts      integer NOT NULL DEFAULT 1,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job, z, x, y)
);
-- Download by job and status (and resume: the done tiles of a job), already in tile order.
CREATE INDEX results_job_status ON results (job, status, z, x, y);
"""

_ADD_REJECTS = """
CREATE TABLE rejects (
    message_id    text COLLATE "C" PRIMARY KEY,
    job           text COLLATE "C",
    reason        text NOT NULL,
    body          text NOT NULL,
    attempts      integer NOT NULL DEFAULT 1,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
"""

# Only the rows a download by status needs an index for: ``empty`` and ``error``. The
# primary key already lists a job's tiles in order, and ``ok`` rows are the bulk of a job,
# so a download of them reads the job's rows anyway; indexing them too cost a third of a
# write's time (bench/store.py, v2's index against this one, same rows: 23,700 against
# 36,400 rows/s at 100 tiles a pack). ``status = 'error'`` implies the predicate, so the
# planner uses the index for it.
_INDEX_NOT_OK = """
DROP INDEX IF EXISTS results_job_status;
CREATE INDEX results_not_ok ON results (job, status, z, x, y) WHERE status <> 'ok';
"""

# The assets that supplied a tile's pixels, and the vector features of segmentation and
# detection tiles (no PostGIS: geometry as WKB), replaced in the same statement as the tile's
# row. ADD COLUMN with a constant default rewrites no row, however large the table. The
# primary key's index serves a job's stream in tile order, windows and deletes by tile.
_ADD_FEATURES = """
ALTER TABLE results ADD COLUMN IF NOT EXISTS assets json NOT NULL DEFAULT '[]';
CREATE TABLE IF NOT EXISTS features (
    job           text COLLATE "C" NOT NULL,
    z             integer NOT NULL,
    x             bigint NOT NULL,
    y             bigint NOT NULL,
    seq           integer NOT NULL,
    class         text NOT NULL,
    score         double precision,
    size          integer NOT NULL,
    background    boolean NOT NULL DEFAULT false,
    geom          bytea NOT NULL,
    PRIMARY KEY (job, z, x, y, seq)
);
"""

#: ``{from_version: sql}``: applied in order, from 0 (an empty schema), to bring a database
#: up to SCHEMA_VERSION. A new database replays them all, so a migrated database and a new
#: one cannot drift apart.
MIGRATIONS: Final[dict[int, str]] = {
    0: _CREATE_V1,
    1: _ADD_REJECTS,
    2: _INDEX_NOT_OK,
    3: _ADD_FEATURES,
}

#: Every table the schema holds, with its primary key: what ``chipscale verify`` checks.
TABLES: Final[dict[str, tuple[str, ...]]] = {
    "jobs": ("job",),
    "results": ("job", "z", "x", "y"),
    "rejects": ("message_id",),
    "features": ("job", "z", "x", "y", "seq"),
    "schema_version": ("version",),
}

#: The whole schema as one script (tests; reading): every migration, then the version.
SCHEMA: Final = (
    "".join(MIGRATIONS[v] for v in range(SCHEMA_VERSION))
    + f"INSERT INTO schema_version (version) VALUES ({SCHEMA_VERSION});\n"
)

# Any constant will do; setup_database's transactions in one database queue on it.
_SETUP_LOCK: Final = int.from_bytes(b"chipscal", "big")


def _schema_state(conn: psycopg.Connection) -> tuple[str | None, int, list[str]]:
    """The current schema, its chipscale schema version (0: none) and which of our tables
    it holds."""
    schema, found = conn.execute(
        "SELECT current_schema(), ARRAY(SELECT relname::text FROM pg_class "
        "WHERE relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema()) "
        "AND relkind IN ('r', 'p') "
        "AND relname = ANY(%s) ORDER BY relname)",
        (list(TABLES),),
    ).fetchone() or (None, [])
    version = 0
    if "schema_version" in found:
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        version = int(row[0] or 0) if row else 0
    return schema, version, list(found)


def migrate(conn: psycopg.Connection, where: str) -> tuple[str | None, int]:
    """Create or migrate the schema in one transaction; returns (schema, version before).

    The transaction-level advisory lock makes a concurrent set-up wait, then find the work
    done (each statement of READ COMMITTED sees what committed before it); it is released
    with the transaction, so it pins nothing.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SETUP_LOCK,))
        schema, version, found = _schema_state(conn)
        if version > SCHEMA_VERSION:
            raise newer_schema(where, version)
        if version == 0 and found:
            raise StoreError(
                f"PostgreSQL store {where} schema {schema} already holds tables "
                f"{', '.join(found)} but no schema_version: not created by chipscale; use "
                "another database or schema (a search_path in the URL)"
            )
        for step in range(version, SCHEMA_VERSION):
            conn.execute(MIGRATIONS[step])
        if version < SCHEMA_VERSION:
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
    return schema, version


def newer_schema(where: str, version: int) -> StoreError:
    """The error for a database whose schema is newer than this code's."""
    return StoreError(
        f"PostgreSQL store {where} has schema version {version}, newer than this chipscale's "
        f"{SCHEMA_VERSION}: upgrade chipscale"
    )
