"""A segmentation job's merged regions as vector features: GeoJSON (RFC 7946), GeoParquet 1.1
and FlatGeobuf (through GDAL's OGR, by pyogrio), with ``class``, ``area_m2`` and ``tiles``.

Regions come from :func:`~chipscale.results.feature_merge.merge_regions`, streamed; pixels go
to lon/lat through web mercator with the zoom's exact formulas. ``area_m2`` is the true area
on the WGS 84 ellipsoid, exact for pixel regions (see :func:`area_m2`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import shapely
from shapely.geometry import Polygon

from chipscale.extras import missing_message
from chipscale.results.base import ResultStore
from chipscale.results.export_rows import ExportError, PathLike, open_output
from chipscale.results.feature_merge import Region, merge_regions

__all__ = [
    "FEATURE_FORMATS",
    "Feature",
    "area_m2",
    "areas_m2",
    "export_features",
    "features_of",
    "to_lonlat",
    "write_features",
]

#: WGS 84: semi-major axis (m) and first eccentricity squared.
WGS84_A = 6378137.0
WGS84_E2 = 0.0066943799901413165
#: Decimal places of GeoJSON coordinates (as the tile export: 1e-7 degrees, about 1 cm).
COORD_PRECISION = 7
#: Features per GeoParquet row group / Arrow batch to GDAL.
BATCH_FEATURES = 10_000
#: The formats a features export writes.
FEATURE_FORMATS = ("geojson", "geoparquet", "flatgeobuf")


class Feature(NamedTuple):
    """A region ready to write: class, ground area, tiles spanned, lon/lat polygon (exterior
    counter-clockwise)."""

    cls: str
    area_m2: float
    tiles: int
    polygon: Polygon


def _world(z: int, size: int) -> float:
    return float(2**z * size)


def _lonlat_coords(xy: np.ndarray, world: float) -> np.ndarray:
    lon = xy[:, 0] / world * 360.0 - 180.0
    lat = np.degrees(np.arctan(np.sinh(np.pi * (1.0 - 2.0 * xy[:, 1] / world))))
    return np.column_stack([lon, lat])


def to_lonlat(polygon: Any, z: int, size: int) -> Any:
    """Polygon(s) in global pixel coordinates of zoom ``z`` (tiles of ``size`` pixels) in
    lon/lat degrees (EPSG:4326 axis order lon, lat), exteriors counter-clockwise (RFC 7946);
    an array of polygons is converted in one vectorised pass."""
    world = _world(z, size)
    moved = shapely.transform(polygon, lambda xy: _lonlat_coords(xy, world))
    return shapely.orient_polygons(moved, exterior_cw=False)


def _zone(phi: np.ndarray) -> np.ndarray:
    """Area on the WGS 84 ellipsoid between the equator and latitude ``phi`` (radians), per
    radian of longitude: ``a² q(φ) / 2`` with ``q`` the authalic function."""
    e = math.sqrt(WGS84_E2)
    s = np.sin(phi)
    q = (1 - WGS84_E2) * (s / (1 - WGS84_E2 * s * s) + np.arctanh(e * s) / e)
    return WGS84_A * WGS84_A * q / 2


def areas_m2(polygons: np.ndarray, z: int, size: int) -> np.ndarray:
    """True ground areas (m²) on the WGS 84 ellipsoid of polygons in global pixel coordinates.

    A pixel region's edges are all rows or columns of the web-mercator grid, that is parallels
    and meridians; a region bounded by those has the exact area ``Σ Δλ · zone(φ)`` over its
    parallel edges (meridian edges add nothing), ``zone`` being the ellipsoid's area from the
    equator per radian of longitude. No geodesic-edge approximation, no dependency;
    vectorised over every ring of every polygon.
    """
    world = _world(z, size)
    rings, owner = shapely.get_rings(polygons, return_index=True)
    exterior = np.ones(len(rings), dtype=bool)
    exterior[1:] = owner[1:] != owner[:-1]
    xy, ring = shapely.get_coordinates(rings, return_index=True)
    flat = (ring[:-1] == ring[1:]) & (xy[:-1, 1] == xy[1:, 1])
    dx = (xy[1:, 0] - xy[:-1, 0])[flat]
    phi = np.arctan(np.sinh(np.pi * (1.0 - 2.0 * xy[:-1, 1][flat] / world)))
    per_ring = np.abs(
        np.bincount(
            ring[:-1][flat], weights=dx * 2 * np.pi / world * _zone(phi), minlength=len(rings)
        )
    )
    signed = np.where(exterior, per_ring, -per_ring)
    return np.bincount(owner, weights=signed, minlength=len(polygons))


def area_m2(polygon: Polygon, z: int, size: int) -> float:
    """One polygon's ground area (:func:`areas_m2`)."""
    return float(areas_m2(np.array([polygon], dtype=object), z, size)[0])


