"""Results as an RFC 7946 GeoJSON FeatureCollection, one feature a line, streamed."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

import mercantile

from chipscale.results.export_rows import (
    FIXED_HEAD,
    PathLike,
    check_classes,
    open_output,
    row_values,
)
from chipscale.values import ResultRow

#: Decimal places of GeoJSON coordinates: 1e-7 degrees is about 1 cm.
COORD_PRECISION = 7


def tile_polygon(z: int, x: int, y: int) -> dict[str, Any]:
    """A tile's footprint as a GeoJSON Polygon in lon/lat, exterior ring counter-clockwise
    (RFC 7946), coordinates rounded to :data:`COORD_PRECISION` decimals."""
    west, south, east, north = (
        round(v, COORD_PRECISION) for v in mercantile.bounds(mercantile.Tile(x, y, z))
    )
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    return {"type": "Polygon", "coordinates": [ring]}


def write_geojson(
    rows: Iterable[ResultRow],
    out: TextIO | PathLike,
    classes: Sequence[str],
    *,
    assets: bool = False,
) -> int:
    """Write rows as an RFC 7946 FeatureCollection, one feature a line, streamed; return how
    many features were written. ``assets``: add each tile's ``assets`` (a list of ids)."""
    classes = check_classes(classes)
    count = 0
    with open_output(out) as handle:
        handle.write('{"type": "FeatureCollection", "features": [\n')
        for row in rows:
            head, class_values = row_values(row, classes)
            properties = dict(zip(FIXED_HEAD, head, strict=True))
            properties.update(zip(classes, class_values, strict=True))
            properties.update(
                model_name=row.model_name, model_version=row.model_version, error=row.error
            )
            if assets:
                properties["assets"] = list(row.assets)
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
