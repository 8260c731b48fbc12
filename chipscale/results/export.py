"""Result export: CSV, GeoJSON and GeoParquet, streamed in constant memory, with score
thresholds.

What ``chipscale download`` and ``convert-geojson`` run. Rows come from
:meth:`ResultStore.iter_results` (a stream) and are written one at a time; a GeoJSON
FeatureCollection is written feature by feature, never built as one dict, and GeoParquet one
row group at a time.

Columns (CSV) and properties (GeoJSON), in this order::

    job, z, x, y, quadkey, status, <one per class: its score>, model_name, model_version, error

GeoParquet has the same columns, typed, then ``geometry`` (the tile's footprint, WKB) and
``bbox`` (its GeoParquet 1.1 covering). A class column holds that class's score from the row's
output, blank (null) for ``empty`` and ``error`` rows. A model output is read as
``{"scores": {class: score}}``, ``{class: score}``, or a list of scores in class order
(``{"scores": [...]}`` or chip-n-scale's bare list).
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO, TextIO

import mercantile

from chipscale.atomic import atomic_write
from chipscale.errors import ChipscaleError
from chipscale.extras import missing_message
from chipscale.grid.tilelist import make_tile
from chipscale.results.base import ResultStore
from chipscale.safe_text import from_spreadsheet_text, spreadsheet_text
from chipscale.values import ResultRow

__all__ = [
    "FIXED_HEAD",
    "FIXED_TAIL",
    "ExportError",
    "classes_for",
    "csv_to_geojson",
    "export_results",
    "filter_rows",
    "format_for",
    "read_csv_rows",
    "require_pyarrow",
    "scores_of",
    "top_class",
    "write_csv",
    "write_geojson",
    "write_geoparquet",
]

FIXED_HEAD = ("job", "z", "x", "y", "quadkey", "status")
FIXED_TAIL = ("model_name", "model_version", "error")
FORMATS = {
    ".csv": "csv",
    ".geojson": "geojson",
    ".json": "geojson",
    ".parquet": "geoparquet",
    ".geoparquet": "geoparquet",
}
#: Decimal places of GeoJSON coordinates: 1e-7 degrees is about 1 cm.
COORD_PRECISION = 7
#: Rows per GeoParquet row group: what the writer holds in memory at once, and the unit a
#: reader skips by the bbox column's statistics. A million-row ``chipscale download`` from
#: PostgreSQL peaks at 177 MB with 10,000 (bench/push.py; CSV 58 MB), most of it imports:
#: pyarrow, and pandas, which pyarrow imports on its first array wherever it is installed
#: (about 50 MB, once). With 50,000 a row group the peak was 250 MB.
GEOPARQUET_BATCH_ROWS = 10_000
#: GeoParquet's own columns, after the CSV's.
GEOMETRY_COLUMNS = ("geometry", "bbox")
_BBOX_FIELDS = ("xmin", "ymin", "xmax", "ymax")
#: CSV quoting: minimal, or all for a row with a lone "\r" (csv leaves it unquoted).
_QUOTINGS = (csv.QUOTE_MINIMAL, csv.QUOTE_ALL)

PathLike = str | os.PathLike[str]


class ExportError(ChipscaleError, ValueError):
    """An export cannot be made as asked (bad format, unknown class or job, unreadable CSV)."""


# -- scores --------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def scores_of(output: Any, classes: Sequence[str] = ()) -> dict[str, float]:
    """The class scores in a model output, ``{}`` when there are none.

    >>> scores_of({"scores": {"road": 0.9, "field": 0.1}})
    {'road': 0.9, 'field': 0.1}
    >>> scores_of({"road": 0.9, "label": "road"})
    {'road': 0.9}
    >>> scores_of([0.2, 0.8], ["no", "yes"])
    {'no': 0.2, 'yes': 0.8}
    """
    if isinstance(output, dict) and "scores" in output:
        output = output["scores"]
    if isinstance(output, dict):
        return {str(k): float(v) for k, v in output.items() if _is_number(v)}
    if isinstance(output, list):
        names = list(classes) + [f"p{i}" for i in range(len(classes), len(output))]
        return {name: float(v) for name, v in zip(names, output, strict=False) if _is_number(v)}
    return {}


def top_class(scores: dict[str, float]) -> tuple[str, float] | None:
    """The best-scoring class and its score, ignoring non-finite scores; None if none."""
    finite = [(name, s) for name, s in scores.items() if math.isfinite(s)]
    return max(finite, key=lambda item: item[1]) if finite else None


def classes_for(store: ResultStore, job: str | None = None) -> list[str]:
    """The class columns of an export: the job's classes (all jobs: their union in first-seen
    order), or, when no job records any, the score keys seen in the outputs."""
    jobs = [store.get_job(job)] if job is not None else store.jobs()
    names: dict[str, None] = {}
    for info in jobs:
        if info is not None:
            names.update(dict.fromkeys(info.classes))
    if not names:  # a second streamed pass, only when the jobs do not say
        for row in store.iter_results(job, status="ok"):
            names.update(dict.fromkeys(scores_of(row.output)))
    return list(names)


def filter_rows(
    rows: Iterable[ResultRow],
    class_name: str | None = None,
    min_score: float | None = None,
    *,
    classes: Sequence[str] | None = None,
) -> Iterator[ResultRow]:
    """Keep the rows that pass a threshold; streams.

    - ``class_name`` and ``min_score``: rows whose score for that class is ``>= min_score``;
    - ``class_name`` alone: rows whose top class is ``class_name``;
    - ``min_score`` alone: rows whose top score is ``>= min_score``;
    - neither: every row (``empty`` and ``error`` ones included).

    With any filter, rows without scores (``empty``, ``error``) are dropped. An unknown
    ``class_name`` raises :class:`ExportError` listing the known classes: at once when
    ``classes`` is given, else at the first scored row that lacks it.
    """
    if class_name is not None and classes is not None and class_name not in classes:
        raise _unknown_class(class_name, classes)
    if min_score is not None and not math.isfinite(min_score):
        raise ExportError(f"min_score must be a finite number, not {min_score!r}")
    if class_name is None and min_score is None:
        return iter(rows)
    return _filter(rows, class_name, min_score, classes or ())


def _unknown_class(class_name: str, known: Iterable[str]) -> ExportError:
    listed = ", ".join(repr(name) for name in known) or "(none recorded)"
    return ExportError(f"Unknown class {class_name!r}: the known classes are {listed}")


def _filter(
    rows: Iterable[ResultRow],
    class_name: str | None,
    min_score: float | None,
    classes: Sequence[str],
) -> Iterator[ResultRow]:
    for row in rows:
        if row.status != "ok":
            continue
        scores = scores_of(row.output, classes)
        if not scores:
            continue
        if class_name is not None:
            if class_name not in scores:
                raise _unknown_class(class_name, classes or scores)
            if min_score is None:
                top = top_class(scores)
                keep = top is not None and top[0] == class_name
            else:
                keep = scores[class_name] >= min_score
        else:
            top = top_class(scores)
            keep = top is not None and top[1] >= min_score
        if keep:
            yield row


# -- writers -------------------------------------------------------------------------------


@contextlib.contextmanager
def _opened(out: IO[Any] | PathLike, *, binary: bool = False) -> Iterator[IO[Any]]:
    """An open stream as it is; a path written atomically (nothing half written on error)."""
    if isinstance(out, str | os.PathLike):
        text = {} if binary else {"encoding": "utf-8", "newline": ""}
        with atomic_write(out, "wb" if binary else "w", **text) as handle:
            yield handle
    else:
        yield out


def _row_values(row: ResultRow, classes: Sequence[str]) -> tuple[list[Any], list[float | None]]:
    tile = mercantile.Tile(row.x, row.y, row.z)
    scores = scores_of(row.output, classes) if row.status == "ok" else {}
    class_values = []
    for name in classes:
        value = scores.get(name)
        class_values.append(value if value is not None and math.isfinite(value) else None)
    head = [row.job, row.z, row.x, row.y, mercantile.quadkey(tile), row.status]
    return head, class_values


def _check_classes(classes: Sequence[str], reserved: Sequence[str] = ()) -> list[str]:
    classes = list(classes)
    clash = [name for name in classes if name in (*FIXED_HEAD, *FIXED_TAIL, *reserved)]
    if clash:
        raise ExportError(f"Class names {clash} clash with the export's fixed columns")
    if len(set(classes)) != len(classes):
        raise ExportError(f"Class names repeat: {classes}")
    return classes


def write_csv(rows: Iterable[ResultRow], out: TextIO | PathLike, classes: Sequence[str]) -> int:
    """Write rows as CSV (header first, text cells formula-safe); return how many were written."""
    classes = _check_classes(classes)
    count = 0
    with _opened(out) as handle:
        writers = [csv.writer(handle, lineterminator="\n", quoting=q) for q in _QUOTINGS]
        writers[0].writerow([*FIXED_HEAD, *map(spreadsheet_text, classes), *FIXED_TAIL])
        for row in rows:
            head, class_values = _row_values(row, classes)
            scores = ["" if v is None else repr(v) for v in class_values]
            text = [row.job, row.model_name or "", row.model_version or "", row.error or ""]
            job, *tail = map(spreadsheet_text, text)
            writers["\r" in "".join(text)].writerow([job, *head[1:], *scores, *tail])
            count += 1
    return count


def tile_polygon(z: int, x: int, y: int) -> dict[str, Any]:
    """A tile's footprint as a GeoJSON Polygon in lon/lat, exterior ring counter-clockwise
    (RFC 7946), coordinates rounded to :data:`COORD_PRECISION` decimals."""
    west, south, east, north = (
        round(v, COORD_PRECISION) for v in mercantile.bounds(mercantile.Tile(x, y, z))
    )
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    return {"type": "Polygon", "coordinates": [ring]}


def write_geojson(rows: Iterable[ResultRow], out: TextIO | PathLike, classes: Sequence[str]) -> int:
    """Write rows as an RFC 7946 FeatureCollection, one feature a line, streamed; return how
    many features were written."""
    classes = _check_classes(classes)
    count = 0
    with _opened(out) as handle:
        handle.write('{"type": "FeatureCollection", "features": [\n')
        for row in rows:
            head, class_values = _row_values(row, classes)
            properties = dict(zip(FIXED_HEAD, head, strict=True))
            properties.update(zip(classes, class_values, strict=True))
            properties.update(
                model_name=row.model_name, model_version=row.model_version, error=row.error
            )
            feature = {
                "type": "Feature",
                "geometry": tile_polygon(row.z, row.x, row.y),
                "properties": properties,
            }
            if count:
                handle.write(",\n")
            handle.write(json.dumps(feature, separators=(",", ":"), allow_nan=False))
            count += 1
        handle.write("\n]}\n")
    return count


# -- GeoParquet ----------------------------------------------------------------------------


def require_pyarrow() -> tuple[Any, Any]:
    """``pyarrow`` and ``pyarrow.parquet``, or :class:`ExportError` saying how to get them.

    pyarrow is an extra, not a core need: the worker Lambda's bundle must stay small, so it is
    imported here, only when GeoParquet is asked for.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ExportError(missing_message("pyarrow", "GeoParquet export")) from None
    if not hasattr(pq.ParquetWriter, "add_key_value_metadata"):
        raise ExportError(
            missing_message(f"pyarrow>=17 (not {pa.__version__})", "GeoParquet export", "parquet")
        )
    return pa, pq


