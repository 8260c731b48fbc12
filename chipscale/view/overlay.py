"""The viewer's queries on a results store: a job's summary, the result tiles under one map
tile, per-cell aggregates at low zooms, the features of segmentation and detection jobs, and
one tile's details. Every answer is bounded: a map tile's window of the store, never the job.

Map tiles are the page's XYZ tiles (zoom ``z``); results are tiles of the job's zoom ``jz``.
From ``jz - DETAIL`` up, a map tile lists its result tiles (``store.results_in``, at most
``4 ** DETAIL``); below, it lists cells of ``2 ** shift`` result tiles a side, each with the
statuses and top classes of a sample of its tiles (:mod:`chipscale.view.aggregate`). A job's
counts are taken off the request path (a million rows take seconds to count): the summary
answers the latest, refreshed in the background while the page polls.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from chipscale.errors import StoreError
from chipscale.results.base import ResultStore, TileWindow
from chipscale.results.class_colors import CLASS_COLORS
from chipscale.values import JobInfo, ResultRow
from chipscale.view.aggregate import Queries

#: Map tiles at most this many zooms above the job's zoom list result tiles one by one
#: (at most ``4 ** DETAIL`` a map tile); lower zooms show aggregated cells.
DETAIL = 4
#: Map tiles at most this many zooms above the job's zoom carry the tiles' features.
FEATURE_DETAIL = 2
#: Regions smaller than this many screen pixels at the map tile's zoom are left out.
MIN_AREA_PX = 1.0
#: Features sent for one map tile at most (the answer says when it stopped there).
MAX_FEATURES = 5000
#: Seconds a job's counts are reused at least; a count that took longer is reused for
#: COUNT_REUSE times as long, so counting a large job takes at most a fifth of a core.
SUMMARY_TTL = 2.0
COUNT_REUSE = 4.0
#: Seconds the first summary of a job waits for its counts (a small job's take milliseconds).
FIRST_COUNT_WAIT = 0.3

#: Colours of the other classes, in order (matplotlib's tab10, as the preview picture).
TAB10 = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip

STATUS_CODES = {"ok": 0, "empty": 1, "error": 2}


def top_class(output: Any) -> tuple[str, float] | None:
    """The class with the highest score of a ``{class: score}`` output, or None.

    >>> top_class({"a": 0.2, "b": 0.7})
    ('b', 0.7)
    >>> top_class({"a": "x"}) is None
    True
    """
    if not isinstance(output, dict) or not output:
        return None
    try:  # the common case, every score a number: max() in C
        name, value = max(output.items(), key=itemgetter(1))
    except TypeError:
        numbers = {
            k: v
            for k, v in output.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if not numbers:
            return None
        name, value = max(numbers.items(), key=itemgetter(1))
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    return str(name), float(value)


class Classes:
    """A job's classes in a fixed order, so answers name them by index: the recorded ones
    first, then any class an output names that the record does not (thread-safe)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self._lock = threading.Lock()
        self._names: list[str] = list(dict.fromkeys(names))
        self._index = {name: i for i, name in enumerate(self._names)}

    def index(self, name: str) -> int:
        found = self._index.get(name)
        if found is not None:
            return found
        with self._lock:
            if name not in self._index:
                self._index[name] = len(self._names)
                self._names.append(name)
            return self._index[name]

    def legend(self) -> list[dict[str, str]]:
        with self._lock:
            names = list(self._names)
        return [{"name": n, "color": color(n, i)} for i, n in enumerate(names)]

    def names(self) -> list[str]:
        with self._lock:
            return list(self._names)


def color(name: str, index: int) -> str:
    """The colour of a class: a familiar one for common names, else tab10 by index."""
    return CLASS_COLORS.get(name.lower(), TAB10[index % len(TAB10)])


