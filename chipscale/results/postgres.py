"""The PostgreSQL adapter of the ResultStore port: the cloud's results database (RDS
PostgreSQL behind RDS Proxy), and any ``postgresql://`` URL locally. It keeps no session
state (the proxy would pin), writes a pack in one statement (an INSERT of ``unnest``ed
arrays, an upsert only when it meets stored tiles), turns outages into StoreUnavailable,
reconnects by itself, and serves threads one call at a time. Schema:
:mod:`chipscale.results.postgres_schema`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, NamedTuple, Self, TypeVar

import psycopg
from mercantile import Tile
from psycopg import errors as pg_errors

from chipscale.errors import StoreError, StoreUnavailable, one_line, storable_text
from chipscale.redaction import redact, scrub, secrets_of
from chipscale.results.base import (
    DONE_STATUSES,
    STATUSES,
    TileWindow,
    check_status,
    dump_json,
    job_conflict,
    results_filter,
    validate_results,
)
from chipscale.results.feature_rows import (
    feature_row,
    feature_rows,
    features_query,
    has_features_query,
    window_query,
)
from chipscale.results.postgres_features import feature_parameters, write_with_features_sql
from chipscale.results.postgres_schema import SCHEMA_VERSION, migrate, newer_schema
from chipscale.values import (
    MAX_REJECTED_BODY,
    FeatureRow,
    JobInfo,
    Rejection,
    ResultRow,
    TileResult,
)

T = TypeVar("T")

#: Seconds to wait for a connection before StoreUnavailable (libpq's ``connect_timeout``).
CONNECT_TIMEOUT: Final = 10

#: Rows fetched per round trip while streaming results: big enough that round trips do not
#: dominate, small enough that memory stays flat (about 1 MB of rows).
ITERSIZE: Final = 2000


class _Field(NamedTuple):
    name: str
    kind: str  # its PostgreSQL type as sent
    may_be_scalar: bool  # sent once when every row of the pack has the same value
    select: str = "{}"  # the expression that stores it
    omitted: str | None = None  # left out (its column's default) when every row has this


#: The columns a write sends, in order (see :func:`_write_parameters`).
_RESULT_FIELDS: Final = (
    _Field("job", "text", True),
    _Field("z", "int", True),
    _Field("x", "bigint", False),
    _Field("y", "bigint", False),
    _Field("status", "text", True),
    _Field("output", "text", False, "{}::json"),
    _Field("model_name", "text", True),
    _Field("model_version", "text", True),
    _Field("error", "text", True),
    _Field("n", "int", True),
    _Field("assets", "text", True, "{}::json", omitted="[]"),
)

_INSERT = """
INSERT INTO results AS r ({columns}, created_at, updated_at)
SELECT {select}, now(), now()
FROM unnest({arrays}) AS t({names})
"""

_ON_CONFLICT = """ON CONFLICT (job, z, x, y) DO UPDATE SET
    status = excluded.status,
    output = excluded.output,
    model_name = excluded.model_name,
    model_version = excluded.model_version,
    error = excluded.error,
    attempts = r.attempts + excluded.attempts,
    updated_at = excluded.updated_at,
    assets = excluded.assets
