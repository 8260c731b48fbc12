"""The public tile-reading API, as it has always been imported: ``from chipscale.tiles import
read_tiles``. The code lives in :mod:`chipscale.sources`."""

from chipscale.sources.cog import (
    MAX_WINDOW,
    SlowSourceWarning,
    SourceInfo,
    TileReader,
    cached_reader,
    clear_reader_cache,
    gdal_path,
    group_tiles,
    open_source,
    read_tile,
    read_tiles,
    source_footprint_lonlat,
    source_info,
    tile_transform,
)

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
