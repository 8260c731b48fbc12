"""The viewer's queries that the ResultStore port has no call for, each bounded whatever the
job's size: low-zoom cells sampled on a lattice of tiles, a job's extent from index seeks,
and its counts off the request path.

Cells: a map tile far above the job's zoom covers up to millions of result tiles. Scanning
them (a grouped count) took 2 s for a million rows here, and a top class needs each output's
JSON decoded. Instead each cell of ``2 ** shift`` tiles a side is sampled at up to 3 x 3
lattice points (the centres of its sub-blocks), fetched by primary-key lookups: 2,304
lookups a map tile, tens of milliseconds, the same for any job size. The page colours a cell by the
majority top class of its samples. A cell whose tiles all miss the lattice (a ragged AOI
edge at a low zoom) shows nothing until zoomed in. Figures: docs/design.md, "The viewer".

SQLite reads on connections of its own (read-only, one per thread: WAL readers do not block
each other or the writers; the store's own connection is shared under a lock). PostgreSQL
uses the store's connection. A store of another kind answers through ``results_in``.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from chipscale.results.base import STATUSES, ResultStore, TileWindow

#: Lattice points per cell side at most (so 9 samples a cell: 2,304 lookups a map tile;
#: 4 a side cost 1.8x the time for a majority that changed little).
SAMPLES_PER_SIDE = 3
#: A map tile's window (clipped to the job's columns) of at most this many tiles is read
#: whole rather than sampled: at most this many rows, found by seeks.
EXACT_AREA = 16_384
#: Columns whose lowest and highest row bound the extent's y range (index seeks).
EXTENT_COLUMNS = 64

_LATTICE_SQLITE = """
WITH xs(x) AS (SELECT value FROM json_each(?)), ys(y) AS (SELECT value FROM json_each(?))
SELECT r.x, r.y, r.status, r.output
FROM xs CROSS JOIN ys CROSS JOIN results AS r
WHERE r.job = ? AND r.z = ? AND r.x = xs.x AND r.y = ys.y
"""

_LATTICE_POSTGRES = """
SELECT r.x, r.y, r.status, r.output
FROM unnest(%s::int[]) AS xs(x) CROSS JOIN unnest(%s::int[]) AS ys(y)
JOIN results AS r ON r.job = %s AND r.z = %s AND r.x = xs.x AND r.y = ys.y
"""

# Two subqueries: min and max in one SELECT make SQLite scan instead of seeking twice.
# Every tile of a small block, by seeks: the columns' y ranges of the primary key.
_BLOCK_SQLITE = """
SELECT x, y, status, output FROM results
WHERE job = ? AND z = ? AND x IN (SELECT value FROM json_each(?)) AND y BETWEEN ? AND ?
"""
_BLOCK_POSTGRES = """
SELECT x, y, status, output FROM results
WHERE job = %s AND z = %s AND x = ANY(%s::int[]) AND y BETWEEN %s AND %s
"""

_X_RANGE = (
    "SELECT (SELECT min(x) FROM results WHERE job = ? AND z = ?), "
    "(SELECT max(x) FROM results WHERE job = ? AND z = ?)"
)
_Y_AT = (
    "SELECT (SELECT min(y) FROM results WHERE job = ? AND z = ? AND x = ?), "
    "(SELECT max(y) FROM results WHERE job = ? AND z = ? AND x = ?)"
)
_NEXT_X = "SELECT min(x) FROM results WHERE job = ? AND z = ? AND x >= ?"
_COUNTS = "SELECT status, count(*) FROM results WHERE job = ? GROUP BY status"


def _tally(rows: list[tuple[Any, ...]], shift: int) -> dict[tuple[int, int], Cell]:
    """Rows ``(x, y, status, output)`` counted into cells, the outputs of at most
    ``SAMPLES_PER_SIDE ** 2`` ``ok`` tiles a cell kept (decoded)."""
    keep = SAMPLES_PER_SIDE**2
    found: dict[tuple[int, int], Cell] = {}
    for x, y, status, output in rows:
        cell = found.setdefault((int(x) >> shift, int(y) >> shift), Cell())
        if status == "ok":
            cell.ok += 1
            if len(cell.samples) < keep:
                cell.samples.append(orjson.loads(output) if isinstance(output, str) else output)
        elif status == "empty":
            cell.empty += 1
        else:
            cell.error += 1
    return found


@dataclass
class Cell:
    """One cell's sampled tiles: how many of each status, and the ``ok`` ones' outputs."""

    ok: int = 0
    empty: int = 0
    error: int = 0
    samples: list[Any] = field(default_factory=list)


def lattice(shift: int) -> list[int]:
    """Offsets of a cell's sample rows (or columns) for cells of ``2 ** shift`` tiles: the
    centres of :data:`SAMPLES_PER_SIDE` equal strips (every tile of a smaller cell).

    >>> lattice(4), lattice(3), lattice(1)
    ([2, 8, 13], [1, 4, 6], [0, 1])
    """
    side = 1 << shift
    per = min(SAMPLES_PER_SIDE, side)
    return [int((i + 0.5) * side / per) for i in range(per)]


class Queries:
    """The viewer's own queries on one store (see the module docstring)."""

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        from chipscale.results.sqlite import SQLiteStore

        self._sqlite = store.path if isinstance(store, SQLiteStore) else None
        postgres = sys.modules.get("chipscale.results.postgres")  # imported if it is one
        self._postgres = postgres is not None and isinstance(store, postgres.PostgresStore)

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        if self._sqlite is not None:
            conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
            if conn is None:
                uri = self._sqlite.resolve().as_uri() + "?mode=ro"
                conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
                conn.execute("PRAGMA busy_timeout = 5000")
                self._local.conn = conn
                with self._lock:
                    self._connections.append(conn)
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                from chipscale.errors import StoreError

                raise StoreError(f"SQLite store {self._sqlite}: {exc}") from None
        pg_read = getattr(self.store, "_read")  # noqa: B009 (PostgresStore's, by design)
        return pg_read("reading for the viewer", sql.replace("?", "%s"), params)

    @property
    def has_sql(self) -> bool:
        return self._sqlite is not None or self._postgres

    def cells(
        self,
        job: str,
        window: TileWindow,
        shift: int,
        columns: tuple[int, int] | None = None,
    ) -> dict[tuple[int, int], Cell]:
        """The cells of ``2 ** shift`` tiles a side inside ``window`` that hold results.

        ``columns``: the job's ``(xmin, xmax)``, which clips the window. A clipped window of
        at most :data:`EXACT_AREA` tiles is read whole (every tile counted: a small job or a
        thin strip of a large one stays visible); a larger one is sampled on the lattice.
        """
        z, xmin, ymin, xmax, ymax = window
        if columns is not None:
            xmin, xmax = max(xmin, columns[0]), min(xmax, columns[1])
            if xmin > xmax:
                return {}
        if (xmax - xmin + 1) * (ymax - ymin + 1) <= EXACT_AREA:
            return _tally(self._block(job, (z, xmin, ymin, xmax, ymax)), shift)
        offsets = lattice(shift)
        xs = [
            x
            for cx in range(xmin >> shift, (xmax >> shift) + 1)
            for x in ((cx << shift) + o for o in offsets)
            if xmin <= x <= xmax
        ]
        ys = [
            (cy << shift) + o for cy in range(ymin >> shift, (ymax >> shift) + 1) for o in offsets
        ]
        if self._sqlite is not None:
            rows = self._query(_LATTICE_SQLITE, [json.dumps(xs), json.dumps(ys), job, z])
        elif self._postgres:
            pg_read = getattr(self.store, "_read")  # noqa: B009
            rows = pg_read("reading for the viewer", _LATTICE_POSTGRES, [xs, ys, job, z])
        else:
            rows = [
                (r.x, r.y, r.status, r.output)
                for x in xs
                for y in ys
                for r in self.store.results_in(job, (z, x, y, x, y), limit=1)
            ]
        return _tally(rows, shift)

    def _block(self, job: str, window: TileWindow) -> list[tuple[Any, ...]]:
        z, xmin, ymin, xmax, ymax = window
        xs = list(range(xmin, xmax + 1))
        if self._sqlite is not None:
            return self._query(_BLOCK_SQLITE, [job, z, json.dumps(xs), ymin, ymax])
        if self._postgres:
            pg_read = getattr(self.store, "_read")  # noqa: B009
            return pg_read("reading for the viewer", _BLOCK_POSTGRES, [job, z, xs, ymin, ymax])
        rows = self.store.results_in(job, window, limit=EXACT_AREA)
        return [(r.x, r.y, r.status, r.output) for r in rows]

    def extent(self, job: str, zoom: int) -> tuple[int, int, int, int] | None:
        """``(xmin, ymin, xmax, ymax)`` of the job's tiles at ``zoom``: x exact, y from the
        lowest and highest tile of :data:`EXTENT_COLUMNS` columns (index seeks, no scan);
        None for a store without SQL or a job without tiles at ``zoom``."""
        if not self.has_sql:
            return None
        found = self._query(_X_RANGE, [job, zoom, job, zoom])
        if not found or found[0][0] is None:
            return None
        xmin, xmax = int(found[0][0]), int(found[0][1])
        step = max(1, (xmax - xmin) // EXTENT_COLUMNS)
        columns = set()
        for probe in sorted({xmin, xmax, *range(xmin, xmax, step)}):
            column = self._query(_NEXT_X, [job, zoom, probe])[0][0]  # the next with rows
            if column is not None:
                columns.add(int(column))
        ylow, yhigh = [], []
        for column in columns:
            low, high = self._query(_Y_AT, [job, zoom, column, job, zoom, column])[0]
            ylow.append(int(low))
            yhigh.append(int(high))
        return xmin, min(ylow), xmax, max(yhigh)

    def counts(self, job: str) -> dict[str, int]:
        """The store's :meth:`~chipscale.results.base.ResultStore.counts` of one job; for
        SQLite on the viewer's own connection, so the scan holds no lock the other queries
        need."""
        if self._sqlite is None:
            return self.store.counts(job)
        found = {status: 0 for status in STATUSES}
        for status, count in self._query(_COUNTS, [job]):
            found[str(status)] = int(count)
        found["total"] = sum(found.values())
        return found

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