"""


@functools.cache
def _write_sql(uniform: tuple[bool | None, ...], *, upsert: bool) -> str:
    """:data:`_INSERT`, with :data:`_ON_CONFLICT` when ``upsert``, taking the columns flagged
    True in ``uniform`` as scalar parameters, those flagged None not at all (their default,
    which the upsert's ``excluded`` holds too) and the others as arrays to unnest; its
    parameters are the scalars, then the arrays (:func:`_write_parameters`)."""
    columns, select, arrays, names = [], [], [], []
    for field, once in zip(_RESULT_FIELDS, uniform, strict=True):
        if once is None:
            continue
        columns.append("attempts" if field.name == "n" else field.name)
        if once:
            select.append(field.select.format(f"%b::{field.kind}"))
        else:
            select.append(field.select.format(field.name))
            arrays.append(f"%b::{field.kind}[]")
            names.append(field.name)
    sql = _INSERT.format(
        columns=", ".join(columns),
        select=", ".join(select),
        arrays=", ".join(arrays),
        names=", ".join(names),
    )
    return sql + _ON_CONFLICT if upsert else sql


def _write_parameters(columns: list[list[Any]]) -> tuple[tuple[bool | None, ...], list[Any]]:
    """Which columns go once (the ``uniform`` of :func:`_write_sql`) and the parameters
    writing ``columns`` (see :func:`_result_columns`).

    A pack is one job's adjacent tiles at one zoom from one model, nearly all with the same
    status, no error and a first attempt: those columns go once, as scalars, instead of as
    arrays of one repeated value: a quarter less work per write, client and server (the
    figures are in docs/design.md). The keys and outputs stay arrays: the row count comes
    from them. A column that is its default on every row (no assets) is not sent at all.
    """
    uniform = tuple(
        None if once and field.omitted is not None and column[0] == field.omitted else once
        for field, column in zip(_RESULT_FIELDS, columns, strict=True)
        for once in [field.may_be_scalar and all(value == column[0] for value in column)]
    )
    scalars = [column[0] for column, once in zip(columns, uniform, strict=True) if once]
    arrays = [column for column, once in zip(columns, uniform, strict=True) if once is False]
    return uniform, [*scalars, *arrays]


_REJECT = """
INSERT INTO rejects AS r (message_id, job, reason, body, attempts, created_at, updated_at)
SELECT message_id, job, reason, body, n, now(), now()
FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::int[])
    AS t(message_id, job, reason, body, n)
ON CONFLICT (message_id) DO UPDATE SET
    job = coalesce(excluded.job, r.job),
    reason = excluded.reason,
    body = excluded.body,
    attempts = r.attempts + excluded.attempts,
    updated_at = excluded.updated_at
"""

# Insert, or compare and update, in one statement: the WHERE refuses a recorded job of
# another source or model (no row returned; see ResultStore.start_job), and a concurrent
# insert of the same job waits for the first to commit, then is compared with it.
_UPSERT_JOB = """
INSERT INTO jobs AS j (job, source, zoom, model_name, model_version, classes, tiles_total,
                       created_at, updated_at, extra)
VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, now(), now(), %s::jsonb)
ON CONFLICT (job) DO UPDATE SET
    zoom = excluded.zoom,
    model_name = coalesce(excluded.model_name, j.model_name),
    model_version = CASE WHEN excluded.model_name IS NULL THEN j.model_version
                         ELSE excluded.model_version END,
    classes = CASE WHEN excluded.model_name IS NULL THEN j.classes ELSE excluded.classes END,
    tiles_total = excluded.tiles_total,
    updated_at = excluded.updated_at,
    extra = excluded.extra
WHERE j.source = excluded.source
    AND (j.model_name IS NULL OR excluded.model_name IS NULL
         OR (j.model_name, j.model_version)
            IS NOT DISTINCT FROM (excluded.model_name, excluded.model_version))
RETURNING true
"""


def _iso(column: str) -> str:
    """SQL for a timestamptz as utc_now() writes it (``2025-01-31T12:00:00.000Z``), whatever
    the session's TimeZone, so exports read the same from either store."""
    return f"""to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""


_JOB_COLUMNS = "job, source, zoom, model_name, model_version, classes, tiles_total, extra"
_RESULT_COLUMNS = (
    "job, z, x, y, status, output, error, model_name, model_version, attempts, "
    f"{_iso('created_at')}, {_iso('updated_at')}, assets"
)

# SQLSTATE classes a retry may fix: connection exception, transaction rollback (deadlock,
# serialization failure), insufficient resources (too many connections), operator
# intervention (shutdown, cancel, statement timeout), system error.
_TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58"})
_TRANSIENT_STATES = frozenset({"55P03"})  # lock_not_available


def libpq_url(url: str) -> str:
    """The URL libpq reads: SQLAlchemy's ``postgresql+driver://`` (``postgres+driver://``)
    spelled ``postgresql://``; a libpq keyword string as it is.

    A password holding an unencoded ``@`` or ``/`` is refused (libpq would read part of it
    as the host or the database, and print it): percent-encode it.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    head = rest.split("?", 1)[0]
    at = head.rfind("@")
    if head.count("@") > 1 or "/" in head[: max(at, 0)]:
        raise StoreError(
            f"the database URL {redact(url)} holds an unencoded '@' or '/' before its "
            "host: percent-encode them in the user name and password (@ as %40, / as %2F)"
        )
    if scheme.lower().startswith(("postgresql+", "postgres+")):
        return f"postgresql://{rest}"
    return url