def _geoparquet_schema(pa: Any, classes: Sequence[str]) -> Any:
    """The CSV's columns with real types, then the footprint and its bbox covering. Fixed
    columns are required (never null); scores and the tail are nullable, as blank in CSV."""
    corners = [pa.field(name, pa.float64(), nullable=False) for name in _BBOX_FIELDS]
    return pa.schema(
        [
            pa.field("job", pa.string(), nullable=False),
            pa.field("z", pa.int8(), nullable=False),
            pa.field("x", pa.int64(), nullable=False),
            pa.field("y", pa.int64(), nullable=False),
            pa.field("quadkey", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            *(pa.field(name, pa.float64()) for name in classes),
            *(pa.field(name, pa.string()) for name in FIXED_TAIL),
            pa.field("geometry", pa.binary(), nullable=False),
            pa.field("bbox", pa.struct(corners), nullable=False),
        ]
    )


def _geo_metadata(bbox: Sequence[float] | None) -> str:
    """The ``geo`` key of GeoParquet 1.1.0. No ``crs``: that means OGC:CRS84 (lon/lat), which
    is what the footprints are. The file's ``bbox`` is optional and left out when empty."""
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": ["Polygon"],
        "orientation": "counterclockwise",
        "covering": {"bbox": {name: ["bbox", name] for name in _BBOX_FIELDS}},
    }
    if bbox is not None:
        column["bbox"] = list(bbox)
    return json.dumps(
        {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}},
        allow_nan=False,
    )


