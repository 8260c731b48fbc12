"""Tiles per second of chipscale's tile reader against rio-tiler's ``Reader.tile``; prints JSON.

Every tile at z19 and z20 over the image (``mercantile.tiles`` over its lon/lat bounds).
Three ways, measured in alternating rounds so that drift (thermal, cache, neighbours) hits
them alike:

* ``rio_tiler``: one ``Reader`` opened once, ``Reader.tile`` per tile (nearest).
* ``single``: chipscale one tile at a time (``TileReader.tile``, dataset opened once) and
  ``read_tile`` (which also opens the dataset per tile, as the CLI does).
* ``pack``: ``read_tiles`` with all tiles (one warp per pack window).

Usage: ``python bench/tile_read.py [PATH] [--repeats N]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import mercantile
import rasterio
import rio_tiler
from rio_tiler.io import Reader

from chipscale.sources import read_tile, read_tiles
from chipscale.sources.cog import TileReader
from chipscale.sources.footprint import source_footprint_lonlat

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT = SHARED / "rasterio_cogeo.tif"
#: A UTM source: every tile is warped, where reading a pack in one warp matters most.
REPROJECTED = SHARED / "naip_m_4709963_se_14_1_20200831.tif"


def _timed(run: Callable[[], int]) -> float:
    start = time.perf_counter()
    count = run()
    elapsed = time.perf_counter() - start
    return count / elapsed


def measure(path: str, zoom: int, repeats: int) -> dict:
    tiles = list(mercantile.tiles(*source_footprint_lonlat(path), zoom))

    def rio() -> int:
        with Reader(path) as reader:
            for t in tiles:
                reader.tile(t.x, t.y, t.z, tilesize=256, resampling_method="nearest")
        return len(tiles)

    def single() -> int:
        with TileReader(path) as reader:
            for t in tiles:
                reader.tile(t)
        return len(tiles)

    def single_open_each() -> int:
        for t in tiles:
            read_tile(path, t)
        return len(tiles)

    def pack() -> int:
        return sum(1 for _ in read_tiles(path, tiles))

    runs = {"rio_tiler": rio, "single": single, "single_open_each": single_open_each, "pack": pack}
    for run in runs.values():  # warm-up: file cache, GDAL block cache, imports
        run()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(repeats):
        order = names[i % len(names) :] + names[: i % len(names)]  # rotate who goes first
        for name in order:
            rates[name].append(_timed(runs[name]))
    median = {name: statistics.median(values) for name, values in rates.items()}
    return {
        "zoom": zoom,
        "tiles": len(tiles),
        "tiles_per_s_median": {k: round(v, 1) for k, v in median.items()},
        "tiles_per_s_all": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
        "ratio_single_vs_rio_tiler": round(median["single"] / median["rio_tiler"], 2),
        "ratio_single_open_each_vs_rio_tiler": round(
            median["single_open_each"] / median["rio_tiler"], 2
        ),
        "ratio_pack_vs_rio_tiler": round(median["pack"] / median["rio_tiler"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=str(DEFAULT))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--zooms", default="19,20")
    parser.add_argument("--reprojected", default=str(REPROJECTED), help="'' to skip")
    parser.add_argument("--reprojected-zooms", default="15,16")
    args = parser.parse_args()
    results = [measure(args.path, int(z), args.repeats) for z in args.zooms.split(",")]
    if args.reprojected:
        results += [
            {"source": args.reprojected, **measure(args.reprojected, int(z), args.repeats)}
            for z in args.reprojected_zooms.split(",")
        ]
    print(
        json.dumps(
            {
                "benchmark": "tile_read",
                "source": args.path,
                "conditions": {
                    "cpu_count": os.cpu_count(),
                    "python": platform.python_version(),
                    "rasterio": rasterio.__version__,
                    "gdal": rasterio.__gdal_version__,
                    "rio_tiler": rio_tiler.__version__,
                    "repeats": args.repeats,
                    "tile_size": 256,
                    "resampling": "nearest",
                    "order": "rotating per round (rio_tiler, single, single_open_each, pack)",
                },
                "results": results,
                "goals": {"single_vs_rio_tiler": 1.0, "pack_vs_rio_tiler": 3.0},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
