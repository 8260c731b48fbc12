"""Which tiles an area touches.

The cover walks the grid hierarchically: parent tiles a few zooms up are tested against the
area first, so a parent wholly inside yields all its children without a test each, and
the tiles come out in quadkey (Z-curve) order, grouped by ancestor at every level. That
order is what :mod:`chipscale.packs` needs to stream adjacent tiles into packs without
holding the whole cover in memory.

Areas are shapely geometries in lon/lat (EPSG:4326). One that crosses the antimeridian is
cut at +-180 (RFC 7946), so each piece covers its own side of the grid.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mercantile
from mercantile import Tile
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.warp import transform_geom
from shapely import prepared
from shapely.geometry import MultiPolygon, Polygon, box, shape
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from chipscale.errors import AOIError, SourceError
from chipscale.gdal_env import gdal_env
from chipscale.tilelist import MAX_ZOOM
from chipscale.tiles import open_source

#: Web mercator stops short of the poles.
MAX_LAT = 85.0511287798066
WORLD = box(-180.0, -MAX_LAT, 180.0, MAX_LAT)
WGS84 = CRS.from_epsg(4326)

#: Zooms between a parent and its children in the hierarchical walk: 3 means parents of 64.
PARENT_LEVELS = 3

BBox = tuple[float, float, float, float]


def parse_bbox(text: str) -> BBox:
    """Parse ``W,S,E,N`` in degrees; ``W > E`` means the box crosses the antimeridian.

    >>> parse_bbox("179,-1,-179,1")
    (179.0, -1.0, -179.0, 1.0)
    """
    try:
        west, south, east, north = (float(v) for v in text.split(","))
    except ValueError:
        raise AOIError(f"bbox {text!r} is not four numbers W,S,E,N") from None
    if not (-180 <= west <= 180 and -180 <= east <= 180):
        raise AOIError(f"bbox {text!r}: longitudes must be within -180..180")
    if not (-90 <= south < north <= 90):
        raise AOIError(f"bbox {text!r}: latitudes must be within -90..90 with S < N")
    return west, south, east, north


def bbox_geometry(bbox: BBox) -> BaseGeometry:
    """A lon/lat geometry for a bbox, cut in two when it crosses the antimeridian."""
    west, south, east, north = bbox
    if west > east:
        return MultiPolygon([box(west, south, 180.0, north), box(-180.0, south, east, north)])
    return box(west, south, east, north)


def read_aoi(path: str | Path) -> BaseGeometry:
    """Read a GeoJSON area (geometry, Feature or FeatureCollection) as one lon/lat geometry.

    Coordinates are EPSG:4326 unless the file declares another CRS with the (pre-RFC 7946)
    ``crs`` member, e.g. ``{"type": "name", "properties": {"name": "EPSG:3857"}}``.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AOIError(f"Cannot read AOI {str(path)!r}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AOIError(f"AOI {str(path)!r} is not GeoJSON: {exc}") from None
    if not isinstance(doc, dict):
        raise AOIError(f"AOI {str(path)!r} is not a GeoJSON object")
    geometries = list(_geometries(doc, str(path)))
    polygons = [g for g in geometries if g.get("type") in ("Polygon", "MultiPolygon")]
    if not polygons:
        raise AOIError(f"AOI {str(path)!r} has no Polygon or MultiPolygon")
    crs = _declared_crs(doc, str(path))
    parts = []
    for geom in polygons:
        if crs != WGS84:
            geom = transform_geom(crs, WGS84, geom, antimeridian_cutting=True)
        try:
            parts.append(_lonlat_shape(geom))
        except (ValueError, TypeError, AttributeError) as exc:
            raise AOIError(f"AOI {str(path)!r} has an invalid geometry: {exc}") from None
    area = unary_union(parts).intersection(WORLD)
    if area.is_empty:
        raise AOIError(f"AOI {str(path)!r} is empty inside the web-mercator world")
    return area


def _geometries(doc: dict, name: str) -> Iterator[dict]:
    kind = doc.get("type")
    if kind == "FeatureCollection":
        for feature in doc.get("features") or []:
            yield from _geometries(feature, name)
    elif kind == "Feature":
        if doc.get("geometry"):
            yield from _geometries(doc["geometry"], name)
    elif kind == "GeometryCollection":
        for geom in doc.get("geometries") or []:
            yield from _geometries(geom, name)
    elif kind in (
        "Polygon",
        "MultiPolygon",
        "Point",
        "MultiPoint",
        "LineString",
        "MultiLineString",
    ):
        yield doc
    else:
        raise AOIError(f"AOI {name!r}: unknown GeoJSON type {kind!r}")


def _declared_crs(doc: dict, name: str) -> CRS:
    crs_member = doc.get("crs")
    if not crs_member:
        return WGS84
    try:
        crs_name = crs_member["properties"]["name"]
        return CRS.from_user_input(crs_name.replace("urn:ogc:def:crs:", "").replace("::", ":"))
    except (KeyError, TypeError, CRSError) as exc:
        raise AOIError(f"AOI {name!r}: cannot understand its crs member ({exc})") from None


def _lonlat_shape(geom: dict) -> BaseGeometry:
    """A shapely geometry from lon/lat GeoJSON, with a ring that wraps past 180 unwrapped."""
    result = shape(geom)
    if not result.is_valid:
        result = result.buffer(0)
    west, _, east, _ = result.bounds
    if east > 180 or west < -180:
        # A ring written continuously across the antimeridian (e.g. 179 .. 181): split it.
        result = unary_union(
            [
                result.intersection(box(-180, -90, 180, 90)),
                _shift(result.intersection(box(180, -90, 540, 90)), -360),
                _shift(result.intersection(box(-540, -90, -180, 90)), 360),
            ]
        )
    return result


def _shift(geom: BaseGeometry, dx: float) -> BaseGeometry:
    from shapely.affinity import translate

    return translate(geom, xoff=dx)


def source_footprint(source: str) -> BaseGeometry:
    """The lon/lat footprint of a raster: its bounds ring, densified and reprojected.

    Reprojecting the ring (not just the corners) keeps the curved edges of a UTM or polar
    image, and GDAL cuts it at the antimeridian.
    """
    with gdal_env(source), open_source(source) as dataset:
        if dataset.crs is None:
            raise SourceError(f"raster {source} has no coordinate reference system")
        crs, (west, south, east, north) = dataset.crs, dataset.bounds
    ring = _densified_ring(west, south, east, north, steps=64)
    geom = {"type": "Polygon", "coordinates": [ring]}
    if crs != WGS84:
        geom = transform_geom(crs, WGS84, geom, antimeridian_cutting=True, precision=-1)
    footprint = _lonlat_shape(geom).intersection(WORLD)
    if footprint.is_empty:
        raise SourceError(f"Source {source!r} lies outside the web-mercator world")
    return footprint


def _densified_ring(west: float, south: float, east: float, north: float, steps: int):
    def edge(x0: float, y0: float, x1: float, y1: float):
        return [(x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps) for i in range(steps)]

    ring = (
        edge(west, south, east, south)
        + edge(east, south, east, north)
        + edge(east, north, west, north)
        + edge(west, north, west, south)
    )
    return [*ring, ring[0]]


def cover_geometry(area: BaseGeometry, zoom: int) -> Iterator[Tile]:
    """Yield each tile at ``zoom`` whose area overlaps ``area`` (lon/lat), grouped by parent.

    A tile that only shares an edge or a corner with the area is left out: an image aligned
    on the grid does not drag in a ring of empty neighbours.
    """
    if not 0 <= zoom <= MAX_ZOOM:
        raise AOIError(f"zoom {zoom} is outside 0..{MAX_ZOOM}")
    area = area.intersection(WORLD)
    if area.is_empty:
        return
    target = prepared.prep(area)
    parent_zoom = max(0, zoom - PARENT_LEVELS)
    seen: set[Tile] = set()
    pieces = list(area.geoms) if hasattr(area, "geoms") else [area]
    for piece in pieces:
        west, south, east, north = piece.bounds
        parents = sorted(mercantile.tiles(west, south, east, north, parent_zoom), key=_zorder)
        for parent in parents:
            if parent in seen:
                continue
            seen.add(parent)
            parent_box = _tile_box(parent)
            if not _overlaps(target, parent_box):
                continue
            children = _children(parent, zoom)
            if target.contains(parent_box):
                yield from children
            else:
                yield from (t for t in children if _overlaps(target, _tile_box(t)))


def cover_bbox(bbox: BBox, zoom: int) -> Iterator[Tile]:
    """Yield the tiles a W,S,E,N box touches; antimeridian-safe (``W > E``)."""
    yield from cover_geometry(bbox_geometry(bbox), zoom)


def cover(
    zoom: int,
    *,
    source: str | None = None,
    aoi: str | Path | BaseGeometry | None = None,
    bbox: BBox | None = None,
) -> Iterator[Tile]:
    """Tiles at ``zoom`` of a source footprint, an AOI, a bbox, or their intersection.

    Raises :class:`AOIError` when the areas given do not overlap (e.g. an AOI that misses
    the image): an empty job is almost always a mistake worth a clear message.
    """
    areas: list[tuple[str, BaseGeometry]] = []
    if source is not None:
        areas.append((f"source {source!r}", source_footprint(source)))
    if aoi is not None:
        geom = aoi if isinstance(aoi, BaseGeometry) else read_aoi(aoi)
        areas.append((f"AOI {str(aoi)!r}" if not isinstance(aoi, BaseGeometry) else "AOI", geom))
    if bbox is not None:
        areas.append((f"bbox {','.join(map(str, bbox))}", bbox_geometry(bbox)))
    if not areas:
        raise AOIError("Nothing to cover: give a source, an AOI or a bbox")
    area = areas[0][1]
    for _, other in areas[1:]:
        area = area.intersection(other)
    if area.is_empty or area.area == 0:
        names = " and ".join(name for name, _ in areas)
        raise AOIError(f"The {names} do not overlap: no tile to cover")
    return cover_geometry(area, zoom)


def _tile_box(tile: Tile) -> Polygon:
    west, south, east, north = mercantile.bounds(tile)
    return box(west, south, east, north)


def _overlaps(target: prepared.PreparedGeometry, tile_box: Polygon) -> bool:
    return target.intersects(tile_box) and not target.touches(tile_box)


def _children(parent: Tile, zoom: int) -> list[Tile]:
    if parent.z == zoom:
        return [parent]
    return sorted(mercantile.children(parent, zoom=zoom), key=_zorder)


def _zorder(tile: Tile) -> str:
    """Quadkey order: tiles sharing any ancestor come out together, at every level."""
    return mercantile.quadkey(tile)
