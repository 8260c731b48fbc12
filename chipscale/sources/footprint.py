"""Where a raster source lies: its lon/lat footprint (bounds, or a geometry with curved edges)
and the tiles that cover it, with an AOI or a bbox."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from mercantile import Tile
from rasterio.warp import transform_geom
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from chipscale.errors import SourceError
from chipscale.grid import cover as grid_cover
from chipscale.grid.cover import WGS84, WORLD, BBox, lonlat_area
from chipscale.sources.datasets import footprint_lonlat, open_dataset
from chipscale.sources.gdal_env import gdal_env


def source_footprint_lonlat(source: str | os.PathLike[str]) -> tuple[float, float, float, float]:
    """The source's footprint ``(west, south, east, north)`` in EPSG:4326.

    Densified, so a curved edge of a projected raster is not cut off; ``west > east`` when the
    footprint crosses the antimeridian (split it there before computing a tile cover).
    """
    with gdal_env(source), open_dataset(source) as dataset:
        return footprint_lonlat(dataset)


def source_footprint(source: str) -> BaseGeometry:
    """The lon/lat footprint of a raster: its bounds ring, densified and reprojected.

    Reprojecting the ring (not just the corners) keeps the curved edges of a UTM or polar
    image, and GDAL cuts it at the antimeridian.
    """
    with gdal_env(source), open_dataset(source) as dataset:
        if dataset.crs is None:
            raise SourceError(f"raster {source} has no coordinate reference system")
        crs, (west, south, east, north) = dataset.crs, dataset.bounds
    ring = _densified_ring(west, south, east, north, steps=64)
    geom = {"type": "Polygon", "coordinates": [ring]}
    if crs != WGS84:
        geom = transform_geom(crs, WGS84, geom, antimeridian_cutting=True, precision=-1)
    footprint = lonlat_area(shape(geom)).intersection(WORLD)
    if footprint.is_empty:
        raise SourceError(f"Source {source!r} lies outside the web-mercator world")
    return footprint


def _densified_ring(
    west: float, south: float, east: float, north: float, steps: int
) -> list[tuple[float, float]]:
    def edge(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
        return [(x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps) for i in range(steps)]

    ring = (
        edge(west, south, east, south)
        + edge(east, south, east, north)
        + edge(east, north, west, north)
        + edge(west, north, west, south)
    )
    return [*ring, ring[0]]


def cover(
    zoom: int,
    *,
    source: str | None = None,
    aoi: str | Path | BaseGeometry | None = None,
    bbox: BBox | None = None,
) -> Iterator[Tile]:
    """Tiles at ``zoom`` of a source footprint, an AOI, a bbox, or their intersection: the
    source's footprint handed to :func:`chipscale.grid.cover.cover`."""
    footprint = None if source is None else (f"source {source!r}", source_footprint(source))
    return grid_cover.cover(zoom, footprint=footprint, aoi=aoi, bbox=bbox)
