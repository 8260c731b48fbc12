"""Vectorizing segmentation tiles: what :func:`chipscale.pipeline.vectorize.segment` costs
per 256 x 256 tile (per-class fractions, GDAL's polygonize through
``rasterio.features.shapes``, WKB through shapely), and what it yields: polygons, vertices
and WKB bytes per tile, the rows and bytes the results store then keeps. Prints JSON and
writes bench/results/vectorize.json.

Masks are those of bench/mask_encoding.py: the demo land-cover heuristic (4 classes) on fully
valid tiles of the demo image (``aerial``, z18) and of the NAIP scene (``naip``, z17), as
``blocks`` (argmax of 4 x 4 pixel blocks), ``smooth`` (block scores upsampled bilinearly,
then the argmax: what a segmentation network tends to give) and ``pixels`` (the heuristic
per pixel: salt and pepper, the worst case). Times are CPU time of this process
(``time.process_time``), the median over ``--rounds`` passes, since the machine's two cores
are shared; the split shows GDAL's polygonize with its GeoJSON conversion (``shapes_ms``)
against building the WKB (the rest).

Usage: ``python bench/vectorize.py [--quick] [--rounds 3] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.features import shapes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from mask_encoding import SOURCES, masks  # noqa: E402

from chipscale.pipeline.vectorize import NO_CLASS, segment  # noqa: E402
from chipscale.values import ModelInfo  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "vectorize.json"
INFO = ModelInfo(
    "demo-landcover", "1", ("water", "vegetation", "bare", "built"), 3, 256, task="segmentation"
)


def cpu_ms_per_tile(work: Any, tiles: np.ndarray, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.process_time()
        for tile in tiles:
            work(tile)
        times.append((time.process_time() - start) / len(tiles) * 1000)
    return round(statistics.median(times), 2)


def measure(tiles: np.ndarray, rounds: int) -> dict[str, Any]:
    valid = np.ones(tiles.shape[1:], bool)
    features = [segment(tile, valid, INFO, 6)[1] for tile in tiles]
    polygons = [shapely.from_wkb(f.wkb) for fs in features for f in fs]
    total = cpu_ms_per_tile(lambda t: segment(t, valid, INFO, 6), tiles, rounds)
    polygonize = cpu_ms_per_tile(
        lambda t: list(shapes(t, mask=t != NO_CLASS, connectivity=4, transform=Affine.identity())),
        tiles,
        rounds,
    )
    n = len(tiles)
    return {
        "tiles": n,
        "cpu_ms_per_tile": total,
        "shapes_ms_per_tile": polygonize,
        "wkb_ms_per_tile": round(total - polygonize, 2),
        "polygons_per_tile": round(sum(map(len, features)) / n, 1),
        "vertices_per_tile": round(float(shapely.get_num_coordinates(polygons).sum()) / n, 1),
        "holes_per_tile": round(float(shapely.get_num_interior_rings(polygons).sum()) / n, 1),
        "wkb_bytes_per_tile": round(sum(len(f.wkb) for fs in features for f in fs) / n),
        "tiles_per_cpu_second": round(1000 / total, 1) if total else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 tiles of each source")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    figures: dict[str, dict[str, Any]] = {}
    for source in SOURCES:
        for form, tiles in masks(source, args.quick).items():
            figures[f"{source}/{form}"] = measure(tiles, args.rounds)
            print(f"{source}/{form}: {figures[f'{source}/{form}']}", file=sys.stderr)
    result = {
        "benchmark": "vectorize",
        "per_tile": figures,
        "conditions": {
            "tile_size": 256,
            "classes": len(INFO.classes),
            "connectivity": 4,
            "rounds": args.rounds,
            "timing": "CPU time of one process (time.process_time), median over rounds",
            "sources": {name: {"file": f, "zoom": z} for name, (f, z, _) in SOURCES.items()},
            "python": platform.python_version(),
            "rasterio": rasterio.__version__,
            "gdal": rasterio.__gdal_version__,
            "shapely": shapely.__version__,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
