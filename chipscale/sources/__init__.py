"""Where tile pixels come from: the :class:`TileSource` port, its adapters (rasters through
GDAL in :mod:`~chipscale.sources.cog`, XYZ tile endpoints in :mod:`~chipscale.sources.xyz`),
and :func:`open_tile_source`, the one place that picks the adapter for a source."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from mercantile import Tile
from rasterio.enums import Resampling

from chipscale.sources.assets import is_asset_list
from chipscale.sources.base import TileSource
from chipscale.sources.cog import MAX_WINDOW, TileReader
from chipscale.sources.mosaic import open_mosaic
from chipscale.sources.xyz import TileEndpointReader, is_tile_endpoint
from chipscale.values import ImageData

__all__ = [
    "READER_CACHE_SIZE",
    "TileSource",
    "cached_reader",
    "clear_reader_cache",
    "open_tile_source",
    "read_tile",
    "read_tiles",
]


def open_tile_source(
    source: str | os.PathLike[str],
    *,
    size: int = 256,
    bands: Sequence[int] | None = None,
    resampling: Resampling | str = Resampling.nearest,
    max_window: int = MAX_WINDOW,
    margin: int = 0,
    asset_key: str | None = None,
    order: str = "listed",
) -> TileSource:
    """An open reader of ``source``: a :class:`~chipscale.sources.xyz.TileEndpointReader` for
    an XYZ tile endpoint (:func:`~chipscale.sources.xyz.is_tile_endpoint`; ``max_window``
    does not apply to it), else a :class:`~chipscale.sources.cog.TileReader` (a local path,
    an http(s) or an ``s3://`` URL of a raster). ``margin``: pixels of context read on each
    side of every tile (see :func:`read_tiles`). A ``.txt`` COG list or a ``.json`` /
    ``.geojson`` STAC collection is a :class:`~chipscale.sources.mosaic.MosaicReader`
    (``asset_key``: the items' asset to read; ``order``: see
    :data:`~chipscale.sources.assets.Order`)."""
    if is_asset_list(source):
        return open_mosaic(
            source,
            asset_key=asset_key,
            order=order,
            size=size,
            bands=bands,
            resampling=resampling,
            max_window=max_window,
            margin=margin,
        )
    if is_tile_endpoint(source):
        return TileEndpointReader(
            source, size=size, bands=bands, resampling=resampling, margin=margin
        )
    return TileReader(
        source,
        size=size,
        bands=bands,
        resampling=resampling,
        max_window=max_window,
        margin=margin,
    )


def read_tiles(
    source: str | os.PathLike[str],
    tiles: Iterable[Tile | Sequence[int]],
    size: int = 256,
    bands: Sequence[int] | None = None,
    *,
    resampling: Resampling | str = Resampling.nearest,
    max_window: int = MAX_WINDOW,
    margin: int = 0,
) -> Iterator[tuple[Tile, ImageData]]:
    """Yield ``(tile, ImageData)`` for every distinct tile, reading packs with one warp each.

    ``source``: a local path, an http(s) URL or an ``s3://`` URL, opened once for the call,
    or an XYZ tile endpoint (``https://host/{z}/{x}/{y}.png``, see
    :mod:`chipscale.sources.xyz`), for which ``max_window`` does not apply.
    ``bands``: 1-based band indexes; default every band but an alpha band.
    ``data`` is ``(bands, size, size)`` in the source dtype, ``mask`` is ``(size, size)``
    bool, True where valid. A tile that misses the source has an all-False mask.
    ``margin`` m: each tile also holds m pixels of context on each side, the source's own
    neighbouring pixels (those the neighbouring tiles read): ``data`` is
    ``(bands, size + 2m, size + 2m)``, ``mask`` ``(size + 2m, size + 2m)`` and
    ``ImageData.margin`` is m; beyond the source data is 0 and the mask False. Rasters still
    read each pack with one warp (its window grows by m pixels on each side).
    Raises :class:`~chipscale.errors.SourceError` when the source cannot be read and
    :class:`~chipscale.errors.InvalidTileError` for a tile off the grid.
    """
    with open_tile_source(
        source,
        size=size,
        bands=bands,
        resampling=resampling,
        max_window=max_window,
        margin=margin,
    ) as reader:
        yield from reader.read(tiles)


def read_tile(
    source: str | os.PathLike[str],
    tile: Tile | Sequence[int],
    size: int = 256,
    bands: Sequence[int] | None = None,
    *,
    resampling: Resampling | str = Resampling.nearest,
    margin: int = 0,
) -> ImageData:
    """Read one tile (the CLI's ``chipscale tile``); see :func:`read_tiles`."""
    with open_tile_source(
        source, size=size, bands=bands, resampling=resampling, margin=margin
    ) as reader:
        return reader.tile(tile)


#: Open readers kept per thread by :func:`cached_reader`: a worker handles many packs of few
#: sources, and opening costs a header read each time (milliseconds locally, a round trip
#: or more to S3).
READER_CACHE_SIZE = 4
_local = threading.local()


def cached_reader(
    source: str | os.PathLike[str],
    *,
    size: int = 256,
    bands: Sequence[int] | None = None,
    margin: int = 0,
) -> TileSource:
    """An open reader of ``source`` (:func:`open_tile_source`) from this thread's small LRU
    cache.

    Per thread because a reader is not thread-safe. The least recently used reader is closed
    when the cache is full. Sources are taken to be immutable while a process runs (COGs in a
    bucket): a file rewritten in place needs :func:`clear_reader_cache`.
    """
    cache: OrderedDict[tuple[Any, ...], TileSource] = (
        getattr(_local, "readers", None) or OrderedDict()
    )
    _local.readers = cache
    key = (os.fspath(source), size, tuple(bands) if bands is not None else None, margin)
    reader = cache.pop(key, None)
    if reader is None:
        reader = open_tile_source(source, size=size, bands=bands, margin=margin)
        while len(cache) >= READER_CACHE_SIZE:
            cache.popitem(last=False)[1].close()
    cache[key] = reader
    return reader


def clear_reader_cache() -> None:
    """Close this thread's cached readers."""
    cache = getattr(_local, "readers", None) or {}
    for reader in cache.values():
        reader.close()
    _local.readers = OrderedDict()
