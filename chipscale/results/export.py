"""Result export: what ``chipscale download`` and ``convert-geojson`` run. The format comes
from the file name (CSV, GeoJSON, GeoParquet, FlatGeobuf, or a ``.tif`` class mask); rows
stream from the store through the score thresholds into the writer, in constant memory. A
segmentation job exports its merged regions (:mod:`chipscale.results.export_features`) unless
the ``tiles`` layer is asked for."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from chipscale.results.base import ResultStore
from chipscale.results.export_csv import read_csv_rows, write_csv
from chipscale.results.export_geojson import write_geojson
from chipscale.results.export_geoparquet import write_geoparquet
from chipscale.results.export_rows import (
    ExportError,
    PathLike,
    classes_for,
    filter_rows,
    has_assets,
)

__all__ = [
    "FORMATS",
    "LAYERS",
    "choose_layer",
    "csv_to_geojson",
    "export_job",
    "export_results",
    "format_for",
]

FORMATS = {
    ".csv": "csv",
    ".geojson": "geojson",
    ".json": "geojson",
    ".parquet": "geoparquet",
    ".geoparquet": "geoparquet",
    ".fgb": "flatgeobuf",
    ".tif": "mask",
    ".tiff": "mask",
}
#: What a download holds: one row per tile, or one feature per merged region.
LAYERS = ("tiles", "features")


def format_for(path: PathLike) -> str:
    """``"csv"``, ``"geojson"``, ``"geoparquet"``, ``"flatgeobuf"`` or ``"mask"`` from a file
    name's suffix, else :class:`ExportError`."""
    suffix = Path(path).suffix.lower()
    try:
        return FORMATS[suffix]
    except KeyError:
        raise ExportError(
            f"Cannot tell the export format of {os.fspath(path)!r}: name it "
            f"{', '.join('*' + s for s in FORMATS)}"
        ) from None


def choose_layer(store: ResultStore, job: str | None, fmt: str, layer: str | None) -> str:
    """``"tiles"``, ``"features"`` or ``"mask"`` (a ``.tif``): features by default for a job
    that stored some (a segmentation job) in a format that holds them; a one-line
    :class:`ExportError` for a layer the format or the selection cannot hold."""
    if fmt == "mask":
        if layer == "tiles":
            raise ExportError(
                "a .tif is the class mask: name the file *.csv, *.geojson or *.parquet for tiles"
            )
        if job is None:
            raise ExportError("a class mask is one job's: give --job")
        return "mask"
    if layer is None:
        wants = job is not None and fmt != "csv" and store.has_features(job)
        layer = "features" if wants else "tiles"
    if layer == "features":
        if job is None:
            raise ExportError("features are exported one job at a time: give --job")
        if fmt == "csv":
            raise ExportError("features are written as *.geojson, *.parquet or *.fgb, not CSV")
    elif fmt == "flatgeobuf":
        raise ExportError(
            "a .fgb holds features: --layer features (tiles: *.csv, *.geojson, *.parquet)"
        )
    return layer


def export_job(
    store: ResultStore,
    job: str | None,
    path: PathLike,
    *,
    layer: str | None = None,
    class_name: str | None = None,
    min_score: float | None = None,
    precision: int | None = 7,
) -> tuple[int, str]:
    """What ``chipscale download`` writes: tiles, merged features or the class mask, by
    :func:`choose_layer`; ``class_name`` filters every layer (``precision``: decimals of a
    features GeoJSON, None for all). Returns how many were written and what they are
    (``"row"``, ``"feature"`` or ``"tile"``)."""
    fmt = format_for(path)
    chosen = choose_layer(store, job, fmt, layer)
    if chosen == "tiles":
        return export_results(store, job, path, class_name=class_name, min_score=min_score), "row"
    assert job is not None  # choose_layer
    if min_score is not None:
        raise ExportError("--min-score filters tiles by score: with features, use --layer tiles")
    info = store.get_job(job)
    if info is None:
        known = ", ".join(repr(i.job) for i in store.jobs()) or "(none)"
        raise ExportError(f"No job {job!r} in {store.url}: the jobs are {known}")
    if class_name is not None and info.classes and class_name not in info.classes:
        listed = ", ".join(repr(name) for name in info.classes)
        raise ExportError(f"Unknown class {class_name!r}: the known classes are {listed}")
    classes = None if class_name is None else [class_name]
    if chosen == "mask":
        from chipscale.results.mask_cog import write_mask_cog

        return write_mask_cog(store, job, path, classes=classes), "tile"
    from chipscale.results.export_features import export_features

    return export_features(store, job, path, fmt, classes=classes, precision=precision), "feature"


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
    if fmt not in _WRITERS:
        raise ExportError(f"tiles are written as *.csv, *.geojson or *.parquet, not {fmt}")
    if job is not None and store.get_job(job) is None and store.counts(job)["total"] == 0:
        known = ", ".join(repr(info.job) for info in store.jobs()) or "(none)"
        raise ExportError(f"No job {job!r} in {store.url}: the jobs are {known}")
    classes = classes_for(store, job)
    status = "ok" if class_name is not None or min_score is not None else None
    rows = filter_rows(
        store.iter_results(job, status=status), class_name, min_score, classes=classes
    )
    return _WRITERS[fmt](rows, path, classes, assets=has_assets(store, job))


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