def _footprints(pa: Any, west: Any, south: Any, east: Any, north: Any) -> tuple[Any, Any]:
    """Tile footprints as WKB polygons, the ring of :func:`tile_polygon` (counter-clockwise,
    from the south-west corner) but unrounded, and their bbox covering; vectorised."""
    import numpy as np
    import shapely

    rings = np.column_stack([west, south, east, south, east, north, west, north, west, south])
    wkb = shapely.to_wkb(shapely.polygons(rings.reshape(-1, 5, 2)))
    corners = [pa.array(values, pa.float64()) for values in (west, south, east, north)]
    bbox = pa.StructArray.from_arrays(
        corners, fields=[pa.field(name, pa.float64(), nullable=False) for name in _BBOX_FIELDS]
    )
    return pa.array(wkb, pa.binary()), bbox


def _parquet_batch(
    pa: Any, schema: Any, rows: Iterator[ResultRow], classes: Sequence[str], size: int
) -> tuple[Any, tuple[float, float, float, float]] | None:
    """The next row group's record batch (up to ``size`` rows) and the bounds of its
    footprints; None when ``rows`` is done. Values go straight into column lists and the
    rows are not kept: a row group's Python objects are most of the writer's memory."""
    import numpy as np

    # The CSV's columns, then the footprints' west, south, east and north.
    columns: list[list[Any]] = [[] for _ in range(len(schema) - len(GEOMETRY_COLUMNS) + 4)]
    appends = [column.append for column in columns]
    for row in itertools.islice(rows, size):
        head, class_values = _row_values(row, classes)
        tail = (row.model_name, row.model_version, row.error)
        values = (*head, *class_values, *tail, *mercantile.bounds(row.x, row.y, row.z))
        for append, value in zip(appends, values, strict=True):
            append(value)
    if not columns[0]:
        return None
    corners = [np.asarray(values, dtype=np.float64) for values in columns[-4:]]
    geometry, bbox = _footprints(pa, *corners)
    fields = list(schema)[: -len(GEOMETRY_COLUMNS)]
    arrays = [pa.array(values, f.type) for values, f in zip(columns[:-4], fields, strict=True)]
    batch = pa.RecordBatch.from_arrays([*arrays, geometry, bbox], schema=schema)
    west, south, east, north = corners
    return batch, (float(west.min()), float(south.min()), float(east.max()), float(north.max()))


