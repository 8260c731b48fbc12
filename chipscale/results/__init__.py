"""Result stores: the ResultStore port's factory, choosing the adapter by URL.

>>> store = open_store("sqlite:///results/run.db")   # doctest: +SKIP
>>> store = open_store("postgresql://chip:secret@db.internal:5432/chipscale")   # doctest: +SKIP

``sqlite:///relative.db``, ``sqlite:////absolute.db`` or a ``.db``/``.sqlite`` path: SQLite.
``postgresql://`` and its other spellings: PostgreSQL (psycopg, imported only then).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from chipscale.errors import StoreError
from chipscale.extras import missing_message
from chipscale.redaction import redact
from chipscale.results.base import DONE_STATUSES, STATUSES, ResultStore
from chipscale.results.sqlite import SCHEMA_VERSION, SQLiteStore

if TYPE_CHECKING:
    from chipscale.results.postgres import PostgresStore, setup_database

__all__ = [
    "DONE_STATUSES",
    "SCHEMA_VERSION",
    "STATUSES",
    "PostgresStore",
    "ResultStore",
    "SQLiteStore",
    "is_postgres_url",
    "open_store",
    "setup_database",
    "setup_store",
    "sqlite_path",
    "store_files",
]

SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
#: postgresql:// or postgres://, also in SQLAlchemy's spelling (postgresql+psycopg2://).
_POSTGRES_URL = re.compile(r"postgres(?:ql)?(?:\+\w+)?://", re.IGNORECASE)
#: A libpq keyword/value connection string: ``host=db dbname=results user=chip``.
_LIBPQ_KEYWORDS = re.compile(r"^\s*(?:host|hostaddr|port|dbname|user|password|service)\s*=")
_LAZY = {"PostgresStore", "setup_database"}


def __getattr__(name: str) -> Any:
    """``PostgresStore`` and ``setup_database`` on first use: psycopg is an optional extra."""
    if name in _LAZY:
        from chipscale.results import postgres

        return getattr(postgres, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sqlite_path(url: str | os.PathLike[str]) -> Path | None:
    """The file a SQLite URL or bare path names, or None if ``url`` is not SQLite.

    ``sqlite:///`` is followed by a relative path, ``sqlite:////`` by an absolute one (the
    SQLAlchemy convention).

    >>> sqlite_path("sqlite:///out/run.db")
    PosixPath('out/run.db')
    >>> sqlite_path("sqlite:////tmp/run.db")
    PosixPath('/tmp/run.db')
    >>> sqlite_path("run.sqlite")
    PosixPath('run.sqlite')
    """
    text = os.fspath(url)
    if text.startswith("sqlite:///"):
        rest = text[len("sqlite:///") :]
        return Path(rest) if rest else None
    if "://" not in text and text.lower().endswith(SQLITE_SUFFIXES):
        return Path(text).expanduser()
    return None


def store_files(url: str | os.PathLike[str] | None) -> list[Path]:
    """The files a results store URL keeps data in: a SQLite database with its write-ahead
    log, shared-memory index and rollback journal; none for PostgreSQL (or no URL). What an
    output must never overwrite (:func:`chipscale.atomic.refuse_overwrite`).

    >>> [p.name for p in store_files("sqlite:///out/r.db")]
    ['r.db', 'r.db-wal', 'r.db-shm', 'r.db-journal']
    """
    path = None if url is None else sqlite_path(url)
    if path is None:
        return []
    return [path, *(path.with_name(path.name + end) for end in ("-wal", "-shm", "-journal"))]


def is_postgres_url(url: str | os.PathLike[str]) -> bool:
    """Whether ``url`` names a PostgreSQL database: ``postgresql://`` or ``postgres://``, in
    SQLAlchemy's spelling too (``postgresql+psycopg2://``), or a libpq keyword string.

    >>> [is_postgres_url(u) for u in ("postgres+psycopg://h/db", "host=h dbname=db", "a.db")]
    [True, True, False]
    """
    text = os.fspath(url)
    return bool(_POSTGRES_URL.match(text) or ("://" not in text and _LIBPQ_KEYWORDS.match(text)))


def open_store(url: str | os.PathLike[str], *, create: bool = True) -> ResultStore:
    """Open the result store a URL names, creating (or upgrading) its schema if needed.

    ``create=False`` is for reading commands and PostgreSQL workers in the cloud: a database
    without the current schema is then a StoreError naming ``chipscale db-setup`` instead of
    DDL run by every cold start, and a SQLite file that is missing or holds no results schema
    is a StoreError, nothing created (an older SQLite schema is still upgraded).

    Raises
    ------
    StoreError
        For an unknown scheme, a file that is not a SQLite database, a PostgreSQL URL without
        psycopg installed, or a schema that is missing (``create=False``) or newer than this
        chipscale.
    StoreUnavailable
        When the database cannot be reached now (a retry may succeed).
    """
    text = os.fspath(url)
    if is_postgres_url(text):
        return _postgres().PostgresStore(_parsable(text), create=create)
    return SQLiteStore(_sqlite_file(text), create=create)


def setup_store(url: str | os.PathLike[str]) -> str:
    """Create or migrate the results schema a URL names (``chipscale db-setup``); returns a
    one-line summary. Idempotent, and safe to run from several processes at once."""
    text = os.fspath(url)
    if is_postgres_url(text):
        return _postgres().setup_database(_parsable(text))
    path = _sqlite_file(text)
    with SQLiteStore(path):
        pass
    return f"results schema of SQLite store {str(path)!r} is at version {SCHEMA_VERSION}"


def _parsable(text: str) -> str:
    """``text`` if it is a URL Python can split (e.g. an IPv6 host closed by ``]``), else a
    StoreError that does not quote it: a URL may carry a password."""
    if "://" in text:
        try:
            urlsplit(text)
        except ValueError as exc:
            raise StoreError(
                f"Malformed PostgreSQL URL ({exc}): expected "
                "postgresql://user:password@host:port/dbname, an IPv6 host in brackets ([::1])"
            ) from None
    return text


def _sqlite_file(text: str) -> Path:
    path = sqlite_path(text)
    if path is None:
        raise StoreError(
            f"Unknown results store URL {redact(text)!r}: expected sqlite:///relative/path.db, "
            f"sqlite:////absolute/path.db, a path ending {', '.join(SQLITE_SUFFIXES)}, "
            "or postgresql://user:password@host/dbname"
        )
    return path


def _postgres() -> Any:
    try:
        from chipscale.results import postgres
    except ImportError as exc:
        raise StoreError(missing_message(exc.name or "psycopg", "a PostgreSQL store")) from None
    return postgres
