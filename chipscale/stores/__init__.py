"""Result stores: the ResultStore port and its adapters, chosen by URL.

>>> store = open_store("sqlite:///results/run.db")   # doctest: +SKIP

URLs: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, or a bare path ending
``.db``, ``.sqlite`` or ``.sqlite3``. ``postgresql://`` URLs are reserved for the PostgreSQL
adapter, which arrives with the cloud data plane.
"""

from __future__ import annotations

import os
from pathlib import Path

from chipscale.errors import StoreError
from chipscale.stores.base import DONE_STATUSES, STATUSES, ResultStore
from chipscale.stores.sqlite import SCHEMA_VERSION, SQLiteStore

__all__ = [
    "DONE_STATUSES",
    "SCHEMA_VERSION",
    "STATUSES",
    "ResultStore",
    "SQLiteStore",
    "open_store",
    "sqlite_path",
]

SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")


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


def open_store(url: str | os.PathLike[str]) -> ResultStore:
    """Open (creating if needed) the result store a URL names.

    Raises
    ------
    StoreError
        For an unknown scheme, a PostgreSQL URL (not yet supported), or a file that is not a
        SQLite database.
    """
    text = os.fspath(url)
    if text.lower().startswith(_POSTGRES_SCHEMES):
        # The hook for the PostgreSQL adapter (chipscale.stores.postgres).
        raise StoreError(
            "PostgreSQL arrives with the cloud data plane: use a SQLite store for now "
            "(sqlite:///path/results.db)"
        )
    path = sqlite_path(text)
    if path is None:
        raise StoreError(
            f"Unknown results store URL {text!r}: expected sqlite:///relative/path.db, "
            f"sqlite:////absolute/path.db or a path ending {', '.join(SQLITE_SUFFIXES)}"
        )
    return SQLiteStore(path)
