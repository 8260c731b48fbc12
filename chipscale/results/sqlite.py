"""The SQLite adapter of the ResultStore port: the embedded default for local runs.

One write connection behind a lock, and a read-only connection per
:meth:`SQLiteStore.iter_results`, which in WAL mode streams a consistent snapshot while
workers write. Each :meth:`SQLiteStore.write` is one transaction. Why: docs/design.md, "The
results store".
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

from mercantile import Tile

from chipscale.errors import StoreError, StoreUnavailable
from chipscale.results.base import (
    DONE_STATUSES,
    STATUSES,
    TileWindow,
    check_status,
    dump_json,
    job_conflict,
    load_json,
    results_filter,
    utc_now,
    validate_results,
)
from chipscale.results.feature_rows import (
    feature_row,
    feature_rows,
    features_query,
    has_features_query,
    window_query,
)
from chipscale.values import (
    MAX_REJECTED_BODY,
    FeatureRow,
    JobInfo,
    Rejection,
    ResultRow,
    TileResult,
)

R = TypeVar("R")

#: Bump with a migration in :data:`MIGRATIONS` when the schema changes. The numbering is
#: the PostgreSQL adapter's: a version means the same tables in both stores.
SCHEMA_VERSION = 4

_CREATE_V1 = """
CREATE TABLE IF NOT EXISTS jobs (
    job           TEXT PRIMARY KEY,
    source        TEXT NOT NULL,
    zoom          INTEGER,
    model_name    TEXT,
    model_version TEXT,
    classes       TEXT NOT NULL DEFAULT '[]',   -- JSON list of class names
    tiles_total   INTEGER,
    created_at    TEXT NOT NULL,                -- ISO-8601 UTC
    updated_at    TEXT NOT NULL,
    extra         TEXT NOT NULL DEFAULT '{}'    -- JSON object
);
-- No foreign key to jobs: a worker may write results of a job it never registered.
CREATE TABLE IF NOT EXISTS results (
    job           TEXT NOT NULL,
    z             INTEGER NOT NULL,
    x             INTEGER NOT NULL,
    y             INTEGER NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('ok', 'empty', 'error')),
    output        TEXT,                         -- the model's per-tile output, JSON, verbatim
    model_name    TEXT,
    model_version TEXT,
    error         TEXT,
    attempts      INTEGER NOT NULL DEFAULT 1,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    PRIMARY KEY (job, z, x, y)
) WITHOUT ROWID;
-- Download by job and status (and resume: the done tiles of a job), already in tile order.
CREATE INDEX IF NOT EXISTS results_job_status ON results (job, status, z, x, y);
"""

# Messages that can never succeed (see chipscale.values.Rejection), one row per message id.
_ADD_REJECTS = """
CREATE TABLE IF NOT EXISTS rejects (
    message_id    TEXT PRIMARY KEY,
    job           TEXT,
    reason        TEXT NOT NULL,
    body          TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 1,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
) WITHOUT ROWID;
"""

# Version 3 changed the status index in both stores. SQLite's planner reads a job's rows by
# status through the primary key (the table itself, WITHOUT ROWID, in tile order) whatever
# index there is, so here the index only slowed writes: it goes. (PostgreSQL keeps a
# partial one for the rows that are not ok: see its adapter.)
_DROP_STATUS_INDEX = """
DROP INDEX IF EXISTS results_job_status;
"""

# Version 4: the assets that supplied a tile's pixels (JSON list), and the vector features
# of segmentation and detection tiles, written in the same transaction as the tile's row.
# A rowid table: a polygon's WKB can take kilobytes, and WITHOUT ROWID suits small rows.
# Its primary key's index serves the job's stream in tile order and the deletes by tile.
_ADD_FEATURES = """
ALTER TABLE results ADD COLUMN assets TEXT NOT NULL DEFAULT '[]';
CREATE TABLE IF NOT EXISTS features (
    job           TEXT NOT NULL,
    z             INTEGER NOT NULL,
    x             INTEGER NOT NULL,
    y             INTEGER NOT NULL,
    seq           INTEGER NOT NULL,             -- the feature's number within its tile
    class         TEXT NOT NULL,
    score         REAL,                         -- a detection's score
    size          INTEGER NOT NULL,             -- tile size: the unit of geom's coordinates
    background    INTEGER NOT NULL DEFAULT 0,   -- a region of the model's background class
    geom          BLOB NOT NULL,                -- WKB in the tile's pixel coordinates
    PRIMARY KEY (job, z, x, y, seq)
);
"""

#: ``{from_version: sql}``: applied in order, from 0 (a new file), to bring a file up to
#: SCHEMA_VERSION. A new file replays them all, so an upgraded file and a new one cannot
#: drift apart.
MIGRATIONS: dict[int, str] = {
    0: _CREATE_V1,
    1: _ADD_REJECTS,
    2: _DROP_STATUS_INDEX,
    3: _ADD_FEATURES,
}

#: The whole schema as one script (for reading): every migration in order.
SCHEMA = "".join(MIGRATIONS[v] for v in range(SCHEMA_VERSION))

_UPSERT_RESULT = """
INSERT INTO results (job, z, x, y, status, output, model_name, model_version, error,
                     attempts, created_at, updated_at, assets)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?)