def features_of(regions: Iterable[Region], *, batch: int = 4096) -> Iterator[Feature]:
    """Each region as a feature: lon/lat polygon, class, ground area and tile count,
    converted ``batch`` regions at a time (vectorised)."""
    iterator = iter(regions)
    while chunk := [r for _, r in zip(range(batch), iterator, strict=False)]:
        groups: dict[tuple[int, int], list[Region]] = {}
        for region in chunk:
            groups.setdefault((region.z, region.size), []).append(region)
        for (z, size), group in groups.items():
            geoms = np.array([r.polygon for r in group], dtype=object)
            areas = areas_m2(geoms, z, size).tolist()
            lonlat = to_lonlat(geoms, z, size).tolist()
            for region, area, polygon in zip(group, areas, lonlat, strict=True):
                yield Feature(region.cls, area, region.tiles, polygon)


def write_features_geojson(
    features: Iterable[Feature],
    out: IO[Any] | PathLike,
    *,
    precision: int | None = COORD_PRECISION,
    batch: int = 4096,
) -> int:
    """An RFC 7946 FeatureCollection, one feature a line, streamed; returns the count.
    ``precision=None`` keeps every digit (for a later conversion)."""
    count = 0
    iterator = iter(features)
    with open_output(out) as handle:
        handle.write('{"type": "FeatureCollection", "features": [\n')
        while chunk := [f for _, f in zip(range(batch), iterator, strict=False)]:
            geoms = np.array([f.polygon for f in chunk], dtype=object)
            if precision is not None:
                geoms = shapely.transform(geoms, lambda xy: np.round(xy, precision))
            lines = []
            for feature, geometry in zip(chunk, shapely.to_geojson(geoms).tolist(), strict=True):
                props = json.dumps(
                    {
                        "class": feature.cls,
                        "area_m2": round(feature.area_m2, 3),
                        "tiles": feature.tiles,
                    },
                    separators=(",", ":"),
                )
                lines.append(f'{{"type":"Feature","geometry":{geometry},"properties":{props}}}')
            handle.write((",\n" if count else "") + ",\n".join(lines))
            count += len(chunk)
        handle.write("\n]}\n")
    return count