def _is_transient(exc: psycopg.Error) -> bool:
    state = exc.sqlstate
    if state is None:  # raised by libpq itself: the connection failed or was lost
        return isinstance(exc, psycopg.OperationalError)
    return state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES


class _Describer:
    """Turns psycopg errors into chipscale's, in one line, with the password scrubbed."""

    def __init__(self, url: str) -> None:
        self.where = redact(url)
        self._secrets = secrets_of(url)

    def scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    def error(self, exc: psycopg.Error, doing: str) -> StoreError | StoreUnavailable:
        reason = self.scrub(one_line(exc))
        if _is_transient(exc):
            return StoreUnavailable(
                f"PostgreSQL store {self.where} unavailable while {doing}: {reason}"
            )
        if isinstance(exc, pg_errors.UndefinedTable):
            return StoreError(
                f"PostgreSQL store {self.where} lacks the results schema while {doing} "
                f"({reason}): run `chipscale db-setup`"
            )
        return StoreError(f"PostgreSQL store {self.where} failed while {doing}: {reason}")


def _connect(url: str, *, autocommit: bool, connect_timeout: float) -> psycopg.Connection:
    return psycopg.connect(
        libpq_url(url),
        autocommit=autocommit,
        prepare_threshold=None,  # no named prepared statements: they pin RDS Proxy
        connect_timeout=max(1, round(connect_timeout)),
    )


def setup_database(url: str, *, connect_timeout: float = CONNECT_TIMEOUT) -> str:
    """Create the results schema, or migrate it to :data:`SCHEMA_VERSION`, in the URL's
    current schema (the first of its ``search_path``); returns a one-line summary.

    Idempotent, and safe when several processes run it at once (they queue on an advisory
    lock inside the transaction). Raises StoreUnavailable when the database cannot be
    reached, StoreError for a newer schema or foreign tables in the way.
    """
    describe = _Describer(url)
    try:
        with _connect(url, autocommit=True, connect_timeout=connect_timeout) as conn:
            schema, before = migrate(conn, describe.where)
    except psycopg.Error as exc:
        raise describe.error(exc, "setting up the schema") from None
    where = f"{describe.where} schema {schema}"
    if before == SCHEMA_VERSION:
        return f"results schema of {where} is up to date (version {SCHEMA_VERSION})"
    if before == 0:
        return f"created the results schema in {where} (version {SCHEMA_VERSION})"
    return f"migrated the results schema of {where} from version {before} to {SCHEMA_VERSION}"


