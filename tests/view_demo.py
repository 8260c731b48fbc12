"""Demo jobs for the viewer's tests (tests/test_view.py, tests/test_view_browser.py): rows
written straight into a store over the real aerial COG, so every colour and score is known.

``demo``: the 16 z18 tiles over rasterio_cogeo.tif, a classification job. The two western
columns are ``forest`` (0.9), the two eastern ``water`` (0.8); the north-west tile is an
``error``, the one south of it ``empty``. ``seg``: the same tiles, a segmentation job whose
tiles each hold one ``building`` square (pixels 64-192) and the first tile a scored
``car`` box.
"""

from __future__ import annotations

from pathlib import Path

import mercantile
from shapely.geometry import box

from chipscale.results import open_store
from chipscale.sources.footprint import source_footprint_lonlat
from chipscale.values import JobInfo, TileFeature, TileResult

ZOOM = 18
FOREST, WATER = "#238b45", "#2171b5"  # chipscale.view.overlay.CLASS_COLORS


def demo_tiles(source: Path) -> list[mercantile.Tile]:
    """The job's tiles: every z18 tile the source touches, in (x, y) order."""
    return sorted(mercantile.tiles(*source_footprint_lonlat(str(source)), ZOOM))


def write_demo(url: str, source: Path) -> dict[str, mercantile.Tile]:
    """Write the ``demo`` and ``seg`` jobs; returns the tiles the tests look at."""
    tiles = demo_tiles(source)
    xs = sorted({t.x for t in tiles})
    west = set(xs[: len(xs) // 2])
    error, empty = tiles[0], tiles[1]  # (xmin, ymin) and (xmin, ymin + 1)
    results = []
    for tile in tiles:
        if tile == error:
            results.append(TileResult("demo", tile, "error", error="model timed out"))
        elif tile == empty:
            results.append(TileResult("demo", tile, "empty"))
        elif tile.x in west:
            output = {"forest": 0.9, "water": 0.1}
            results.append(TileResult("demo", tile, "ok", output=output, assets=("a.tif",)))
        else:
            results.append(TileResult("demo", tile, "ok", output={"forest": 0.2, "water": 0.8}))
    square = TileFeature("building", box(64, 64, 192, 192).wkb, size=256)
    car = TileFeature("car", box(10, 10, 40, 30).wkb, score=0.75, size=256)
    seg = [
        TileResult(
            "seg",
            tile,
            "ok",
            output={"building": 0.25, "background": 0.75},
            features=(square, car) if tile == tiles[0] else (square,),
        )
        for tile in tiles
    ]
    with open_store(url) as store:
        store.start_job(
            JobInfo(
                job="demo",
                source=str(source),
                zoom=ZOOM,
                model_name="demo",
                model_version="1",
                tiles_total=len(tiles) + 4,
                classes=("forest", "water"),
            )
        )
        store.start_job(
            JobInfo(
                job="seg",
                source=str(source),
                zoom=ZOOM,
                model_name="seg",
                model_version="1",
                tiles_total=len(tiles),
                classes=("background", "building", "car"),
            )
        )
        store.write(results)
        store.write(seg)
    forest = next(t for t in tiles if t.x in west and t not in (error, empty))
    water = next(t for t in tiles if t.x not in west)
    return {"error": error, "empty": empty, "forest": forest, "water": water}