def read_features_geojson(path: PathLike) -> Iterator[Feature]:
    """Features back from :func:`write_features_geojson`'s one-feature-a-line layout, streamed
    (the ``--stack`` export converted here to GeoParquet or FlatGeobuf)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip().rstrip(",")
            if not line.startswith('{"type":"Feature"'):
                continue
            record = json.loads(line)
            props = record["properties"]
            rings = record["geometry"]["coordinates"]
            yield Feature(
                props["class"], props["area_m2"], props["tiles"], Polygon(rings[0], rings[1:])
            )


def _arrow_batches(pa: Any, features: Iterable[Feature], size: int) -> Iterator[Any]:
    """Record batches of ``size`` features: class, area_m2, tiles, WKB geometry, bbox."""
    schema = _arrow_schema(pa)
    iterator = iter(features)
    while batch := [f for _, f in zip(range(size), iterator, strict=False)]:
        geoms = np.array([f.polygon for f in batch], dtype=object)
        bounds = shapely.bounds(geoms)
        bbox = pa.StructArray.from_arrays(
            [pa.array(bounds[:, i], pa.float64()) for i in range(4)],
            fields=list(schema.field("bbox").type),
        )
        yield pa.RecordBatch.from_arrays(
            [
                pa.array([f.cls for f in batch], pa.string()),
                pa.array([f.area_m2 for f in batch], pa.float64()),
                pa.array([f.tiles for f in batch], pa.int32()),
                pa.array(shapely.to_wkb(geoms), pa.binary()),
                bbox,
            ],
            schema=schema,
        )


def _arrow_schema(pa: Any) -> Any:
    corners = [pa.field(n, pa.float64(), nullable=False) for n in ("xmin", "ymin", "xmax", "ymax")]
    return pa.schema(
        [
            pa.field("class", pa.string(), nullable=False),
            pa.field("area_m2", pa.float64(), nullable=False),
            pa.field("tiles", pa.int32(), nullable=False),
            pa.field("geometry", pa.binary(), nullable=False),
            pa.field("bbox", pa.struct(corners), nullable=False),
        ]
    )


def write_features_geoparquet(
    features: Iterable[Feature], out: IO[Any] | PathLike, *, batch: int = BATCH_FEATURES
) -> int:
    """GeoParquet 1.1 (zstd, WKB, bbox covering, no ``crs``: OGC:CRS84), ``batch`` features a
    row group; returns the count."""
    from chipscale.results.export_geoparquet import require_pyarrow

    pa, pq = require_pyarrow()
    count = 0
    extent: list[float] | None = None
    with (
        open_output(out, binary=True) as handle,
        pq.ParquetWriter(handle, _arrow_schema(pa), compression="zstd", store_schema=False) as w,
    ):
        for record in _arrow_batches(pa, features, batch):
            w.write_batch(record, row_group_size=batch)
            count += record.num_rows
            box = record.column("bbox").flatten()
            mins = [float(np.min(box[i])) for i in (0, 1)]
            maxs = [float(np.max(box[i])) for i in (2, 3)]
            extent = (
                [*mins, *maxs]
                if extent is None
                else [*map(min, extent[:2], mins), *map(max, extent[2:], maxs)]
            )
        column: dict[str, Any] = {
            "encoding": "WKB",
            "geometry_types": ["Polygon"],
            "orientation": "counterclockwise",
            "covering": {"bbox": {n: ["bbox", n] for n in ("xmin", "ymin", "xmax", "ymax")}},
        }
        if extent is not None:
            column["bbox"] = extent
        meta = {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}
        w.add_key_value_metadata({"geo": json.dumps(meta)})
    return count


def write_features_flatgeobuf(
    features: Iterable[Feature], out: PathLike, *, batch: int = BATCH_FEATURES
) -> int:
    """FlatGeobuf (EPSG:4326, lon/lat, packed R-tree index) through GDAL's OGR driver by
    pyogrio, fed Arrow batches so memory stays flat; written atomically."""
    from chipscale.results.export_geoparquet import require_pyarrow

    pa, _ = require_pyarrow()
    try:
        import pyogrio.raw  # type: ignore[import-untyped]
    except ImportError:
        raise ExportError(missing_message("pyogrio", "FlatGeobuf export")) from None
    counted = [0]

    def counting() -> Iterator[Any]:
        for record in _arrow_batches(pa, features, batch):
            counted[0] += record.num_rows
            yield record.drop_columns(["bbox"])

    schema = _arrow_schema(pa)
    reader = pa.RecordBatchReader.from_batches(
        schema.remove(schema.get_field_index("bbox")), counting()
    )
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part.fgb")
    try:
        pyogrio.raw.write_arrow(
            reader,
            str(tmp),
            layer=target.stem,
            driver="FlatGeobuf",
            geometry_name="geometry",
            geometry_type="Polygon",
            crs="EPSG:4326",
        )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return counted[0]


def write_features(
    features: Iterable[Feature],
    path: PathLike,
    fmt: str,
    *,
    precision: int | None = COORD_PRECISION,
) -> int:
    """Write features to ``path`` in ``fmt`` (one of :data:`FEATURE_FORMATS`); ``precision``:
    decimals of GeoJSON coordinates (None: every digit)."""
    if fmt == "geojson":
        return write_features_geojson(features, path, precision=precision)
    if fmt == "geoparquet":
        return write_features_geoparquet(features, path)
    if fmt == "flatgeobuf":
        return write_features_flatgeobuf(features, path)
    raise ExportError(
        f"features are written as GeoJSON, GeoParquet or FlatGeobuf, not {fmt}: "
        "name the file *.geojson, *.parquet or *.fgb (or --layer tiles)"
    )


def export_features(
    store: ResultStore,
    job: str,
    path: PathLike,
    fmt: str,
    *,
    classes: Sequence[str] | None = None,
    precision: int | None = COORD_PRECISION,
) -> int:
    """Merge a job's stored regions (background left out; only ``classes`` when given) and
    write them to ``path``; returns how many features were written."""
    if fmt not in FEATURE_FORMATS:
        write_features((), path, fmt)  # raises the one-line error
    rows = store.iter_features(job, classes=classes, background=False)
    return write_features(features_of(merge_regions(rows)), path, fmt, precision=precision)