ON CONFLICT (job, z, x, y) DO UPDATE SET
    status = excluded.status,
    output = excluded.output,
    model_name = excluded.model_name,
    model_version = excluded.model_version,
    error = excluded.error,
    attempts = results.attempts + 1,
    updated_at = excluded.updated_at,
    assets = excluded.assets
"""

_DELETE_FEATURES = "DELETE FROM features WHERE job = ? AND z = ? AND x = ? AND y = ?"

_INSERT_FEATURE = """
INSERT INTO features (job, z, x, y, seq, class, score, size, background, geom)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

_UPSERT_REJECT = """
INSERT INTO rejects (message_id, job, reason, body, attempts, created_at, updated_at)
VALUES (?, ?, ?, ?, 1, ?, ?)
ON CONFLICT (message_id) DO UPDATE SET
    job = coalesce(excluded.job, rejects.job),
    reason = excluded.reason,
    body = excluded.body,
    attempts = rejects.attempts + 1,
    updated_at = excluded.updated_at
"""

# The source is never updated, and the model only filled in (see ResultStore.start_job):
# start_job compares the recorded job first, under the same write lock.
_UPSERT_JOB = """
INSERT INTO jobs AS j (job, source, zoom, model_name, model_version, classes, tiles_total,
                       created_at, updated_at, extra)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (job) DO UPDATE SET
    zoom = excluded.zoom,
    model_name = coalesce(excluded.model_name, j.model_name),
    model_version = CASE WHEN excluded.model_name IS NULL THEN j.model_version
                         ELSE excluded.model_version END,
    classes = CASE WHEN excluded.model_name IS NULL THEN j.classes ELSE excluded.classes END,
    tiles_total = excluded.tiles_total,
    updated_at = excluded.updated_at,
    extra = excluded.extra
"""

_JOB_COLUMNS = "job, source, zoom, model_name, model_version, classes, tiles_total, extra"
_RESULT_COLUMNS = (
    "job, z, x, y, status, output, error, model_name, model_version, attempts, "
    "created_at, updated_at, assets"
)

# Primary result codes (the low byte of sqlite_errorcode) that a retry may fix.
_TRANSIENT_CODES = {
    5,  # SQLITE_BUSY: database is locked
    6,  # SQLITE_LOCKED: database table is locked
    10,  # SQLITE_IOERR: disk I/O error
    13,  # SQLITE_FULL: database or disk is full
    15,  # SQLITE_PROTOCOL: WAL locking race
}


def _statements(script: str) -> list[str]:
    """Split a schema script (no semicolons inside literals or comments) into statements.

    executescript() would commit the surrounding transaction; this keeps it atomic.
    """
    return [part.strip() for part in script.split(";") if part.strip()]


