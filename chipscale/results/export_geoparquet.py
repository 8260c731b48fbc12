"""Results as GeoParquet 1.1 (zstd), one row group at a time: the CSV's columns, typed, then
each tile's footprint (WKB) and its bbox covering. pyarrow, an extra, is imported only here,
only when GeoParquet is asked for."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, BinaryIO

import mercantile

from chipscale.extras import missing_message
from chipscale.results.export_rows import (
    ASSETS_COLUMN,
    FIXED_TAIL,
    ExportError,
    PathLike,
    check_classes,
    open_output,
    row_values,
)
from chipscale.values import ResultRow

#: Rows per GeoParquet row group: what the writer holds in memory at once, and the unit a
#: reader skips by the bbox column's statistics. A million-row ``chipscale download`` from
#: PostgreSQL peaks at 177 MB with 10,000 (bench/push.py; CSV 58 MB), most of it imports:
#: pyarrow, and pandas, which pyarrow imports on its first array wherever it is installed
#: (about 50 MB, once). With 50,000 a row group the peak was 250 MB.
GEOPARQUET_BATCH_ROWS = 10_000
#: GeoParquet's own columns, after the CSV's.
GEOMETRY_COLUMNS = ("geometry", "bbox")
_BBOX_FIELDS = ("xmin", "ymin", "xmax", "ymax")


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


def _geoparquet_schema(pa: Any, classes: Sequence[str], assets: bool = False) -> Any:
    """The CSV's columns with real types, then the footprint and its bbox covering. Fixed
    columns are required (never null); scores and the tail are nullable, as blank in CSV.
    ``assets``: a mosaic's provenance column, a list of asset ids."""
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
            *([pa.field(ASSETS_COLUMN, pa.list_(pa.string()), nullable=False)] if assets else []),
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
    """Tile footprints as WKB polygons, the ring of
    :func:`~chipscale.results.export_geojson.tile_polygon` (counter-clockwise,
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
        head, class_values = row_values(row, classes)
        tail: tuple[Any, ...] = (row.model_name, row.model_version, row.error)
        if ASSETS_COLUMN in schema.names:
            tail = (*tail, list(row.assets))
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
    assets: bool = False,
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
    classes = check_classes(classes, reserved=GEOMETRY_COLUMNS)
    if batch_rows < 1:
        raise ExportError(f"batch_rows must be at least 1, not {batch_rows}")
    schema = _geoparquet_schema(pa, classes, assets)
    rows = iter(rows)
    count = 0
    extent: tuple[float, float, float, float] | None = None
    with (
        open_output(out, binary=True) as handle,
        pq.ParquetWriter(handle, schema, compression="zstd", store_schema=False) as writer,
    ):
        while made := _parquet_batch(pa, schema, rows, classes, batch_rows):
            batch, bounds = made
            writer.write_batch(batch, row_group_size=batch_rows)
            count += batch.num_rows
            extent = bounds if extent is None else _union(extent, bounds)
        writer.add_key_value_metadata({"geo": _geo_metadata(extent)})
    return count
