"""The streaming merge against GDAL: a class mask cut into tiles, each tile polygonized by
rasterio (GDAL's polygonize, 4-connected), merged, equals the whole mask polygonized at once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio.features
import shapely
from affine import Affine
from mercantile import Tile
from shapely.geometry import shape

from chipscale.results.feature_merge import Region, merge_regions
from chipscale.values import FeatureRow

NODATA = 255


def polygonize(mask: np.ndarray) -> list[tuple[int, shapely.Polygon]]:
    """GDAL's 4-connected polygons of every class in ``mask`` (255 left out), pixel coords."""
    valid = mask != NODATA
    return [
        (int(value), shape(geom))
        for geom, value in rasterio.features.shapes(
            mask, mask=valid, connectivity=4, transform=Affine.identity()
        )
    ]


def tile_rows(
    mask: np.ndarray, size: int, *, z: int = 18, x0: int = 1000, y0: int = 2000
) -> Iterator[FeatureRow]:
    """What a store yields for ``mask`` run tile by tile: each tile polygonized alone, in
    ``(z, x, y, seq)`` order (tiles with no valid pixel have no rows)."""
    rows, cols = mask.shape[0] // size, mask.shape[1] // size
    for tx in range(cols):
        for ty in range(rows):
            block = np.ascontiguousarray(
                mask[ty * size : (ty + 1) * size, tx * size : (tx + 1) * size]
            )
            for seq, (value, polygon) in enumerate(polygonize(block)):
                yield FeatureRow(
                    "job", z, x0 + tx, y0 + ty, seq, f"c{value}", shapely.to_wkb(polygon), size
                )


def local(region: Region, size: int, x0: int = 1000, y0: int = 2000) -> shapely.Polygon:
    """A merged region moved back to the mask's own pixel coordinates."""
    return shapely.transform(region.polygon, lambda c: c - [x0 * size, y0 * size])


def assert_tiled_equals_whole(mask: np.ndarray, size: int) -> list[Region]:
    regions = list(merge_regions(tile_rows(mask, size)))
    whole = polygonize(mask)
    assert len(regions) == len(whole)
    by_key = {}
    for value, polygon in whole:
        by_key.setdefault((f"c{value}", round(polygon.area), polygon.bounds), []).append(polygon)
    for region in regions:
        polygon = local(region, size)
        assert polygon.is_valid
        assert polygon.geom_type == "Polygon"
        candidates = by_key[(region.cls, round(polygon.area), polygon.bounds)]
        match = next(c for c in candidates if c.equals(polygon))  # StopIteration: no match
        assert (
            shapely.intersection(match, polygon).area / shapely.union(match, polygon).area >= 0.99
        )
        assert polygon.symmetric_difference(match).area == 0
        candidates.remove(match)
    assert all(not c for c in by_key.values())
    return regions


