"""What both result stores share about vector features: the rows a write stores (one per
feature, numbered ``seq`` within its tile) and the ``WHERE`` clauses of the feature and
window reads, in either adapter's parameter style."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chipscale.errors import StoreError
from chipscale.values import FeatureRow, TileResult

#: The columns a feature read selects, in :class:`chipscale.values.FeatureRow`'s order.
FEATURE_COLUMNS = "job, z, x, y, seq, class, geom, size, score, background"

#: A tile's key: ``(job, z, x, y)``.
TileKey = tuple[str, int, int, int]

#: A stored feature: ``(job, z, x, y, seq, class, score, size, background, geom)``.
FeatureValues = tuple[str, int, int, int, int, str, float | None, int, bool, bytes]


def feature_rows(results: Sequence[TileResult]) -> tuple[list[TileKey], list[FeatureValues]]:
    """The tiles whose features a write replaces, in key order, and the feature rows to
    insert for them.

    Only results whose ``features`` is not None replace anything (a classification write has
    none: both lists empty). A tile given twice in one write keeps its last result's
    features, as its row keeps the last result.

    >>> from mercantile import Tile
    >>> from chipscale.values import TileFeature
    >>> r = TileResult("j", Tile(1, 2, 3), "ok", features=(TileFeature("a", b"w", size=4),))
    >>> feature_rows([r, TileResult("j", Tile(0, 0, 3), "ok")])
    ([('j', 3, 1, 2)], [('j', 3, 1, 2, 0, 'a', None, 4, False, b'w')])
    """
    if all(result.features is None for result in results):
        return [], []  # classification: nothing to do, at no cost per row
    latest: dict[TileKey, TileResult] = {}
    for result in results:
        tile = result.tile
        latest[(result.job, tile.z, tile.x, tile.y)] = result
    replaced: list[TileKey] = []
    rows: list[FeatureValues] = []
    for key, result in sorted(latest.items()):
        if result.features is None:
            continue
        replaced.append(key)
        for seq, feature in enumerate(result.features):
            if not isinstance(feature.wkb, bytes | bytearray | memoryview) or not feature.wkb:
                raise StoreError(
                    f"Feature {seq} of job {key[0]!r} tile {key[2:] + key[1:2]} has no WKB geometry"
                )
            if type(feature.size) is not int or feature.size < 1:
                raise StoreError(
                    f"Feature {seq} of job {key[0]!r} tile {key[2:] + key[1:2]} has tile size "
                    f"{feature.size!r}: expected a positive integer"
                )
            score = None if feature.score is None else float(feature.score)
            rows.append(
                (*key, seq, str(feature.cls), score, feature.size, bool(feature.background),
                 bytes(feature.wkb))
            )  # fmt: skip
    return replaced, rows


def window_filter(job: str, window: Sequence[int], placeholder: str) -> tuple[str, list[Any]]:
    """The condition selecting a job's tiles inside ``window`` (``(z, xmin, ymin, xmax,
    ymax)``, inclusive): a range of the ``(job, z, x, y)`` key that x bounds and y filters.

    >>> window_filter("j", (3, 0, 1, 2, 3), "?")
    ('job = ? AND z = ? AND x BETWEEN ? AND ? AND y BETWEEN ? AND ?', ['j', 3, 0, 2, 1, 3])
    """
    if len(window) != 5 or not all(type(v) is int for v in window):
        raise StoreError(
            f"A tile window is five integers (z, xmin, ymin, xmax, ymax), not {window!r}"
        )
    z, xmin, ymin, xmax, ymax = window
    p = placeholder
    where = f"job = {p} AND z = {p} AND x BETWEEN {p} AND {p} AND y BETWEEN {p} AND {p}"
    return where, [job, z, xmin, xmax, ymin, ymax]


def features_filter(
    job: str,
    classes: Sequence[str] | None,
    background: bool,
    window: Sequence[int] | None,
    placeholder: str,
) -> tuple[str, list[Any]]:
    """The condition selecting a job's features: of ``classes`` when given (none for an empty
    list), background regions too only when ``background``, tiles inside ``window`` when
    given.

    >>> features_filter("j", ["a", "b"], False, None, "%s")
    ('job = %s AND class IN (%s, %s) AND NOT background', ['j', 'a', 'b'])
    """
    if window is None:
        where, params = f"job = {placeholder}", [job]
    else:
        where, params = window_filter(job, window, placeholder)
    if classes is not None:
        if isinstance(classes, str):
            classes = [classes]
        if classes:
            where += f" AND class IN ({', '.join([placeholder] * len(classes))})"
            params.extend(classes)
        else:
            where += " AND 1 = 0"
    if not background:
        where += " AND NOT background"
    return where, params


def features_query(
    job: str,
    classes: Sequence[str] | None,
    background: bool,
    window: Sequence[int] | None,
    placeholder: str,
) -> tuple[str, list[Any]]:
    """The query of :meth:`ResultStore.iter_features` (rows for :func:`feature_row`): a range
    scan of the primary key ``(job, z, x, y, seq)``, in its order."""
    where, params = features_filter(job, classes, background, window, placeholder)
    return f"SELECT {FEATURE_COLUMNS} FROM features WHERE {where} ORDER BY z, x, y, seq", params


def window_query(
    columns: str, job: str, window: Sequence[int], limit: int | None, placeholder: str
) -> tuple[str, list[Any]]:
    """The query of :meth:`ResultStore.results_in` selecting ``columns``: a range scan of
    the primary key ``(job, z, x, y)`` (x bounds it, y is checked on the way) in its order,
    so that ``limit`` stops it early."""
    where, params = window_filter(job, window, placeholder)
    query = f"SELECT {columns} FROM results WHERE {where} ORDER BY x, y"
    if limit is not None:
        query += f" LIMIT {placeholder}"
        params.append(max(0, int(limit)))
    return query, params


def has_features_query(placeholder: str) -> str:
    """The query of :meth:`ResultStore.has_features` (one parameter, the job)."""
    return f"SELECT EXISTS (SELECT 1 FROM features WHERE job = {placeholder})"


def feature_row(row: Sequence[Any]) -> FeatureRow:
    """A row of :data:`FEATURE_COLUMNS` as read back, in either store."""
    job, z, x, y, seq, cls, wkb, size, score, background = row
    return FeatureRow(job, z, x, y, seq, cls, bytes(wkb), size, score, bool(background))
