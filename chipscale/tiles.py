"""The public tile-reading API, as it has always been imported: ``from chipscale.tiles import
read_tiles``. The code lives in :mod:`chipscale.sources` (``open_source`` here is
:func:`chipscale.sources.datasets.open_dataset`)."""

from chipscale.sources import cached_reader, clear_reader_cache, read_tile, read_tiles
from chipscale.sources.cog import (
    MAX_WINDOW,
    SlowSourceWarning,
    SourceInfo,
    TileReader,
    group_tiles,
    source_info,
    tile_transform,
)
from chipscale.sources.datasets import gdal_path
from chipscale.sources.datasets import open_dataset as open_source
from chipscale.sources.footprint import source_footprint_lonlat

__all__ = [
    "MAX_WINDOW",
    "SlowSourceWarning",
    "SourceInfo",
    "TileReader",
    "cached_reader",
    "clear_reader_cache",
    "gdal_path",
    "group_tiles",
    "open_source",
    "read_tile",
    "read_tiles",
    "source_footprint_lonlat",
    "source_info",
    "tile_transform",
]