class PostgresStore:
    """Results in a PostgreSQL database. Thread-safe; use as a context manager or close().

    Parameters
    ----------
    url
        ``postgresql://user:password@host:5432/dbname`` (``postgres://`` too; libpq's
        parameters such as ``sslmode`` in the query). ``store.url`` shows it without the
        password.
    create
        Create or migrate the schema when it is missing or older (as :func:`setup_database`,
        under the same lock): the convenience of local runs. Workers in the cloud pass False,
        so a thousand cold starts never race to run DDL with the worker's grants, and a
        missing schema is a clear StoreError naming ``chipscale db-setup``.
    connect_timeout
        Seconds to wait for each connection before StoreUnavailable.

    Raises StoreUnavailable when the database cannot be reached now, StoreError when its
    schema is missing (``create=False``), older (``create=False``) or newer than this code.
    """

    def __init__(
        self, url: str, *, create: bool = True, connect_timeout: float = CONNECT_TIMEOUT
    ) -> None:
        self._dsn = url
        self._describe = _Describer(url)
        self.url = self._describe.where
        self._timeout = connect_timeout
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self._closed = False
        try:
            self._call("opening", lambda conn: self._check_schema(conn, create))
        except BaseException:
            self.close()
            raise

    # -- connections and schema -------------------------------------------------------------

    def _check_schema(self, conn: psycopg.Connection, create: bool) -> None:
        try:
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            version = int(row[0] or 0) if row else 0
        except pg_errors.UndefinedTable:
            version = 0
        if version > SCHEMA_VERSION:
            raise newer_schema(self.url, version)
        if version == SCHEMA_VERSION:
            return
        if not create:
            found = f"schema version {version}" if version else "no results schema"
            raise StoreError(
                f"PostgreSQL store {self.url} has {found}, this chipscale needs version "
                f"{SCHEMA_VERSION}: run `chipscale db-setup`"
            )
        migrate(conn, self.url)

    def _call(self, doing: str, operation: Callable[[psycopg.Connection], T]) -> T:
        """Run ``operation`` on the shared connection, under the lock.

        A connection that broke while idle is replaced and the operation tried once more; any
        other failure is translated, and a broken connection dropped so that the next call
        connects afresh.
        """
        with self._lock:
            self._check_open()
            for attempt in (1, 2):
                reused = self._conn is not None
                try:
                    if self._conn is None:
                        self._conn = _connect(
                            self._dsn, autocommit=True, connect_timeout=self._timeout
                        )
                    return operation(self._conn)
                except psycopg.Error as exc:
                    broken = self._drop_if_broken()
                    if not (broken and reused and attempt == 1):
                        raise self._describe.error(exc, doing) from None
            raise AssertionError("unreachable")  # pragma: no cover

    def _drop_if_broken(self) -> bool:
        conn = self._conn
        if conn is None:
            return True  # connecting failed
        if not (conn.broken or conn.closed):
            return False
        self._conn = None
        conn.close()
        return True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"PostgreSQL store {self.url} is closed")

    def _read(self, doing: str, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A small query on the shared connection (results that are small by nature)."""
        return self._call(doing, lambda conn: conn.execute(query, params).fetchall())

    # -- the port -------------------------------------------------------------------------

    def start_job(self, job: JobInfo) -> None:
        """Record a new job, or update a recorded one of the same source and model; see
        :meth:`ResultStore.start_job`. One statement compares and writes (:data:`_UPSERT_JOB`)."""
        params = (
            job.job,
            job.source,
            job.zoom,
            job.model_name,
            job.model_version,
            dump_json(list(job.classes)),
            job.tiles_total,
            dump_json(dict(job.extra)),
        )

        def upsert(conn: psycopg.Connection) -> tuple[Any, ...] | None:
            if conn.execute(_UPSERT_JOB, params).fetchone():
                return None
            return conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job = %s", (job.job,)
            ).fetchone()

        recorded = self._call(f"recording job {job.job!r}", upsert)
        if recorded is not None:
            conflict = job_conflict(_job_info(recorded), job)
            raise conflict or StoreError(f"job {job.job!r} changed while it was recorded")

    def write(self, results: Sequence[TileResult]) -> None:
        """Upsert results in one statement (one transaction, one round trip); a re-written
        tile gets ``attempts + 1``. A plain INSERT first, the upsert only when it meets a
        stored tile (docs/design.md says why)."""
        if not results:
            return
        validate_results(results)
        uniform, params = _write_parameters(_result_columns(results))
        replaced, features = feature_rows(results)
        if replaced:  # the same statement replaces the tiles' features (none: classification)
            params += feature_parameters(replaced, features)

        def sql(upsert: bool) -> str:
            plain = _write_sql(uniform, upsert=upsert)
            return write_with_features_sql(plain) if replaced else plain

        def insert_else_upsert(conn: psycopg.Connection) -> None:
            try:
                conn.execute(sql(upsert=False), params)
            except pg_errors.UniqueViolation:
                # A tile of the pack is stored already (a redelivery, a rerun): nothing of
                # the failed statement was kept, so the same rows go again as an upsert.
                conn.execute(sql(upsert=True), params)

        self._call(f"writing {len(results)} results", insert_else_upsert)

    def reject(self, rejections: Sequence[Rejection]) -> None:
        """Record messages that can never succeed, keyed by message id: a repeat delivery
        is one row, its ``attempts`` counting deliveries and its reason the latest."""
        if not rejections:
            return
        columns = _reject_columns(rejections)
        self._call(
            f"recording {len(rejections)} rejected messages",
            lambda conn: conn.execute(_REJECT, columns),
        )

    def rejects(self, job: str | None = None) -> list[Rejection]:
        """The rejected messages (of one job), oldest first: for status and tests."""
        where, params = results_filter(job, None, "%s")
        rows = self._read(
            "reading rejected messages",
            f"SELECT message_id, reason, body, job FROM rejects {where} "
            "ORDER BY date_trunc('milliseconds', created_at), message_id",
            params,
        )
        return [Rejection(*row) for row in rows]

    def done_tiles(self, job: str) -> set[Tile]:
        """The tiles of a job with status ``ok`` or ``empty``: what a resume skips."""
        rows = self._read(
            f"reading the done tiles of job {job!r}",
            "SELECT x, y, z FROM results WHERE job = %s AND status = ANY(%s)",
            (job, list(DONE_STATUSES)),
        )
        return {Tile(x, y, z) for x, y, z in rows}

    def counts(self, job: str | None = None) -> dict[str, int]:
        """Rows per status, keys ``ok``, ``empty``, ``error`` and ``total`` always present."""
        where, params = results_filter(job, None, "%s")
        rows = self._read(
            "counting results",
            f"SELECT status, count(*) FROM results {where} GROUP BY status",
            params,
        )
        counts = dict.fromkeys(STATUSES, 0)
        counts.update({status: int(n) for status, n in rows})
        counts["total"] = sum(counts[s] for s in STATUSES)
        return counts

    def get_job(self, job: str) -> JobInfo | None:
        """The recorded job, or None."""
        rows = self._read(
            f"reading job {job!r}", f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job = %s", (job,)
        )
        return _job_info(rows[0]) if rows else None

    def jobs(self) -> list[JobInfo]:
        """Every recorded job, oldest first (at the millisecond SQLite keeps, then by id)."""
        rows = self._read(
            "listing jobs",
            f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY date_trunc('milliseconds', created_at), job",
        )
        return [_job_info(row) for row in rows]

    def iter_results(
        self, job: str | None = None, *, status: str | None = None
    ) -> Iterator[ResultRow]:
        """Stream result rows ordered by ``(job, z, x, y)``, optionally of one status.

        A server-side cursor on a connection of its own, in one transaction (a consistent
        snapshot; writers are not blocked), fetches :data:`ITERSIZE` rows per round trip, so
        memory stays flat for any number of rows. Errors are raised when iteration starts,
        not when this is called; an outage mid-stream raises StoreUnavailable (an export is
        started again, not resumed).
        """
        check_status(status)
        self._check_open()
        where, params = results_filter(job, status, "%s")
        query = f"SELECT {_RESULT_COLUMNS} FROM results {where} ORDER BY job, z, x, y"
        return self._stream(query, params, _result_row, "streaming results")

    def iter_features(
        self,
        job: str,
        *,
        classes: Sequence[str] | None = None,
        background: bool = False,
        window: TileWindow | None = None,
    ) -> Iterator[FeatureRow]:
        """Stream a job's features ordered by ``(z, x, y, seq)``; see
        :meth:`ResultStore.iter_features`. A scan of the primary key's index on a connection
        of its own, as :meth:`iter_results`."""
        self._check_open()
        query, params = features_query(job, classes, background, window, "%s")
        return self._stream(query, params, feature_row, "streaming features")

    def has_features(self, job: str) -> bool:
        """True when any tile of the job stored a feature."""
        rows = self._read(f"reading features of job {job!r}", has_features_query("%s"), (job,))
        return bool(rows[0][0])

    def results_in(
        self, job: str, window: TileWindow, *, limit: int | None = None
    ) -> list[ResultRow]:
        """The rows of the tiles inside ``window``, ordered by ``(x, y)``: a range scan of
        the primary key's index (x bounds it, y is checked in the index), up to ``limit``."""
        query, params = window_query(_RESULT_COLUMNS, job, window, limit, "%s")
        rows = self._read(f"reading results of job {job!r}", query, params)
        return [_result_row(row) for row in rows]

    def _stream(
        self,
        query: str,
        params: Sequence[Any],
        make: Callable[[tuple[Any, ...]], T],
        doing: str,
    ) -> Iterator[T]:
        try:
            with (
                _connect(self._dsn, autocommit=False, connect_timeout=self._timeout) as conn,
                conn.cursor(name="chipscale_results") as cursor,
            ):
                cursor.itersize = ITERSIZE
                cursor.execute(query, params)
                for row in cursor:
                    yield make(row)
        except psycopg.Error as exc:
            raise self._describe.error(exc, doing) from None

    def close(self) -> None:
        """Release the connection; later calls raise StoreError. Safe to call twice."""
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r})"


