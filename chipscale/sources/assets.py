"""The assets of a mosaic source: :class:`Asset`, the loaders of a COG list (``.txt``) and of a
STAC ItemCollection / FeatureCollection (``.json``, ``.geojson``), their priority order, their
JSON form (the list frozen with a job), and :class:`AssetIndex`, the spatial index from a tile
or a pack window to its candidate assets."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Literal, cast, get_args

import mercantile
import numpy as np
import shapely
from mercantile import Tile
from shapely.geometry import box, mapping, shape
from shapely.geometry.base import BaseGeometry

from chipscale.errors import SourceError, cut, one_line, quoted
from chipscale.names import MOSAIC_LIST_SUFFIXES, is_mosaic_name
from chipscale.sources.footprint import source_footprint_lonlat

#: How assets are ranked: as listed, by date (``datetime``, newest or oldest first), or by
#: ``eo:cloud_cover`` (least first). Ties and unknown values keep the listed order, unknowns
#: last.
Order = Literal["listed", "newest", "oldest", "least-cloudy"]
ORDERS: tuple[str, ...] = get_args(Order)

#: Media type of a cloud-optimized GeoTIFF in STAC (``profile`` may be spelt either way).
_COG_TYPES = ("profile=cloud-optimized", "profile=cloud_optimized")

_GEOMETRY_TYPES = frozenset(
    ("Polygon", "MultiPolygon", "Point", "MultiPoint", "LineString", "MultiLineString")
) | {"GeometryCollection"}

#: Threads reading the bounds of a COG list's files (each a header read; remote ones wait on
#: the network).
LIST_WORKERS = 16

BBox = tuple[float, float, float, float]


@dataclass(frozen=True, slots=True)
class Asset:
    """One raster of a mosaic.

    ``id``: what results record as provenance (a STAC item's id; a list line as written).
    ``href``: a local path, an http(s) or an ``s3://`` URL.
    ``footprint``: where it lies, in lon/lat: a GeoJSON geometry (a mapping) or a bbox
    ``(west, south, east, north)``; ``west > east`` for a bbox crossing the antimeridian.
    """

    id: str
    href: str
    footprint: Mapping[str, Any] | BBox
    datetime: str | None = None
    cloud_cover: float | None = None

    def geometry(self) -> BaseGeometry:
        """The footprint as a shapely geometry (a bbox crossing the antimeridian becomes two
        boxes)."""
        return footprint_geometry(self.footprint)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (:func:`asset_from_json` reads it back)."""
        out: dict[str, Any] = {"id": self.id, "href": self.href}
        out["footprint"] = (
            list(self.footprint) if isinstance(self.footprint, tuple) else dict(self.footprint)
        )
        if self.datetime is not None:
            out["datetime"] = self.datetime
        if self.cloud_cover is not None:
            out["cloud_cover"] = self.cloud_cover
        return out


def footprint_geometry(footprint: Mapping[str, Any] | Sequence[float]) -> BaseGeometry:
    """A shapely geometry from a GeoJSON geometry or a ``(west, south, east, north)`` bbox."""
    if isinstance(footprint, Mapping):
        return shape(dict(footprint))
    west, south, east, north = (float(v) for v in footprint)
    if west > east:
        halves = [box(west, south, 180.0, north), box(-180.0, south, east, north)]
        return shapely.MultiPolygon(halves)
    return box(west, south, east, north)


def footprint_geometries(assets: Sequence[Asset]) -> np.ndarray:
    """The assets' footprints as an array of shapely geometries, parsed in bulk; a
    :class:`SourceError` naming the first asset whose footprint is not a usable geometry."""
    out = np.empty(len(assets), dtype=object)
    mappings = [i for i, a in enumerate(assets) if isinstance(a.footprint, Mapping)]
    boxes = [i for i, a in enumerate(assets) if not isinstance(a.footprint, Mapping)]
    try:
        rings = [i for i in mappings if _is_plain_polygon(assets[i].footprint)]
        if rings:
            out[rings] = _polygons([_exterior(assets[i].footprint) for i in rings])
        others = sorted(set(mappings) - set(rings))
        if others:
            texts = [json.dumps(assets[i].footprint) for i in others]
            out[others] = shapely.from_geojson(texts)
        for i in boxes:
            out[i] = footprint_geometry(assets[i].footprint)
    except (shapely.errors.ShapelyError, TypeError, ValueError):
        for asset in assets:
            _check_footprint(asset)
        raise
    empty = np.flatnonzero(shapely.is_empty(out) | shapely.is_missing(out))
    if empty.size:
        raise SourceError(f"asset {assets[int(empty[0])].id} has an empty footprint")
    return out


def _is_plain_polygon(footprint: Mapping[str, Any] | BBox) -> bool:
    """A GeoJSON Polygon without holes (most STAC items' geometry)."""
    if not isinstance(footprint, Mapping) or footprint.get("type") != "Polygon":
        return False
    coordinates = footprint.get("coordinates")
    return isinstance(coordinates, list | tuple) and len(coordinates) == 1


def _exterior(footprint: Mapping[str, Any] | BBox) -> Any:
    return cast(Mapping[str, Any], footprint)["coordinates"][0]


def _polygons(rings: list[Any]) -> np.ndarray:
    """Polygons from their exterior rings, built in one call (parsing GeoJSON one geometry
    at a time takes seconds for 10,000 items)."""
    lengths = [len(ring) for ring in rings]
    flat = list(chain.from_iterable(rings))
    if {len(point) for point in flat} != {2}:  # 3D positions, or malformed ones
        flat = [point[:2] if len(point) >= 2 else point for point in flat]
    points = np.array(flat, dtype=float)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError("a position has fewer than 2 numbers")
    which = np.repeat(np.arange(len(rings)), lengths)
    return np.asarray(shapely.polygons(shapely.linearrings(points, indices=which)))


def _check_footprint(asset: Asset) -> None:
    try:
        asset.geometry()
    except (shapely.errors.ShapelyError, TypeError, ValueError, KeyError, AttributeError):
        raise SourceError(
            f"asset {asset.id} has an invalid footprint {cut(repr(asset.footprint), 120)}"
        ) from None


def asset_from_json(value: Mapping[str, Any]) -> Asset:
    """An :class:`Asset` from :meth:`Asset.to_json`'s dict; :class:`SourceError` if malformed."""
    try:
        footprint = value["footprint"]
        fp: Mapping[str, Any] | BBox = (
            dict(footprint)
            if isinstance(footprint, Mapping)
            else cast(BBox, tuple(float(v) for v in footprint))
        )
        if not isinstance(fp, Mapping) and len(fp) != 4:
            raise ValueError("a bbox has 4 numbers")
        cloud = value.get("cloud_cover")
        return Asset(
            id=str(value["id"]),
            href=str(value["href"]),
            footprint=fp,
            datetime=None if value.get("datetime") is None else str(value["datetime"]),
            cloud_cover=None if cloud is None else float(cloud),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"malformed asset {cut(repr(value), 160)}: {one_line(exc)}") from None


def assets_to_json(assets: Iterable[Asset]) -> list[dict[str, Any]]:
    """The frozen form of an asset list (stored with a job, carried in messages)."""
    return [asset.to_json() for asset in assets]


def assets_from_json(values: Iterable[Mapping[str, Any]]) -> list[Asset]:
    """Read back :func:`assets_to_json`'s list."""
    return [asset_from_json(value) for value in values]


# -- recognising and loading a source ----------------------------------------------------


def is_asset_list(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` names a mosaic: :func:`chipscale.names.is_mosaic_name`."""
    return is_mosaic_name(os.fspath(source))


def load_assets(
    source: str | os.PathLike[str],
    *,
    asset_key: str | None = None,
    order: Order | str = "listed",
) -> list[Asset]:
    """The assets of a ``.txt`` COG list or a ``.json``/``.geojson`` STAC collection, ranked
    by ``order``. Raises :class:`SourceError` (one line) for an unreadable or malformed file,
    an item without the asset, or an empty list."""
    text = os.fspath(source)
    if text.lower().endswith(MOSAIC_LIST_SUFFIXES):
        if asset_key is not None:
            raise SourceError(f"--asset applies to STAC collections, not to the COG list {text}")
        assets = assets_from_list(text)
    else:
        assets = assets_from_collection(text, asset_key=asset_key)
    return order_assets(assets, order)


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read {path}: {one_line(exc)}") from None


def _resolve(href: str, base: Path) -> str:
    """An href relative to the list or collection file made absolute; URLs as they are."""
    if "://" in href or os.path.isabs(href) or href.startswith("/vsi"):
        return href
    return os.path.normpath(base / href)


def assets_from_list(path: str | os.PathLike[str], *, workers: int = LIST_WORKERS) -> list[Asset]:
    """The COGs listed in a text file, one a line, in priority order (blank lines and lines
    starting with ``#`` skipped; relative paths are relative to the file). Each asset's id is
    its line as written; its footprint is the file's bounds, read once, in parallel."""
    text = os.fspath(path)
    base = Path(text).parent
    lines = [line.strip() for line in _read_text(text).splitlines()]
    names = list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))
    if not names:
        raise SourceError(f"the COG list {text} names no file")
    hrefs = [_resolve(name, base) for name in names]

    def bounds_of(href: str) -> BBox:
        try:
            return _bounds(href)
        except SourceError as exc:  # name the list too: the line alone may not say which file
            raise type(exc)(f"the COG list {text}: {exc}") from None

    with ThreadPoolExecutor(max(1, min(workers, len(hrefs)))) as pool:
        bounds = list(pool.map(bounds_of, hrefs))
    return [
        Asset(id=name, href=href, footprint=bbox)
        for name, href, bbox in zip(names, hrefs, bounds, strict=True)
    ]


def _bounds(href: str) -> BBox:
    return source_footprint_lonlat(href)


def assets_from_collection(
    path: str | os.PathLike[str], *, asset_key: str | None = None
) -> list[Asset]:
    """The assets of a STAC ItemCollection (or a GeoJSON FeatureCollection of STAC items) in
    a file; relative asset hrefs are relative to the file."""
    text = os.fspath(path)
    try:
        document = json.loads(_read_text(text))
    except json.JSONDecodeError as exc:
        raise SourceError(f"malformed STAC collection {text}: not JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("type") != "FeatureCollection":
        raise SourceError(
            f"malformed STAC collection {text}: expected a FeatureCollection of STAC items"
        )
    features = document.get("features")
    if not isinstance(features, list):
        raise SourceError(f"malformed STAC collection {text}: 'features' is not a list")
    return assets_from_items(features, asset_key=asset_key, source=text, base=Path(text).parent)


def assets_from_items(
    items: Iterable[Any],
    *,
    asset_key: str | None = None,
    source: str = "the search results",
    base: Path | None = None,
) -> list[Asset]:
    """Assets from STAC item dicts (a collection's features, ``pystac.Item.to_dict()``s of a
    search), in the order given; a repeated item id is kept once. ``source`` names them in
    errors; ``base`` resolves relative hrefs."""
    assets: dict[str, Asset] = {}
    for number, item in enumerate(items, 1):
        asset = _item_asset(item, number, asset_key, source, base)
        assets.setdefault(asset.id, asset)
    if not assets:
        raise SourceError(f"no STAC item in {source}")
    return list(assets.values())


def _item_asset(
    item: Any, number: int, asset_key: str | None, source: str, base: Path | None
) -> Asset:
    where = f"malformed STAC item {number} in {source}:"
    if not isinstance(item, dict):
        raise SourceError(f"{where} not an object")
    item_id = item.get("id")
    if not isinstance(item_id, str) or not item_id:
        raise SourceError(f"{where} no id")
    where = f"malformed STAC item {quoted(item_id)} in {source}:"
    entries = item.get("assets")
    if not isinstance(entries, dict):
        raise SourceError(f"{where} no 'assets' object")
    key = _asset_key(item_id, entries, asset_key, source)
    entry = entries[key]
    href = entry.get("href") if isinstance(entry, dict) else None
    if not isinstance(href, str) or not href:
        raise SourceError(f"{where} asset {quoted(key)} has no href")
    footprint = _item_footprint(item, where)
    properties = item.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    when = properties.get("datetime") or properties.get("start_datetime")
    cloud = properties.get("eo:cloud_cover")
    if isinstance(cloud, bool) or not isinstance(cloud, int | float) or not math.isfinite(cloud):
        cloud = None
    return Asset(
        id=item_id,
        href=href if base is None else _resolve(href, base),
        footprint=footprint,
        datetime=when if isinstance(when, str) else None,
        cloud_cover=None if cloud is None else float(cloud),
    )


def _is_cog(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    media = str(entry.get("type", "")).lower().replace(" ", "")
    roles = entry.get("roles")
    is_data = not isinstance(roles, list) or "data" in roles
    return is_data and any(kind in media for kind in _COG_TYPES)


def _asset_key(item_id: str, entries: dict[str, Any], asset_key: str | None, source: str) -> str:
    """The key of the asset to read: ``asset_key``, else ``visual``, else the only COG data
    asset; a one-line error listing the keys otherwise."""
    keys = ", ".join(quoted(k, 40) for k in list(entries)[:20]) or "none"
    if len(entries) > 20:
        keys += f", ... ({len(entries)} in all)"
    if asset_key is not None:
        if asset_key not in entries:
            raise SourceError(
                f"STAC item {quoted(item_id)} in {source} has no asset {quoted(asset_key)}; "
                f"its assets: {keys}"
            )
        return asset_key
    if "visual" in entries:
        return "visual"
    cogs = [k for k, v in entries.items() if _is_cog(v)]
    if len(cogs) == 1:
        return cogs[0]
    why = "no COG data asset" if not cogs else f"{len(cogs)} COG data assets"
    raise SourceError(
        f"STAC item {quoted(item_id)} in {source} has no 'visual' asset and {why}; "
        f"choose one with --asset (its assets: {keys})"
    )


def _item_footprint(item: dict[str, Any], where: str) -> Mapping[str, Any] | BBox:
    geometry = item.get("geometry")
    if isinstance(geometry, dict):
        # checked in bulk by the index (parsing one by one is the slow part of 10,000 items)
        kind = geometry.get("type")
        parts = geometry.get("geometries" if kind == "GeometryCollection" else "coordinates")
        if kind not in _GEOMETRY_TYPES or not isinstance(parts, list | tuple) or not parts:
            raise SourceError(f"{where} an invalid or empty geometry")
        return geometry
    bbox = item.get("bbox")
    if isinstance(bbox, list) and len(bbox) in (4, 6):
        numbers = [float(v) for v in bbox if isinstance(v, int | float)]
        if len(numbers) == len(bbox):
            if len(numbers) == 6:
                numbers = [numbers[0], numbers[1], numbers[3], numbers[4]]
            return cast(BBox, tuple(numbers))
    raise SourceError(f"{where} neither a geometry nor a bbox")


# -- order --------------------------------------------------------------------------------


def order_assets(assets: Sequence[Asset], order: Order | str = "listed") -> list[Asset]:
    """``assets`` ranked by ``order`` (see :data:`Order`); stable, unknowns last."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {quoted(str(order))}")
    ranked = list(assets)
    if order == "least-cloudy":
        ranked.sort(key=lambda a: (a.cloud_cover is None, a.cloud_cover or 0.0))
    elif order in ("newest", "oldest"):
        known = sorted(
            (a for a in ranked if a.datetime is not None),
            key=lambda a: _timestamp(a.datetime or ""),
            reverse=order == "newest",
        )
        ranked = known + [a for a in ranked if a.datetime is None]
    return ranked


def _timestamp(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 datetime (``Z`` or an offset; naive is UTC)."""
    from datetime import UTC, datetime

    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return -math.inf
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


# -- the spatial index --------------------------------------------------------------------


class AssetIndex:
    """An STRtree over the assets' lon/lat footprints: which assets a tile or a pack window
    may read, in priority order, without scanning every asset.

    ``assets`` is in priority order (the first valid pixel wins); :meth:`candidates` keeps it.
    """

    def __init__(self, assets: Sequence[Asset]) -> None:
        self.assets: tuple[Asset, ...] = tuple(assets)
        self.geometries = footprint_geometries(self.assets)
        shapely.prepare(self.geometries)
        self._tree = shapely.STRtree(self.geometries)

    def __len__(self) -> int:
        return len(self.assets)

    def query(self, area: BaseGeometry) -> list[int]:
        """Indexes (priority order) of the assets whose footprint overlaps ``area``'s
        interior: touching its edge only does not count."""
        hits = self._tree.query(area, predicate="intersects")
        if hits.size == 0:
            return []
        hits = np.sort(hits)
        inside = ~shapely.touches(self.geometries[hits], area)
        return [int(i) for i in hits[inside]]

    def candidates(self, tile: Tile, *, size: int = 256, margin: int = 0) -> list[Asset]:
        """The assets (priority order) whose footprint overlaps ``tile`` (with ``margin``
        pixels of a ``size``-pixel tile on each side)."""
        return [self.assets[i] for i in self.query(tile_box(tile, size=size, margin=margin))]

    def union(self) -> BaseGeometry:
        """The union of the footprints (the area a ``cover`` of the mosaic spans)."""
        return shapely.union_all(self.geometries)


def tile_box(tile: Tile, *, size: int = 256, margin: int = 0) -> BaseGeometry:
    """A tile's lon/lat box, grown by ``margin`` pixels of a ``size``-pixel tile each side."""
    if margin:
        grown = margin / size
        west, north = mercantile.lnglat(*_xy(tile.x - grown, tile.y - grown, tile.z))
        east, south = mercantile.lnglat(*_xy(tile.x + 1 + grown, tile.y + 1 + grown, tile.z))
        return box(west, max(south, -90.0), east, min(north, 90.0))
    b = mercantile.bounds(tile)
    return box(b.west, b.south, b.east, b.north)


def tile_boxes(tiles: Sequence[Tile]) -> np.ndarray:
    """The lon/lat boxes of tiles, as an array of shapely polygons (built in one call)."""
    edges = np.array([mercantile.bounds(t) for t in tiles], dtype=float).reshape(-1, 4)
    return np.asarray(shapely.box(edges[:, 0], edges[:, 1], edges[:, 2], edges[:, 3]))


def _xy(x: float, y: float, z: int) -> tuple[float, float]:
    """Web-mercator metres of the fractional tile position ``(x, y)`` at zoom ``z``."""
    origin = 20037508.342789244
    span = 2 * origin / (1 << z)
    return -origin + x * span, origin - y * span


def footprint_mapping(geometry: BaseGeometry) -> dict[str, Any]:
    """A shapely geometry as a GeoJSON mapping (for :class:`Asset.footprint`)."""
    return dict(mapping(geometry))
