"""A job's mosaic source: a COG list, a STAC collection or a STAC API search resolved once,
frozen with the job (``JobInfo.extra["assets"]``) so a re-run or a resume reads the same
assets whatever the catalogue does since, split into each pack's candidates for its queue
message, and opened again from those candidates on the worker (:func:`pack_reader`)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mercantile import Tile
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from chipscale.errors import SourceError
from chipscale.sources.assets import (
    Asset,
    AssetIndex,
    Order,
    assets_from_items,
    assets_from_json,
    assets_to_json,
    is_asset_list,
    load_assets,
    order_assets,
    tile_box,
)
from chipscale.sources.base import TileSource
from chipscale.sources.stac_search import StacSearch, search_items

#: The key of a job's ``extra`` that holds its frozen asset list.
FROZEN_KEY = "assets"

BBox = tuple[float, float, float, float]
#: A candidate as a message carries it: id, href, lon/lat bbox.
Candidate = tuple[str, str, BBox]


@dataclass(frozen=True)
class MosaicSource:
    """The assets of a mosaic job in priority order, and the job's source text (``label``:
    the list or collection as given, or the search spelled out)."""

    label: str
    assets: tuple[Asset, ...]
    _index: list[AssetIndex] = field(default_factory=list, repr=False, compare=False)

    @property
    def index(self) -> AssetIndex:
        """The spatial index of the footprints, built on first use."""
        if not self._index:
            self._index.append(AssetIndex(self.assets))
        return self._index[0]

    @property
    def sha256(self) -> str:
        """A digest of the frozen list: equal lists, equal digests."""
        text = json.dumps(assets_to_json(self.assets), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def frozen(self) -> dict[str, Any]:
        """The job ``extra`` that freezes this list."""
        return {
            FROZEN_KEY: {
                "sha256": self.sha256,
                "count": len(self.assets),
                "list": assets_to_json(self.assets),
            }
        }

    def area(self) -> BaseGeometry:
        """The union of the footprints in lon/lat (what ``cover`` covers)."""
        from chipscale.grid.cover import WORLD, lonlat_area

        return lonlat_area(self.index.union()).intersection(WORLD)

    def candidates(self, tiles: Iterable[Tile]) -> tuple[Candidate, ...]:
        """The assets a pack of ``tiles`` may read, in priority order, as a message carries
        them: those whose footprint overlaps a tile (the reader's own rule)."""
        hits: set[int] = set()
        for tile in tiles:
            hits.update(self.index.query(tile_box(tile)))
        return tuple(candidate(self.assets[i]) for i in sorted(hits))


def cover_mosaic(
    zoom: int,
    mosaic: MosaicSource,
    *,
    aoi: str | os.PathLike[str] | BaseGeometry | None = None,
    bbox: BBox | None = None,
) -> Iterator[Tile]:
    """Tiles at ``zoom`` of the union of the mosaic's footprints (not their bounding box),
    within the AOI and the bbox when given."""
    from chipscale.grid.cover import cover

    area = aoi if aoi is None or isinstance(aoi, BaseGeometry) else os.fspath(aoi)
    return cover(zoom, footprint=(f"mosaic {mosaic.label!r}", mosaic.area()), aoi=area, bbox=bbox)


def candidate(asset: Asset) -> Candidate:
    """An asset as a message carries it: its id, href and lon/lat bbox (``west > east``
    across the antimeridian)."""
    footprint = asset.footprint
    if isinstance(footprint, Mapping):
        west, south, east, north = shape(dict(footprint)).bounds
    else:
        west, south, east, north = footprint
    return asset.id, asset.href, (float(west), float(south), float(east), float(north))


def thaw(extra: Mapping[str, Any] | None, label: str) -> MosaicSource | None:
    """The mosaic frozen in a job's ``extra``, or None when it holds none; a list whose
    digest does not match is a :class:`SourceError` (it was edited by hand)."""
    frozen = (extra or {}).get(FROZEN_KEY)
    if not isinstance(frozen, Mapping):
        return None
    values = frozen.get("list")
    if not isinstance(values, list) or not values:
        raise SourceError(f"the frozen asset list of {label} is malformed")
    mosaic = MosaicSource(label, tuple(assets_from_json(values)))
    if frozen.get("sha256") != mosaic.sha256:
        raise SourceError(f"the frozen asset list of {label} does not match its sha256")
    return mosaic


def is_mosaic(source: str | None, search: StacSearch | None) -> bool:
    """Whether the options name a mosaic: a search, a COG list or a STAC collection."""
    return search is not None or (source is not None and is_asset_list(source))


def resolve_mosaic(
    source: str | None,
    search: StacSearch | None,
    *,
    asset_key: str | None = None,
    order: Order | str | None = None,
    area: BaseGeometry | None = None,
) -> MosaicSource:
    """Resolve a mosaic now (read the list or collection, or run the search, within ``area``
    when given), in ``order`` (default: as listed, or as the API answered)."""
    ranked: Order | str = order or "listed"
    if search is not None:
        items = search_items(search, area=area)
        assets = assets_from_items(items, asset_key=asset_key, source=search.label())
        return MosaicSource(search.label(), tuple(order_assets(assets, ranked)))
    if source is None or not is_asset_list(source):
        raise SourceError(f"{source!r} is not a COG list (.txt) or a STAC collection (.json)")
    try:
        assets = load_assets(source, asset_key=asset_key, order=ranked)
    except ValueError as exc:  # an unknown order
        raise SourceError(str(exc)) from None
    return MosaicSource(os.fspath(source), tuple(assets))


# -- the worker's side: a reader over a message's candidates ------------------------------


class CandidateLike(Protocol):
    """A message's candidate (:class:`chipscale.pipeline.messages.AssetRef`)."""

    @property
    def id(self) -> str: ...
    @property
    def href(self) -> str: ...
    @property
    def bbox(self) -> BBox: ...


#: Mosaic readers kept per thread, by candidate list: neighbouring packs inside one scene
#: carry the same candidates and reuse the assets' open datasets.
MOSAIC_CACHE_SIZE = 4
_local = threading.local()


def pack_reader(
    candidates: Sequence[CandidateLike],
    *,
    source: str,
    size: int = 256,
    bands: Sequence[int] | None = None,
    margin: int = 0,
) -> TileSource:
    """A :class:`~chipscale.sources.mosaic.MosaicReader` over a pack's candidates (no STAC
    call, nothing opened until a tile needs it), from this thread's small LRU cache."""
    from chipscale.sources.mosaic import MosaicReader

    cache: OrderedDict[tuple[Any, ...], TileSource] = (
        getattr(_local, "mosaics", None) or OrderedDict()
    )
    _local.mosaics = cache
    refs = tuple((c.id, c.href, tuple(c.bbox)) for c in candidates)
    key = (refs, size, None if bands is None else tuple(bands), margin)
    reader = cache.pop(key, None)
    if reader is None:
        assets = [Asset(id=i, href=h, footprint=b) for i, h, b in refs]  # type: ignore[arg-type]
        reader = MosaicReader(assets, source=source, size=size, bands=bands, margin=margin)
        while len(cache) >= MOSAIC_CACHE_SIZE:
            cache.popitem(last=False)[1].close()
    cache[key] = reader
    return reader


def clear_pack_readers() -> None:
    """Close this thread's cached mosaic readers."""
    for reader in (getattr(_local, "mosaics", None) or {}).values():
        reader.close()
    _local.mosaics = OrderedDict()