def _translate(exc: sqlite3.Error, path: Path, doing: str) -> Exception:
    """Map a sqlite3 error to StoreUnavailable (retry may help) or StoreError (it won't)."""
    code = getattr(exc, "sqlite_errorcode", None)
    message = str(exc)
    transient = (code is not None and code & 0xFF in _TRANSIENT_CODES) or (
        code is None
        and any(word in message for word in ("locked", "busy", "disk I/O", "disk is full"))
    )
    if (code is not None and code & 0xFF == 26) or "not a database" in message:
        return StoreError(f"{str(path)!r} is not a SQLite database")
    if transient:
        return StoreUnavailable(f"SQLite store {str(path)!r} unavailable while {doing}: {message}")
    return StoreError(f"SQLite store {str(path)!r} failed while {doing}: {message}")


class SQLiteStore:
    """Results in one SQLite file. Thread-safe; use as a context manager or call close().

    Parameters
    ----------
    path
        The database file; it and its parent folders are created if missing.
    busy_timeout
        Seconds to wait for another process's write lock before StoreUnavailable.
    create
        False for reading commands: a missing file, or one without chipscale's results
        schema, is a StoreError and nothing is created (an older schema is still upgraded).
    """

    def __init__(
        self, path: str | Path, *, busy_timeout: float = 30.0, create: bool = True
    ) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self._busy_ms = max(0, int(busy_timeout * 1000))
        self._lock = threading.Lock()
        self._closed = False
        if str(path) == ":memory:" or str(path).startswith("file:"):
            raise StoreError(
                f"SQLite store {str(path)!r}: give a file path (an in-memory database cannot "
                "be streamed from a second connection)"
            )
        if self.path.exists() and not self.path.is_file():
            raise StoreError(f"SQLite store {str(self.path)!r} is not a file")
        if not create and not self.path.exists():
            raise StoreError(
                f"no SQLite results store at {str(self.path)!r}: check the path "
                "(`chipscale run` and `chipscale db-setup` create one)"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"Cannot create the folder of SQLite store {str(self.path)!r}: {exc.strerror}"
            ) from None
        self._conn = self._connect(readonly=False, create=create)
        try:
            self._init_schema()
        except BaseException:
            self._conn.close()
            raise

    # -- connections and schema -------------------------------------------------------------

    def _connect(self, *, readonly: bool, create: bool = True) -> sqlite3.Connection:
        try:
            if readonly or not create:  # mode=rw opens, never creates: no file appears
                uri = self.path.resolve().as_uri() + ("?mode=ro" if readonly else "?mode=rw")
                conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            else:
                # isolation_level=None: no implicit transactions; write() says BEGIN itself.
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            if not (readonly or create):
                self._check_results(conn)  # before WAL mode, which would rewrite the header
            if not readonly:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            raise _translate(exc, self.path, "opening") from None
        return conn

    def _check_results(self, conn: sqlite3.Connection) -> None:
        """StoreError (``conn`` closed) unless the file holds a results schema, of any version."""
        if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            conn.close()
            raise StoreError(
                f"SQLite file {str(self.path)!r} holds no chipscale results: check the path "
                "(`chipscale run` and `chipscale db-setup` create a store)"
            )

    def _init_schema(self) -> None:
        try:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"SQLite store {str(self.path)!r} has schema version {version}, newer than "
                    f"this chipscale's {SCHEMA_VERSION}: upgrade chipscale"
                )
            if version == SCHEMA_VERSION:
                return
            with self._immediate():
                # Read again under the write lock: another process may have just done it.
                version = self._conn.execute("PRAGMA user_version").fetchone()[0]
                for script in (MIGRATIONS[v] for v in range(version, SCHEMA_VERSION)):
                    for statement in _statements(script):
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorcode", None) == 26 or "not a database" in str(exc):
                raise StoreError(f"{str(self.path)!r} is not a SQLite database") from None
            raise _translate(exc, self.path, "creating the schema") from None

    @contextlib.contextmanager
    def _immediate(self) -> Iterator[None]:
        """One write transaction. IMMEDIATE takes the write lock up front, so two writers
        never deadlock upgrading a read lock; any failure rolls the whole of it back."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"SQLite store {str(self.path)!r} is closed")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A small query on the shared connection (results that are small by nature)."""
        with self._lock:
            self._check_open()
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise _translate(exc, self.path, "reading") from None

    # -- the port -------------------------------------------------------------------------

    def start_job(self, job: JobInfo) -> None:
        """Record a new job, or update a recorded one of the same source and model; see
        :meth:`ResultStore.start_job`. One IMMEDIATE transaction holds the write lock from
        the comparison to the write, so two processes cannot both create the job."""
        now = utc_now()
        params = (
            job.job,
            job.source,
            job.zoom,
            job.model_name,
            job.model_version,
            dump_json(list(job.classes)),
            job.tiles_total,
            now,
            now,
            dump_json(dict(job.extra)),
        )
        with self._lock:
            self._check_open()
            try:
                with self._immediate():
                    rows = self._conn.execute(
                        f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job = ?", (job.job,)
                    ).fetchall()
                    conflict = job_conflict(_job_info(rows[0]), job) if rows else None
                    if conflict is not None:
                        raise conflict
                    self._conn.execute(_UPSERT_JOB, params)
            except sqlite3.Error as exc:
                raise _translate(exc, self.path, f"recording job {job.job!r}") from None

    def write(self, results: Sequence[TileResult]) -> None:
        """Upsert results in one transaction; a re-written tile gets ``attempts + 1``."""
        if not results:
            return
        validate_results(results)
        now = utc_now()
        params = [
            (
                r.job,
                r.tile.z,
                r.tile.x,
                r.tile.y,
                r.status,
                dump_json(r.output),
                r.model_name,
                r.model_version,
                r.error,
                now,
                now,
                dump_json(list(r.assets)) if r.assets else "[]",
            )
            for r in results
        ]
        replaced, features = feature_rows(results)
        with self._lock:
            self._check_open()
            try:
                with self._immediate():
                    self._conn.executemany(_UPSERT_RESULT, params)
                    if replaced:  # none for classification: no statement
                        self._conn.executemany(_DELETE_FEATURES, replaced)
                        self._conn.executemany(_INSERT_FEATURE, features)
            except sqlite3.Error as exc:
                raise _translate(exc, self.path, f"writing {len(params)} results") from None

    def reject(self, rejections: Sequence[Rejection]) -> None:
        """Record messages that can never succeed, keyed by message id: a repeat delivery
        is one row, its ``attempts`` counting deliveries and its reason the latest."""
        if not rejections:
            return
        now = utc_now()
        params = []
        for r in rejections:
            if not isinstance(r.message_id, str) or not r.message_id:
                raise StoreError(f"Rejected message has no message id: {r.reason!r}")
            params.append((r.message_id, r.job, r.reason, r.body[:MAX_REJECTED_BODY], now, now))
        with self._lock:
            self._check_open()
            try:
                with self._immediate():
                    self._conn.executemany(_UPSERT_REJECT, params)
            except sqlite3.Error as exc:
                raise _translate(
                    exc, self.path, f"recording {len(params)} rejected messages"
                ) from None

    def rejects(self, job: str | None = None) -> list[Rejection]:
        """The rejected messages (of one job), oldest first: for status and tests."""
        where, params = results_filter(job, None, "?")
        rows = self._read(
            f"SELECT message_id, reason, body, job FROM rejects {where} "
            "ORDER BY created_at, message_id",
            params,
        )
        return [Rejection(*row) for row in rows]

    def done_tiles(self, job: str) -> set[Tile]:
        """The tiles of a job with status ``ok`` or ``empty``: what a resume skips."""
        rows = self._read(
            "SELECT x, y, z FROM results WHERE job = ? AND status IN (?, ?)",
            (job, *DONE_STATUSES),
        )
        return {Tile(x, y, z) for x, y, z in rows}

    def counts(self, job: str | None = None) -> dict[str, int]:
        """Rows per status, keys ``ok``, ``empty``, ``error`` and ``total`` always present."""
        if job is None:
            rows = self._read("SELECT status, count(*) FROM results GROUP BY status")
        else:
            rows = self._read(
                "SELECT status, count(*) FROM results WHERE job = ? GROUP BY status", (job,)
            )
        counts = dict.fromkeys(STATUSES, 0)
        counts.update(dict(rows))
        counts["total"] = sum(counts[s] for s in STATUSES)
        return counts

    def get_job(self, job: str) -> JobInfo | None:
        """The recorded job, or None."""
        rows = self._read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job = ?", (job,))
        return _job_info(rows[0]) if rows else None

    def jobs(self) -> list[JobInfo]:
        """Every recorded job, oldest first."""
        rows = self._read(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY created_at, job")
        return [_job_info(row) for row in rows]

    def iter_results(
        self, job: str | None = None, *, status: str | None = None
    ) -> Iterator[ResultRow]:
        """Stream result rows ordered by ``(job, z, x, y)``, optionally of one status.

        Rows come one at a time from a cursor on a dedicated read-only connection (a
        snapshot taken at the first row), so memory stays flat and writers are not blocked.
        Errors are raised when iteration starts, not when this is called.
        """
        check_status(status)
        self._check_open()
        where, params = results_filter(job, status, "?")
        sql = f"SELECT {_RESULT_COLUMNS} FROM results {where} ORDER BY job, z, x, y"
        return self._stream(sql, params, _result_row, "streaming results")

    def iter_features(
        self,
        job: str,
        *,
        classes: Sequence[str] | None = None,
        background: bool = False,
        window: TileWindow | None = None,
    ) -> Iterator[FeatureRow]:
        """Stream a job's features ordered by ``(z, x, y, seq)``; see
        :meth:`ResultStore.iter_features`. A range scan of the primary key, on a read-only
        connection of its own, as :meth:`iter_results`."""
        self._check_open()
        sql, params = features_query(job, classes, background, window, "?")
        return self._stream(sql, params, feature_row, "streaming features")

    def has_features(self, job: str) -> bool:
        """True when any tile of the job stored a feature."""
        rows = self._read(has_features_query("?"), (job,))
        return bool(rows[0][0])

    def results_in(
        self, job: str, window: TileWindow, *, limit: int | None = None
    ) -> list[ResultRow]:
        """The rows of the tiles inside ``window``, ordered by ``(x, y)``: a range scan of
        the primary key (x bounds the scan, y is checked on the way), stopping at ``limit``."""
        sql, params = window_query(_RESULT_COLUMNS, job, window, limit, "?")
        return [_result_row(row) for row in self._read(sql, params)]

    def _stream(
        self,
        sql: str,
        params: Sequence[Any],
        make: Callable[[tuple[Any, ...]], R],
        doing: str,
    ) -> Iterator[R]:
        conn = self._connect(readonly=True)
        try:
            try:
                cursor = conn.execute(sql, params)
                for row in cursor:
                    yield make(row)
            except sqlite3.Error as exc:
                raise _translate(exc, self.path, doing) from None
        finally:
            conn.close()

    def close(self) -> None:
        """Release the connection; later calls raise StoreError. Safe to call twice."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"


def _job_info(row: tuple[Any, ...]) -> JobInfo:
    job, source, zoom, model_name, model_version, classes, tiles_total, extra = row
    return JobInfo(
        job=job,
        source=source,
        zoom=zoom,
        model_name=model_name,
        model_version=model_version,
        tiles_total=tiles_total,
        classes=tuple(load_json(classes) or ()),
        extra=load_json(extra) or {},
    )


def _result_row(row: tuple[Any, ...]) -> ResultRow:
    (job, z, x, y, status, output, error, model_name, model_version, attempts, created, updated) = (
        row[:12]
    )
    return ResultRow(
        job=job,
        z=z,
        x=x,
        y=y,
        status=status,
        output=load_json(output),
        error=error,
        model_name=model_name,
        model_version=model_version,
        attempts=attempts,
        created_at=created,
        updated_at=updated,
        assets=tuple(load_json(row[12]) or ()),
    )
