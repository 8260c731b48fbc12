"""Tiles per second of chipscale's mosaic reader against rio-tiler's ``mosaic_reader`` and
against one COG holding the same pixels; prints JSON, writes bench/results/mosaic.json.

The assets: the real NAIP image of ../shared/data cut into four COGs that overlap by 80 px
(400 m) across both cuts, in three CRSs (UTM 14N as is, EPSG:4326, UTM 15N), like NAIP
quarter-quads; the single COG is the whole image written the same way (UTM 14N, COG, 256 px
blocks). Every tile over the image at each zoom. Measured in rounds that rotate who goes
first, so that drift (neighbours on a shared machine) hits every way alike:

* ``rio_tiler_mosaic``: ``rio_tiler.mosaic.mosaic_reader`` per tile, first-valid pixel,
  threads=0 (it stops at the first full mask, as chipscale does), each asset's ``Reader``
  opened per tile (its documented use: a tiler function of the asset).
* ``rio_tiler_mosaic_open``: the same with every asset's ``Reader`` opened once, up front.
* ``mosaic``: :class:`~chipscale.sources.mosaic.MosaicReader`, packs (one warp per pack and
  asset), assets found through the spatial index, opened once.
* ``single_cog``: :class:`~chipscale.sources.cog.TileReader` over the single COG, packs.

Usage: ``python bench/mosaic.py [--repeats N] [--zooms 16,17] [--out PATH]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mercantile
import numpy as np
import psutil
import rasterio
import rasterio.shutil
import rio_tiler
from rasterio.enums import ColorInterp
from rasterio.warp import Resampling, calculate_default_transform, reproject
from rasterio.windows import Window
from rio_tiler.errors import EmptyMosaicError
from rio_tiler.io import Reader
from rio_tiler.mosaic import mosaic_reader

from chipscale.sources.assets import Asset, AssetIndex
from chipscale.sources.cog import TOLERANCE, TileReader
from chipscale.sources.footprint import source_footprint_lonlat
from chipscale.sources.mosaic import MosaicReader

NAIP = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "naip_m_4709963_se_14_1_20200831.tif"
)
PARTS: list[tuple[str, tuple[int, int, int, int], str | None]] = [
    ("a", (0, 0, 520, 400), None),
    ("b", (440, 0, 494, 400), "EPSG:4326"),
    ("c", (0, 320, 520, 403), "EPSG:26915"),
    ("d", (440, 320, 494, 403), "EPSG:4326"),
]
VRT_OPTIONS = {"tolerance": TOLERANCE}


def write_part(path: Path, window: tuple[int, int, int, int], crs: str | None) -> Path:
    """A window of the NAIP image as a COG (256 px blocks, overviews), nodata 0."""
    with rasterio.open(NAIP) as src:
        win = Window(*window)
        data = src.read(window=win)
        transform = src.window_transform(win)
        if crs is None:
            out, dst_crs, dst_transform = data, src.crs, transform
        else:
            bounds = rasterio.windows.bounds(win, src.transform)
            dst_transform, width, height = calculate_default_transform(
                src.crs, crs, data.shape[2], data.shape[1], *bounds
            )
            out = np.zeros((data.shape[0], height, width), "uint8")
            reproject(
                data,
                out,
                src_transform=transform,
                src_crs=src.crs,
                dst_transform=dst_transform,
                dst_crs=crs,
                resampling=Resampling.nearest,
                src_nodata=0,
                dst_nodata=0,
            )
            dst_crs = crs
    plain = path.with_suffix(".plain.tif")
    with rasterio.open(
        plain,
        "w",
        driver="GTiff",
        width=out.shape[2],
        height=out.shape[1],
        count=out.shape[0],
        dtype="uint8",
        nodata=0,
        crs=dst_crs,
        transform=dst_transform,
    ) as dst:
        dst.write(out)
        dst.colorinterp = [ColorInterp.gray] + [ColorInterp.undefined] * (out.shape[0] - 1)
    rasterio.shutil.copy(plain, path, driver="COG", blocksize=256)
    plain.unlink()
    return path


def _rate(run: Callable[[], int]) -> float:
    start = time.perf_counter()
    count = run()
    return count / (time.perf_counter() - start)


def measure(parts: list[Path], whole: Path, zoom: int, repeats: int) -> dict[str, Any]:
    tiles = list(mercantile.tiles(*source_footprint_lonlat(whole), zoom))
    hrefs = [str(p) for p in parts]
    assets = [Asset(h, h, source_footprint_lonlat(h)) for h in hrefs]

    def tiler(asset: str, x: int, y: int, z: int) -> Any:
        with Reader(asset) as reader:
            return reader.tile(
                x, y, z, tilesize=256, resampling_method="nearest", vrt_options=VRT_OPTIONS
            )

    def rio() -> int:
        for t in tiles:
            with contextlib.suppress(EmptyMosaicError):
                mosaic_reader(hrefs, tiler, t.x, t.y, t.z, threads=0)
        return len(tiles)

    def rio_open() -> int:
        readers = {h: Reader(h) for h in hrefs}

        def open_tiler(asset: str, x: int, y: int, z: int) -> Any:
            return readers[asset].tile(
                x, y, z, tilesize=256, resampling_method="nearest", vrt_options=VRT_OPTIONS
            )

        try:
            for t in tiles:
                with contextlib.suppress(EmptyMosaicError):
                    mosaic_reader(hrefs, open_tiler, t.x, t.y, t.z, threads=0)
        finally:
            for reader in readers.values():
                reader.close()
        return len(tiles)

    def mosaic() -> int:
        with MosaicReader(assets) as reader:
            return sum(1 for _ in reader.read(tiles))

    def single() -> int:
        with TileReader(whole) as reader:
            return sum(1 for _ in reader.read(tiles))

    runs = {
        "rio_tiler_mosaic": rio,
        "rio_tiler_mosaic_open": rio_open,
        "mosaic": mosaic,
        "single_cog": single,
    }
    for run in runs.values():  # warm-up: file cache, GDAL block cache, imports
        run()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            rates[name].append(_rate(runs[name]))
    median = {name: statistics.median(values) for name, values in rates.items()}
    with MosaicReader(assets) as reader:
        used = [len(image.assets) for _, image in reader.read(tiles)]
    return {
        "zoom": zoom,
        "tiles": len(tiles),
        "tiles_from_2_or_more_assets": sum(n >= 2 for n in used),
        "tiles_per_s_median": {k: round(v, 1) for k, v in median.items()},
        "tiles_per_s_all": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
        "ratio_mosaic_vs_rio_tiler_mosaic": round(median["mosaic"] / median["rio_tiler_mosaic"], 2),
        "ratio_mosaic_vs_rio_tiler_mosaic_open": round(
            median["mosaic"] / median["rio_tiler_mosaic_open"], 2
        ),
        "ratio_mosaic_vs_single_cog": round(median["mosaic"] / median["single_cog"], 2),
    }


def index_figures(count: int) -> dict[str, Any]:
    """Build time and memory of the spatial index of ``count`` items on a grid (0.05 degree
    scenes overlapping by 20 %), and the time to find one tile's candidates."""
    import tracemalloc

    assets = [
        Asset(
            f"scene-{i:05d}",
            f"s3://bucket/{i:05d}.tif",
            {
                "type": "Polygon",
                "coordinates": [
                    [
                        [-100.0 + (i % 100) * 0.04 + dx, 40.0 + (i // 100) * 0.04 + dy]
                        for dx, dy in ((0, 0), (0.05, 0), (0.05, 0.05), (0, 0.05), (0, 0))
                    ]
                ],
            },
        )
        for i in range(count)
    ]
    started = time.perf_counter()
    index = AssetIndex(assets)
    built = time.perf_counter() - started
    rss = psutil.Process().memory_info().rss
    tracemalloc.start()
    again = AssetIndex(assets)
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    grown = psutil.Process().memory_info().rss - rss  # GEOS's geometries are not traced
    del again
    tiles = [
        mercantile.tile(-100.0 + (i * 0.0397) % 4.0, 40.0 + (i * 0.0391) % 4.0, 16)
        for i in range(1000)
    ]
    started = time.perf_counter()
    found = sum(len(index.candidates(t)) for t in tiles)
    queried = time.perf_counter() - started
    return {
        "items": count,
        "build_s": round(built, 3),
        "build_peak_python_mb": round(peak / 1e6, 1),
        "build_rss_growth_mb": round(grown / 1e6, 1),
        "query_us_per_tile": round(queried / len(tiles) * 1e6, 1),
        "mean_candidates_per_z16_tile": round(found / len(tiles), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--zooms", default="16,17")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "mosaic.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        parts = [write_part(folder / f"{n}.tif", w, crs) for n, w, crs in PARTS]
        whole = write_part(folder / "whole.tif", (0, 0, 934, 723), None)
        results = [measure(parts, whole, int(z), args.repeats) for z in args.zooms.split(",")]
    report = {
        "benchmark": "mosaic",
        "conditions": {
            "cpu_count": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "rasterio": rasterio.__version__,
            "gdal": rasterio.__gdal_version__,
            "rio_tiler": rio_tiler.__version__,
            "repeats": args.repeats,
            "tile_size": 256,
            "resampling": "nearest",
            "assets": "NAIP cut in 4 overlapping COGs (UTM 14N, EPSG:4326 x2, UTM 15N)",
            "single_cog": "the whole NAIP image as one COG (UTM 14N)",
            "order": "rotating per round",
        },
        "results": results,
        "index": index_figures(10_000),
        "goals": {"mosaic_vs_rio_tiler_mosaic": 3.0, "mosaic_vs_single_cog": 0.7},
    }
    text = json.dumps(report, indent=2)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