def _union(
    a: tuple[float, float, float, float], b: tuple[float, float, float, float]
) -> tuple[float, float, float, float]:
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def write_geoparquet(
    rows: Iterable[ResultRow],
    out: BinaryIO | PathLike,
    classes: Sequence[str],
    *,
    batch_rows: int = GEOPARQUET_BATCH_ROWS,
) -> int:
    """Write rows as GeoParquet 1.1 (zstd), ``batch_rows`` rows a row group, so memory stays
    flat however many rows come; return how many rows were written.

    The ``geo`` metadata's bbox is known only after the last row, so it is added to the
    footer just before the footer is written. The Arrow schema is not stored in the file:
    pyarrow (and the GeoParquet readers built on it) takes a file's metadata from a stored
    schema, which is fixed when the writer opens, before the bbox is known; without one it
    reads the footer's. Every column here is a plain Parquet type and reads back the same.
    """
    pa, pq = require_pyarrow()
    classes = _check_classes(classes, reserved=GEOMETRY_COLUMNS)
    if batch_rows < 1:
        raise ExportError(f"batch_rows must be at least 1, not {batch_rows}")
    schema = _geoparquet_schema(pa, classes)
    rows = iter(rows)
    count = 0
    extent: tuple[float, float, float, float] | None = None
    with (
        _opened(out, binary=True) as handle,
        pq.ParquetWriter(handle, schema, compression="zstd", store_schema=False) as writer,
    ):
        while made := _parquet_batch(pa, schema, rows, classes, batch_rows):
            batch, bounds = made
            writer.write_batch(batch, row_group_size=batch_rows)
            count += batch.num_rows
            extent = bounds if extent is None else _union(extent, bounds)
        writer.add_key_value_metadata({"geo": _geo_metadata(extent)})
    return count


# -- files ---------------------------------------------------------------------------------


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


_WRITERS = {"csv": write_csv, "geojson": write_geojson, "geoparquet": write_geoparquet}


# -- reading CSV back (convert-geojson) ------------------------------------------------------


