"""Which tiles an area touches: a hierarchical walk of the grid.

Tiles come out in quadkey (Z-curve) order, grouped by ancestor, which
:mod:`chipscale.grid.packs` streams into packs. Areas are shapely geometries in lon/lat
(EPSG:4326); one crossing the antimeridian is cut at +-180 (RFC 7946). Why: docs/design.md,
"Packs and push".
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import mercantile
import numpy as np
import shapely
from mercantile import Tile
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.warp import transform_geom
from shapely import prepared
from shapely.errors import GEOSException
from shapely.geometry import MultiPolygon, Polygon, box, shape
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from chipscale.errors import AOIError, cut, one_line, quoted
from chipscale.grid.tilelist import MAX_ZOOM

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
        raise AOIError(f"bbox {quoted(text)} is not four numbers W,S,E,N") from None
    # Written so that NaN fails each test (every comparison with NaN is false).
    if not (-180 <= west <= 180 and -180 <= east <= 180):
        raise AOIError(f"bbox {quoted(text)}: longitudes must be within -180..180")
    if not (-90 <= south < north <= 90):
        raise AOIError(f"bbox {quoted(text)}: latitudes must be within -90..90 with S < N")
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
    Latitudes beyond web mercator's +-85.05 are clipped; a coordinate off the globe (or not
    a finite number) is an :class:`AOIError`. An invalid polygon (e.g. a self-intersecting
    ring) is repaired keeping every part of its area, with one warning.
    """
    path = Path(path)
    name = quoted(str(path), limit=300)  # a path is worth showing whole
    try:
        doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=_not_a_number)
    except OSError as exc:
        raise AOIError(f"Cannot read AOI {name}: {exc.strerror}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN or Infinity
        raise AOIError(f"AOI {name} is not GeoJSON: {cut(one_line(exc))}") from None
    except RecursionError:
        raise AOIError(f"AOI {name} is nested too deeply to be GeoJSON") from None
    if not isinstance(doc, dict):
        raise AOIError(f"AOI {name} is not a GeoJSON object")
    polygons = [g for g in _geometries(doc, name) if g["type"] in ("Polygon", "MultiPolygon")]
    if not polygons:
        raise AOIError(f"AOI {name} has no Polygon or MultiPolygon")
    crs = _declared_crs(doc, name)
    parts, repairs = [], []
    for geom in polygons:
        try:
            if crs != WGS84:
                geom = transform_geom(crs, WGS84, geom, antimeridian_cutting=True)
            lonlat = shape(geom)
        except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
            raise AOIError(f"AOI {name} has an invalid geometry: {cut(one_line(exc))}") from None
        except (RecursionError, GEOSException):
            raise AOIError(f"AOI {name} has an invalid geometry") from None
        _check_lonlat(lonlat, name)
        if not lonlat.is_valid:
            repairs.append(shapely.is_valid_reason(lonlat))
        parts.append(lonlat_area(lonlat))
    if repairs:
        warnings.warn(
            f"AOI {name} had {len(repairs)} invalid polygon(s) ({repairs[0]}); repaired "
            "keeping every part of the area",
            stacklevel=2,
        )
    area = unary_union(parts).intersection(WORLD)
    if area.is_empty:
        raise AOIError(f"AOI {name} is empty inside the web-mercator world")
    return area


def _not_a_number(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not a number JSON allows")


def _check_lonlat(geom: BaseGeometry, name: str) -> None:
    """Refuse coordinates off the globe: a longitude beyond +-360 (+-180, or a ring written
    on across the antimeridian), a latitude beyond +-90, a polygon wider than the world."""
    coords = shapely.get_coordinates(geom)
    lon, lat = coords[:, 0], coords[:, 1]
    bad = ~np.isfinite(coords).all(axis=1) | (np.abs(lon) > 360) | (np.abs(lat) > 90)
    if bad.any():
        x, y = coords[int(np.argmax(bad))]
        raise AOIError(
            f"AOI {name}: coordinate ({x:g}, {y:g}) is off the globe (longitude within "
            "-180..180, latitude within -90..90)"
        )
    if len(coords) and lon.max() - lon.min() > 360:
        raise AOIError(
            f"AOI {name}: a polygon spans {lon.max() - lon.min():g} degrees of longitude, "
            "more than the world's 360"
        )


def _geometries(doc: dict[str, Any], name: str) -> Iterator[dict[str, Any]]:
    """The geometries of a GeoJSON object, walked with a stack (no recursion to exhaust)."""
    todo: list[Any] = [doc]
    while todo:
        item = todo.pop()
        if not isinstance(item, dict):
            raise AOIError(
                f"AOI {name}: features and geometries must be GeoJSON objects, "
                f"not {type(item).__name__}"
            )
        kind = item.get("type")
        if kind == "FeatureCollection":
            todo.extend(reversed(_members(item, "features", name)))
        elif kind == "Feature":
            if item.get("geometry"):
                todo.append(item["geometry"])
        elif kind == "GeometryCollection":
            todo.extend(reversed(_members(item, "geometries", name)))
        elif kind in (
            "Polygon",
            "MultiPolygon",
            "Point",
            "MultiPoint",
            "LineString",
            "MultiLineString",
        ):
            yield item
        else:
            shown = quoted(kind) if isinstance(kind, str) else type(kind).__name__
            raise AOIError(f"AOI {name}: unknown GeoJSON type {shown}")


def _members(item: dict[str, Any], key: str, name: str) -> list[Any]:
    members = item.get(key) or []
    if not isinstance(members, list):
        raise AOIError(f"AOI {name}: {key} is not a list")
    return members


def _declared_crs(doc: dict[str, Any], name: str) -> CRS:
    crs_member = doc.get("crs")
    if not crs_member:
        return WGS84
    try:
        crs_name = crs_member["properties"]["name"]
        return CRS.from_user_input(crs_name.replace("urn:ogc:def:crs:", "").replace("::", ":"))
    except (KeyError, TypeError, AttributeError, CRSError) as exc:
        raise AOIError(
            f"AOI {name}: cannot understand its crs member ({cut(one_line(exc))})"
        ) from None


def lonlat_area(geom: BaseGeometry) -> BaseGeometry:
    """A valid lon/lat area, with a ring that wraps past 180 unwrapped.

    An invalid polygon is repaired by GEOS's ``make_valid`` (the "structure" method: the
    union of what the rings enclose, so a bow tie keeps both lobes), keeping only areas.
    """
    result = geom
    if not result.is_valid:
        repaired = shapely.make_valid(result, method="structure", keep_collapsed=False)
        polygons = [p for p in shapely.get_parts(repaired) if p.geom_type.endswith("Polygon")]
        result = unary_union(polygons) if polygons else Polygon()
    if result.is_empty:
        return result
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
    footprint: tuple[str, BaseGeometry] | None = None,
    aoi: str | Path | BaseGeometry | None = None,
    bbox: BBox | None = None,
) -> Iterator[Tile]:
    """Tiles at ``zoom`` of a footprint, an AOI, a bbox, or their intersection.

    ``footprint``: a named lon/lat area handed in, e.g. a raster's (``("source 'a.tif'",
    geometry)``, see :func:`chipscale.sources.footprint.cover`).
    Raises :class:`AOIError` when the areas given do not overlap (e.g. an AOI that misses
    the image): an empty job is almost always a mistake worth a clear message.
    """
    areas: list[tuple[str, BaseGeometry]] = []
    if footprint is not None:
        areas.append(footprint)
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


def _overlaps(target: prepared.PreparedGeometry[BaseGeometry], tile_box: Polygon) -> bool:
    return target.intersects(tile_box) and not target.touches(tile_box)


def _children(parent: Tile, zoom: int) -> list[Tile]:
    if parent.z == zoom:
        return [parent]
    return sorted(mercantile.children(parent, zoom=zoom), key=_zorder)


def _zorder(tile: Tile) -> str:
    """Quadkey order: tiles sharing any ancestor come out together, at every level."""
    return mercantile.quadkey(tile)