def blobs(rng: np.random.Generator, height: int, width: int, classes: int, cell: int) -> np.ndarray:
    """A blobby class mask: a coarse random grid blown up, with pixel noise and a few nodata
    pixels, so regions of every size cross tile borders."""
    coarse = rng.integers(0, classes, (height // cell + 1, width // cell + 1))
    mask = np.kron(coarse, np.ones((cell, cell), dtype=np.int64))[:height, :width]
    noise = rng.random((height, width))
    mask[noise < 0.08] = rng.integers(0, classes, int((noise < 0.08).sum()))
    mask[noise > 0.995] = NODATA
    return mask.astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiled_equals_whole_on_random_masks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    size = 16
    mask = blobs(rng, 6 * size, 9 * size, classes=3, cell=5 + seed)
    regions = assert_tiled_equals_whole(mask, size)
    assert max(r.tiles for r in regions) > 4  # regions really crossed borders


def test_tiled_equals_whole_with_holes_and_missing_tiles() -> None:
    rng = np.random.default_rng(7)
    size = 8
    mask = blobs(rng, 5 * size, 5 * size, classes=2, cell=3)
    mask[8:16, 16:24] = NODATA  # a tile with nothing: no rows, regions go around it
    assert_tiled_equals_whole(mask, size)


def test_region_spanning_3x3_tiles_with_a_hole() -> None:
    size = 10
    mask = np.zeros((3 * size, 3 * size), dtype=np.uint8)
    mask[3:27, 3:27] = 1  # one region over all 9 tiles
    mask[12:18, 12:18] = 2  # a hole in the middle tile
    mask[9:11, 19:21] = 2  # a hole across a tile corner (4 tiles)
    regions = assert_tiled_equals_whole(mask, size)
    ring = next(r for r in regions if r.cls == "c1")
    assert ring.tiles == 9
    assert len(ring.polygon.interiors) == 2
    assert ring.polygon.area == 24 * 24 - 36 - 4
    assert len(ring.polygon.exterior.coords) == 5  # no vertices left on the tile borders
    across = [r for r in regions if r.cls == "c2" and r.polygon.area == 4]
    assert len(across) == 1 and across[0].tiles == 4


def test_regions_touching_at_a_corner_stay_two() -> None:
    size = 4
    mask = np.zeros((2 * size, 2 * size), dtype=np.uint8)
    mask[:4, :4] = 1  # tile (0, 0)
    mask[4:, 4:] = 1  # tile (1, 1): touches the first only at the tile corner
    mask[1, 6], mask[2, 7] = 1, 1  # and a corner touch inside a tile
    regions = assert_tiled_equals_whole(mask, size)
    ones = sorted(r.polygon.area for r in regions if r.cls == "c1")
    assert ones == [1, 1, 16, 16]


def test_region_touching_itself_around_a_tile() -> None:
    """A U shape whose arms meet only in a later column: pieces of one tile join late."""
    size = 4
    mask = np.zeros((3 * size, 2 * size), dtype=np.uint8)
    mask[:, 3] = 1  # a stem down column 0's right edge
    mask[0, 3:] = 1
    mask[11, 3:] = 1
    mask[:, 7] = 1
    regions = assert_tiled_equals_whole(mask, size)
    ones = [r for r in regions if r.cls == "c1"]
    assert len(ones) == 1 and ones[0].tiles == 6 and len(ones[0].polygon.interiors) == 1


def test_out_of_order_rows_are_refused() -> None:
    rows = list(tile_rows(np.zeros((8, 8), dtype=np.uint8), 4))
    with pytest.raises(ValueError, match="out of"):
        list(merge_regions(reversed(rows)))


def test_small_chunks_split_tiles_between_reads() -> None:
    rng = np.random.default_rng(3)
    size = 8
    mask = blobs(rng, 4 * size, 4 * size, classes=3, cell=3)
    whole = list(merge_regions(tile_rows(mask, size)))
    split = list(merge_regions(tile_rows(mask, size), chunk_rows=3))
    assert sorted((r.cls, r.polygon.wkt) for r in whole) == sorted(
        (r.cls, r.polygon.wkt) for r in split
    )


def test_open_regions_only_are_held() -> None:
    """A long strip of tiles whose regions never cross a border: each leaves at once."""
    size = 4
    mask = np.ones((size, 50 * size), dtype=np.uint8)
    mask[:, ::size] = 0  # column 0 of every tile is another class: nothing touches across
    rows = tile_rows(mask, size)
    merged = merge_regions(rows)
    first = next(merged)
    assert first.tiles == 1
    assert sum(1 for _ in merged) == 2 * 50 - 1


def test_tiled_run_equals_the_whole_area_on_real_imagery(aerial: Path, tmp_path: Path) -> None:
    """The demo segmentation model (poolings: each pixel's class depends on its neighbours,
    a 16 px margin) run by the pipeline tile by tile, in packs of 4 tiles, then merged, equals
    the same model run once over the whole 6 x 6 tile area (one 1536 px "tile" with the same
    margin), vectorized at once."""
    import dataclasses

    from chipscale.grid.packs import pack_tiles
    from chipscale.models import demo_segmentation
    from chipscale.models.predictors import open_predictor
    from chipscale.pipeline.runner import run_local
    from chipscale.results import open_store
    from chipscale.sources import read_tiles
    from chipscale.sources.footprint import cover
    from model_server.chipscale_runtime import read_metadata, rewrite_metadata

    z, size, side = 19, 256, 6
    covered = list(cover(z, source=str(aerial)))
    x0 = min(t.x for t in covered) + 1
    y0 = min(t.y for t in covered) + 1
    area = [Tile(x, y, z) for x in range(x0, x0 + side) for y in range(y0, y0 + side)]
    model = demo_segmentation.build(tmp_path / "seg.pt")
    meta = read_metadata(model)
    margin = meta.margin
    with open_store(f"sqlite:///{tmp_path / 'r.db'}") as store:
        summary = run_local(
            job="seg", source=str(aerial), tiles=area, zoom=z, store=store,
            predictor=open_predictor(model, threads=1), max_tiles=4, workers=1,
        )  # fmt: skip
        assert summary.processed == side * side
        assert len(list(pack_tiles(area, 4))) > 4  # pack borders inside the area
        regions = list(merge_regions(store.iter_features("seg", background=True)))

    # The whole area: the tiles around it read plainly and stitched, cut to the area plus the
    # margin, and given to the same model as one big tile.
    ring = [
        Tile(x, y, z) for x in range(x0 - 1, x0 + side + 1) for y in range(y0 - 1, y0 + side + 1)
    ]
    n = side + 2
    data = np.zeros((3, n * size, n * size), dtype=np.uint8)
    valid = np.zeros((n * size, n * size), dtype=bool)
    for tile, image in read_tiles(str(aerial), ring, size=size):
        i, j = tile.x - x0 + 1, tile.y - y0 + 1
        data[:, j * size : (j + 1) * size, i * size : (i + 1) * size] = image.data[:3]
        valid[j * size : (j + 1) * size, i * size : (i + 1) * size] = image.mask
    big = rewrite_metadata(
        model, tmp_path / "big.pt", dataclasses.replace(meta, tile_size=side * size)
    )
    cut = data[
        :, size - margin : size + side * size + margin, size - margin : size + side * size + margin
    ]
    mask = open_predictor(big, threads=1).predict(np.ascontiguousarray(cut)[None])[0]
    mask[~valid[size : size + side * size, size : size + side * size]] = NODATA

    whole = polygonize(mask)
    assert len(regions) == len(whole) > side * side
    assert max(r.tiles for r in regions) > 4
    by_class: dict[str, list[shapely.Polygon]] = {}
    for value, polygon in whole:
        by_class.setdefault(meta.classes[value], []).append(polygon)
    unmatched = 0
    for region in regions:
        polygon = local(region, size, x0, y0)
        candidates = by_class[region.cls]
        best = max(
            candidates,
            key=lambda c: shapely.intersection(c, polygon).area if c.intersects(polygon) else 0,
        )
        iou = shapely.intersection(best, polygon).area / shapely.union(best, polygon).area
        assert iou >= 0.99, (region.cls, iou, region.tiles)
        unmatched += not best.equals(polygon)
        candidates.remove(best)
    assert unmatched == 0