def _parse_float(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ExportError(f"{text!r} is not a score") from None


def read_csv_rows(
    csv_in: TextIO | PathLike, *, tms: bool = False, classes: Sequence[str] = ()
) -> tuple[list[str], Iterator[ResultRow]]:
    """Read a results CSV: this project's format or chip-n-scale's ``tile,output``.

    Returns the class names and a stream of rows. In chip-n-scale's format the tile is
    ``x-y-z`` (``tms=True`` flips y from TMS numbering, as its convert script assumed) and the
    output a JSON list of scores (named by ``classes``, else ``p0, p1, ...``) or object.
    """
    if isinstance(csv_in, str | os.PathLike):
        name = os.fspath(csv_in)
        try:
            # Closed by the row generator when it ends (the rows outlive this call).
            handle: TextIO = open(csv_in, encoding="utf-8", newline="")  # noqa: SIM115
        except OSError as exc:
            raise ExportError(f"Cannot read {name!r}: {exc.strerror}") from None
        owned = True
    else:
        name, handle, owned = getattr(csv_in, "name", "<csv>"), csv_in, False
    reader = csv.reader(handle)
    try:
        header = next(reader)
    except StopIteration:
        if owned:
            handle.close()
        raise ExportError(f"{name!r} is empty: expected a results CSV") from None
    except csv.Error as exc:
        if owned:
            handle.close()
        raise ExportError(f"{name!r} is not a CSV: {exc}") from None
    header = [from_spreadsheet_text(h.strip()) for h in header]
    if all(col in header for col in (*FIXED_HEAD, *FIXED_TAIL)):
        start, end = header.index("status") + 1, header.index("model_name")
        found = header[start:end]
        return found, _ours(reader, header, found, name, handle if owned else None)
    if header[:1] == ["tile"] or (header and _looks_like_tile(header[0])):
        first = None if header[:1] == ["tile"] else header
        rows = _chip_n_scale(reader, first, tms, classes, name, handle if owned else None)
        peeked = next(rows, None)
        found = list(classes)
        if peeked is not None:
            found += [n for n in scores_of(peeked.output, classes) if n not in found]

        def chained() -> Iterator[ResultRow]:
            if peeked is not None:
                yield peeked
                yield from rows

        return found, chained()
    if owned:
        handle.close()
    raise ExportError(
        f"{name!r} is not a results CSV: expected a header with "
        f"{', '.join(FIXED_HEAD)} or chip-n-scale's tile,output"
    )


def _looks_like_tile(text: str) -> bool:
    parts = text.split("-")
    return len(parts) == 3 and all(p.strip().isdigit() for p in parts)


def _ours(
    reader: Iterator[list[str]],
    header: list[str],
    classes: list[str],
    name: str,
    owned: TextIO | None,
) -> Iterator[ResultRow]:
    index = {col: i for i, col in enumerate(header)}
    try:
        for number, values in enumerate(reader, start=2):
            if not values:
                continue
            try:
                scores = {}
                for cls in classes:
                    value = _parse_float(values[index[cls]])
                    if value is not None:
                        scores[cls] = value
                status = values[index["status"]]
                tile = make_tile(
                    int(values[index["x"]]), int(values[index["y"]]), int(values[index["z"]])
                )
                yield ResultRow(
                    job=from_spreadsheet_text(values[index["job"]]),
                    z=tile.z,
                    x=tile.x,
                    y=tile.y,
                    status=status,  # type: ignore[arg-type]
                    output=scores if status == "ok" else None,
                    error=from_spreadsheet_text(values[index["error"]]) or None,
                    model_name=from_spreadsheet_text(values[index["model_name"]]) or None,
                    model_version=from_spreadsheet_text(values[index["model_version"]]) or None,
                    attempts=0,
                    created_at="",
                    updated_at="",
                )
            except (IndexError, ValueError) as exc:
                raise ExportError(f"{name}, line {number}: {exc}") from None
    finally:
        if owned is not None:
            owned.close()


def _chip_n_scale(
    reader: Iterator[list[str]],
    first: list[str] | None,
    tms: bool,
    classes: Sequence[str],
    name: str,
    owned: TextIO | None,
) -> Iterator[ResultRow]:
    def lines() -> Iterator[tuple[int, list[str]]]:
        if first is not None:
            yield 1, first
        yield from enumerate(reader, start=2)

    try:
        for number, values in lines():
            if not values:
                continue
            try:
                x, y, z = (int(v) for v in values[0].strip().split("-"))
                if tms:
                    y = (1 << z) - 1 - y
                tile = make_tile(x, y, z)
                # chip-n-scale's download wrote the JSON unquoted: its commas split columns.
                output = json.loads(",".join(values[1:]))
            except (ValueError, IndexError) as exc:
                raise ExportError(f"{name}, line {number}: {exc}") from None
            scores = scores_of(output, classes)
            yield ResultRow(
                job="",
                z=tile.z,
                x=tile.x,
                y=tile.y,
                status="ok",
                output=scores,
                error=None,
                model_name=None,
                model_version=None,
                attempts=0,
                created_at="",
                updated_at="",
            )
    finally:
        if owned is not None:
            owned.close()


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