def _result_columns(results: Sequence[TileResult]) -> list[list[Any]]:
    """The pack as one list per column of ``_INSERT``: repeated tiles merged (the last
    result wins; the count goes to ``attempts``) and rows in key order."""
    merged: dict[tuple[str, int, int, int], tuple[TileResult, int]] = {}
    for result in results:
        tile = result.tile
        key = (result.job, tile.z, tile.x, tile.y)
        seen = merged.get(key)
        merged[key] = (result, seen[1] + 1 if seen else 1)
    columns: list[list[Any]] = [[] for _ in range(11)]
    (jobs, zs, xs, ys, statuses, outputs, names, versions, errors, counts, assets) = columns
    for (job, z, x, y), (result, count) in sorted(merged.items()):
        jobs.append(job)
        zs.append(z)
        xs.append(x)
        ys.append(y)
        statuses.append(result.status)
        outputs.append(dump_json(result.output))
        names.append(result.model_name)
        versions.append(result.model_version)
        errors.append(result.error)
        counts.append(count)
        assets.append(dump_json(list(result.assets)) if result.assets else "[]")
    return columns


def _reject_columns(rejections: Sequence[Rejection]) -> list[list[Any]]:
    """Rejections as one list per column of ``_REJECT``, merged by message id like
    :func:`_result_columns`. Text loses what PostgreSQL cannot store (NUL, lone
    surrogates): a rejected body is whatever arrived."""
    merged: dict[str, tuple[Rejection, int]] = {}
    for rejection in rejections:
        if not isinstance(rejection.message_id, str) or not rejection.message_id:
            raise StoreError(f"Rejected message has no message id: {rejection.reason!r}")
        seen = merged.get(rejection.message_id)
        merged[rejection.message_id] = (rejection, seen[1] + 1 if seen else 1)
    columns: list[list[Any]] = [[] for _ in range(5)]
    for message_id, (rejection, count) in sorted(merged.items()):
        columns[0].append(message_id)
        columns[1].append(rejection.job)
        columns[2].append(storable_text(rejection.reason))
        columns[3].append(storable_text(rejection.body[:MAX_REJECTED_BODY]))
        columns[4].append(count)
    return columns


def _result_row(row: tuple[Any, ...]) -> ResultRow:
    job, z, x, y, status, output, error, name, version, attempts, created, updated, assets = row
    return ResultRow(
        job, z, x, y, status, output, error, name, version, attempts, created, updated,
        tuple(assets or ()),
    )  # fmt: skip


def _job_info(row: tuple[Any, ...]) -> JobInfo:
    job, source, zoom, model_name, model_version, classes, tiles_total, extra = row
    return JobInfo(
        job=job,
        source=source,
        zoom=zoom,
        model_name=model_name,
        model_version=model_version,
        tiles_total=tiles_total,
        classes=tuple(classes or ()),
        extra=extra or {},
    )
