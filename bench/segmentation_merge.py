"""Merge and export of a segmentation job's regions at scale: features/s and peak RSS.

A synthetic job of ``--tiles`` tiles (default 1,000,000, a square block of the zoom's grid)
whose class mask repeats a pattern of 3 x 2 tiles: blocks of 64 px of three classes over a
background, the pattern's outer ring background, so regions cross tile borders inside a
pattern (up to the 6 tiles of one) and every region is bounded, as real objects are. Each
tile of the pattern is polygonized once by GDAL (rasterio.features.shapes, connectivity 4);
rows are then generated in the store's ``(z, x, y, seq)`` order, background left out as
``iter_features(background=False)`` does, so the figures are the merge's and the writer's,
not a database's. Checked: the regions count equals the patterns count times the regions of
one pattern polygonized whole.

Two runs: ``merge`` (merge_regions alone) and ``export`` (merge + lon/lat + ground area +
GeoJSON writing to a temporary file). Peak RSS is the process's high-water mark
(``ru_maxrss``), after imports and the pattern (``baseline``). Goal: under 500 MB at
1,000,000 tiles, time near-linear (``--scaling`` adds runs at 1/10 and 1/100 the tiles).

Throughput is given per second of this process's CPU time as well as of wall time: the
machine's two cores are shared, and wall time measures the neighbours as much as the code.

Usage: ``python bench/segmentation_merge.py [--tiles 1000000] [--size 256] [--scaling]
[--export-max N]``.
Prints JSON and writes bench/results/segmentation_merge.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import rasterio.features
import shapely
from affine import Affine
from shapely.geometry import shape

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chipscale.results.export_features import features_of, write_features_geojson
from chipscale.results.feature_merge import merge_regions
from chipscale.values import FeatureRow

PATTERN = (3, 2)  # tiles across, down
Z = 18
CLASSES = ("background", "building", "road", "water")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pattern(size: int, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cols, rows = PATTERN
    cell = 64
    coarse = rng.choice(
        4, size=(rows * size // cell, cols * size // cell), p=[0.55, 0.15, 0.15, 0.15]
    )
    mask = np.kron(coarse, np.ones((cell, cell), dtype=np.int64)).astype(np.uint8)
    mask[:8], mask[-8:], mask[:, :8], mask[:, -8:] = 0, 0, 0, 0
    return mask


def shapes_of(block: np.ndarray) -> list[tuple[int, shapely.Polygon]]:
    return [
        (int(v), shape(g))
        for g, v in rasterio.features.shapes(block, connectivity=4, transform=Affine.identity())
    ]


def tile_templates(mask: np.ndarray, size: int) -> dict[tuple[int, int], list[tuple[str, bytes]]]:
    """Each tile of the pattern: its non-background features as the store would yield them."""
    out = {}
    for i in range(PATTERN[0]):
        for j in range(PATTERN[1]):
            block = np.ascontiguousarray(mask[j * size : (j + 1) * size, i * size : (i + 1) * size])
            out[(i, j)] = [(CLASSES[v], shapely.to_wkb(p)) for v, p in shapes_of(block) if v != 0]
    return out


def block(tiles: int) -> tuple[int, int]:
    """Columns and rows of a block of at least ``tiles`` tiles made of whole patterns."""
    across = PATTERN[0] * math.ceil(math.sqrt(tiles) / PATTERN[0])
    return across, PATTERN[1] * math.ceil(tiles / across / PATTERN[1])


def rows(
    tiles: int, size: int, templates: dict[tuple[int, int], list[tuple[str, bytes]]]
) -> Iterator[FeatureRow]:
    across, down = block(tiles)
    x0, y0 = 100_000, 90_000
    for x in range(across):
        for y in range(down):
            for seq, (cls, wkb) in enumerate(templates[(x % PATTERN[0], y % PATTERN[1])]):
                yield FeatureRow("bench", Z, x0 + x, y0 + y, seq, cls, wkb, size)


def run(tiles: int, size: int, templates: dict, per_pattern: int, export: bool) -> dict:
    side, down = block(tiles)
    patterns = (side // PATTERN[0]) * (down // PATTERN[1])
    pieces = sum(1 for _ in rows(tiles, size, templates)) if tiles <= 20_000 else None
    start, cpu = time.perf_counter(), time.process_time()
    regions = merge_regions(rows(tiles, size, templates))
    if export:
        with tempfile.TemporaryDirectory() as tmp:
            count = write_features_geojson(features_of(regions), Path(tmp) / "r.geojson")
            size_bytes = (Path(tmp) / "r.geojson").stat().st_size
    else:
        count = sum(1 for _ in regions)
        size_bytes = None
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    result = {
        "run": "export" if export else "merge",
        "tiles": side * down,
        "regions": count,
        "regions_expected": patterns * per_pattern,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "tiles_per_cpu_s": round(side * down / cpu_seconds),
        "features_per_cpu_s": round(count / cpu_seconds),
        "tiles_per_s": round(side * down / seconds),
        "peak_rss_mb": round(rss_mb(), 1),
    }
    if pieces is not None:
        result["stored_features"] = pieces
    if size_bytes is not None:
        result["geojson_bytes"] = size_bytes
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument(
        "--export-max", type=int, default=None, help="no export run above this many tiles"
    )
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "segmentation_merge.json")
    )
    args = parser.parse_args()
    mask = pattern(args.size)
    templates = tile_templates(mask, args.size)
    per_pattern = sum(1 for v, _ in shapes_of(mask) if v != 0)
    baseline = rss_mb()
    sizes = [args.tiles // 100, args.tiles // 10, args.tiles] if args.scaling else [args.tiles]
    runs = []
    for tiles in sizes:
        for export in (False, True):
            if export and args.export_max is not None and tiles > args.export_max:
                continue
            runs.append(run(tiles, args.size, templates, per_pattern, export))
            print(json.dumps(runs[-1]), file=sys.stderr)
    report = {
        "bench": "segmentation_merge",
        "conditions": {
            "python": platform.python_version(),
            "shapely": shapely.__version__,
            "geos": shapely.geos_version_string,
            "cpus": os.cpu_count(),
            "tile_size": args.size,
            "pattern_tiles": list(PATTERN),
            "stored_features_per_tile": round(
                sum(map(len, templates.values())) / len(templates), 2
            ),
            "regions_per_pattern": per_pattern,
            "baseline_rss_mb": round(baseline, 1),
        },
        "runs": runs,
        "goal": {"peak_rss_mb_below": 500, "tiles": args.tiles},
    }
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