@dataclass
class JobView:
    """What the viewer keeps of one job between requests."""

    info: JobInfo
    zoom: int
    classes: Classes
    has_features: bool
    extent: tuple[int, int, int, int] | None  # xmin, ymin, xmax, ymax at ``zoom``
    #: The job's exact ``(xmin, xmax)`` at ``zoom`` (a store with SQL), clipping cells.
    columns: tuple[int, int] | None = None
    counts: dict[str, int] | None = None
    counted_at: float = 0.0
    count_seconds: float = 0.0
    counting: Future[None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class Overlay:
    """The overlay's answers for the jobs of one store; safe to call from many threads."""

    def __init__(self, store: ResultStore, *, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.queries = Queries(store)
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, JobView] = {}
        self._counter = ThreadPoolExecutor(
            1, thread_name_prefix="chipscale-view-count", initializer=_lower_priority
        )

    # -- jobs ----------------------------------------------------------------------------

    def job(self, name: str) -> JobView:
        """The job's view, looked up once; :class:`UnknownJob` when the store has none."""
        with self._lock:
            found = self._jobs.get(name)
        if found is not None:
            return found
        info = self.store.get_job(name)
        first = _first_row(self.store, name)
        if info is None and first is None:
            known = ", ".join(repr(j.job) for j in self.store.jobs()[:10]) or "none"
            raise UnknownJob(f"no job {name!r} in {self.store.url} (jobs: {known})")
        if info is None:
            info = JobInfo(job=name, source="")
        zoom = info.zoom if info.zoom is not None else first.z if first is not None else 0
        view = JobView(
            info=info,
            zoom=zoom,
            classes=Classes(info.classes),
            has_features=_has_features(self.store, name),
            extent=None,
        )
        self._measure(view, first)
        with self._lock:
            view = self._jobs.setdefault(name, view)
        self._recount(view)
        return view

    def _measure(self, view: JobView, first: ResultRow | None) -> None:
        """The job's extent (index seeks: cheap), or its first tile's for a store without
        SQL; again at each count, as a running job grows."""
        found = self.queries.extent(view.info.job, view.zoom)
        if found is not None:
            view.extent, view.columns = found, (found[0], found[2])
        elif first is not None and view.extent is None:
            view.extent = (first.x, first.y, first.x, first.y)

    def _recount(self, view: JobView) -> Future[None] | None:
        """Count the job's rows in the background unless the counts are fresh or already
        being counted; returns the count in flight, if any."""
        with view.lock:
            fresh = max(SUMMARY_TTL, COUNT_REUSE * view.count_seconds)
            if view.counting is not None and not view.counting.done():
                return view.counting
            if view.counts is not None and self._clock() - view.counted_at < fresh:
                return None
            view.counting = self._counter.submit(self._count, view)
            return view.counting

    def _count(self, view: JobView) -> None:
        started = self._clock()
        counts = self.queries.counts(view.info.job)
        self._measure(view, None)
        with view.lock:
            view.counts = counts
            view.counted_at = self._clock()
            view.count_seconds = view.counted_at - started

    def summary(self, name: str) -> dict[str, Any]:
        """Counts, progress, classes and extent of a job. The counts are the latest taken
        (None until the first is done, and at most :data:`FIRST_COUNT_WAIT` is spent on it)."""
        view = self.job(name)
        pending = self._recount(view)
        if view.counts is None and pending is not None:
            with contextlib.suppress(TimeoutError):
                pending.result(timeout=FIRST_COUNT_WAIT)
        info = self.store.get_job(name) or view.info
        if not view.has_features:  # a job's first features may come while it runs
            view.has_features = _has_features(self.store, name)
        counts = view.counts
        if view.extent is None and counts and counts["total"]:
            self._measure(view, _first_row(self.store, name))
        for cls in info.classes:
            view.classes.index(cls)
        total = info.tiles_total
        done = None if counts is None else counts["ok"] + counts["empty"]
        return {
            "job": name,
            "source": info.source,
            "zoom": view.zoom,
            "model": (
                None if info.model_name is None else f"{info.model_name} v{info.model_version}"
            ),
            "counts": counts,
            "count_seconds": round(view.count_seconds, 3),
            "tiles_total": total,
            "progress": None if not total or done is None else min(1.0, done / total),
            "classes": view.classes.legend(),
            "has_features": view.has_features,
            "extent": view.extent,
            "detail": DETAIL,
            "feature_detail": FEATURE_DETAIL,
        }

    def close(self) -> None:
        """Stop counting and close the viewer's own connections."""
        self._counter.shutdown(wait=True, cancel_futures=True)
        self.queries.close()

    # -- map tiles -----------------------------------------------------------------------

    def map_tile(self, name: str, z: int, x: int, y: int) -> dict[str, Any]:
        """The overlay of map tile ``z/x/y``: its result tiles or cells, and features."""
        view = self.job(name)
        jz = view.zoom
        answer: dict[str, Any]
        if z >= jz - DETAIL:
            answer = self._tiles(view, _window(z, x, y, jz))
        else:
            shift = jz - z - DETAIL
            answer = self._cells(view, _window(z, x, y, jz), shift)
        if view.has_features and z >= jz - FEATURE_DETAIL:
            answer["features"], answer["features_truncated"] = self._features(view, z, x, y)
        answer["classes"] = view.classes.names()
        return answer

    def _tiles(self, view: JobView, window: TileWindow) -> dict[str, Any]:
        _, xmin, ymin, xmax, ymax = window
        limit = (xmax - xmin + 1) * (ymax - ymin + 1)
        rows = self.store.results_in(view.info.job, window, limit=limit)
        tiles = []
        for row in rows:
            top = top_class(row.output) if row.status == "ok" else None
            tiles.append(
                [
                    row.x,
                    row.y,
                    STATUS_CODES.get(row.status, 2),
                    -1 if top is None else view.classes.index(top[0]),
                    None if top is None else round(top[1], 4),
                ]
            )
        return {"kind": "tiles", "zoom": view.zoom, "tiles": tiles}

    def _cells(self, view: JobView, window: TileWindow, shift: int) -> dict[str, Any]:
        found = self.queries.cells(view.info.job, window, shift, view.columns)
        cells = []
        for (cx, cy), cell in sorted(found.items()):
            samples = [
                [view.classes.index(top[0]), round(top[1], 4)]
                for top in (top_class(out) for out in cell.samples)
                if top is not None
            ]
            cells.append([cx, cy, cell.ok, cell.empty, cell.error, samples])
        return {"kind": "cells", "zoom": view.zoom, "shift": shift, "cells": cells}

    def _features(self, view: JobView, z: int, x: int, y: int) -> tuple[list[Any], bool]:
        """The features of the result tiles under map tile ``z/x/y``, as rings in the map
        tile's own pixels (0-256), each ``[class, score, [ring, ...]]``."""
        from shapely import wkb as shapely_wkb

        features: list[Any] = []
        rows = self.store.iter_features(view.info.job, window=_window(z, x, y, view.zoom))
        try:
            for row in rows:
                if len(features) >= MAX_FEATURES:
                    return features, True
                scale = 256 * 2.0 ** (z - view.zoom) / row.size
                ox, oy = (row.x * row.size) * scale - x * 256, (row.y * row.size) * scale - y * 256
                geometry = shapely_wkb.loads(row.wkb)
                if geometry.area * scale * scale < MIN_AREA_PX and geometry.area > 0:
                    continue  # smaller than a screen pixel at this zoom
                if scale < 1:  # zoomed out: vertices closer than half a screen pixel go
                    geometry = geometry.simplify(0.5 / scale, preserve_topology=True)
                rings = [
                    [[round(ox + cx * scale, 2), round(oy + cy * scale, 2)] for cx, cy in ring]
                    for ring in _rings(geometry)
                ]
                if rings:
                    features.append([view.classes.index(row.cls), row.score, rings])
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()
        return features, False

    # -- one tile ------------------------------------------------------------------------

    def tile(self, name: str, z: int, x: int, y: int) -> dict[str, Any] | None:
        """One result tile's details, or None when it has no row."""
        self.job(name)
        rows = self.store.results_in(name, (z, x, y, x, y), limit=1)
        if not rows:
            return None
        row = rows[0]
        return _details(row)


def _lower_priority() -> None:
    """Run this thread at nice 10 (Linux: a thread's own priority): a count of a large job
    scans its rows for seconds, and must not slow the map tiles a person waits for."""
    # Not Linux, or not allowed: the count just competes.
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class UnknownJob(StoreError):
    """The store holds no job of that name."""


def _details(row: ResultRow) -> dict[str, Any]:
    output = row.output
    scores = (
        sorted(output.items(), key=lambda kv: -kv[1] if isinstance(kv[1], int | float) else 0)
        if isinstance(output, dict)
        else None
    )
    top = top_class(output)
    return {
        "tile": [row.z, row.x, row.y],
        "status": row.status,
        "top": None if top is None else top[0],
        "scores": scores,
        "output": None if isinstance(output, dict) else output,
        "error": row.error,
        "assets": list(row.assets),
        "model": None if row.model_name is None else f"{row.model_name} v{row.model_version}",
        "attempts": row.attempts,
        "updated_at": row.updated_at,
    }


def _window(z: int, x: int, y: int, jz: int) -> TileWindow:
    """The block of job-zoom tiles under map tile ``z/x/y`` (or the one tile over it).

    >>> _window(10, 3, 5, 12)
    (12, 12, 20, 15, 23)
    >>> _window(14, 9, 9, 12)
    (12, 2, 2, 2, 2)
    """
    if z >= jz:
        shift = z - jz
        return (jz, x >> shift, y >> shift, x >> shift, y >> shift)
    shift = jz - z
    return (jz, x << shift, y << shift, ((x + 1) << shift) - 1, ((y + 1) << shift) - 1)


def _rings(geometry: Any) -> Iterator[list[tuple[float, float]]]:
    """The exterior and interior rings of a (multi)polygon; a line or point as one ring."""
    if geometry.is_empty:
        return
    if hasattr(geometry, "geoms"):
        for part in geometry.geoms:
            yield from _rings(part)
    elif geometry.geom_type == "Polygon":
        yield [(c[0], c[1]) for c in geometry.exterior.coords]
        for interior in geometry.interiors:
            yield [(c[0], c[1]) for c in interior.coords]
    else:
        yield [(c[0], c[1]) for c in geometry.coords]


def _first_row(store: ResultStore, job: str) -> ResultRow | None:
    rows = store.iter_results(job)
    try:
        return next(iter(rows), None)
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()


def _has_features(store: ResultStore, job: str) -> bool:
    has = getattr(store, "has_features", None)  # a store from before features: none
    try:
        return bool(has(job)) if has is not None else False
    except NotImplementedError:
        return False
