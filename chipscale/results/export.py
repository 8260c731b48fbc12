"""Result export: what ``chipscale download`` and ``convert-geojson`` run. The format comes
from the file name (CSV, GeoJSON or GeoParquet); rows stream from the store through the
score thresholds into the writer, in constant memory."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from chipscale.results.base import ResultStore
from chipscale.results.export_csv import read_csv_rows, write_csv
from chipscale.results.export_geojson import write_geojson
from chipscale.results.export_geoparquet import write_geoparquet
from chipscale.results.export_rows import ExportError, PathLike, classes_for, filter_rows

__all__ = ["FORMATS", "csv_to_geojson", "export_results", "format_for"]

FORMATS = {
    ".csv": "csv",
    ".geojson": "geojson",
    ".json": "geojson",
    ".parquet": "geoparquet",
    ".geoparquet": "geoparquet",
}


def format_for(path: PathLike) -> str:
    """``"csv"``, ``"geojson"`` or ``"geoparquet"`` from a file name's suffix, else
    :class:`ExportError`."""
    suffix = Path(path).suffix.lower()
    try:
        return FORMATS[suffix]
    except KeyError:
        raise ExportError(
            f"Cannot tell the export format of {os.fspath(path)!r}: name it "
            f"{', '.join('*' + s for s in FORMATS)}"
        ) from None


def export_results(
    store: ResultStore,
    job: str | None,
    path: PathLike,
    *,
    class_name: str | None = None,
    min_score: float | None = None,
) -> int:
    """Write a job's results (``job=None``: every job's) to ``path``, CSV, GeoJSON or
    GeoParquet by its suffix, keeping the rows that pass the threshold (see :func:`filter_rows`).

    Written atomically (see :mod:`chipscale.atomic`). Returns how many rows were written.
    """
    fmt = format_for(path)
    if job is not None and store.get_job(job) is None and store.counts(job)["total"] == 0:
        known = ", ".join(repr(info.job) for info in store.jobs()) or "(none)"
        raise ExportError(f"No job {job!r} in {store.url}: the jobs are {known}")
    classes = classes_for(store, job)
    status = "ok" if class_name is not None or min_score is not None else None
    rows = filter_rows(
        store.iter_results(job, status=status), class_name, min_score, classes=classes
    )
    return _WRITERS[fmt](rows, path, classes)


#: Each format's writer: (rows, where to, the class columns) -> how many rows it wrote.
_WRITERS: dict[str, Callable[..., int]] = {
    "csv": write_csv,
    "geojson": write_geojson,
    "geoparquet": write_geoparquet,
}


def csv_to_geojson(
    csv_in: TextIO | PathLike,
    geojson_out: TextIO | PathLike,
    *,
    class_name: str | None = None,
    min_score: float | None = None,
    tms: bool = False,
    classes: Sequence[str] = (),
) -> int:
    """chip-n-scale's convert-geojson: a downloaded results CSV to GeoJSON, streamed, with the
    threshold of :func:`filter_rows`. Returns the number of features written.

    A path for ``geojson_out`` is written atomically (temp file, then rename).
    """
    found, rows = read_csv_rows(csv_in, tms=tms, classes=classes)
    try:
        kept = filter_rows(rows, class_name, min_score, classes=found)
        return write_geojson(kept, geojson_out, found)
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()
