"""Reads with margins: each tile with ``m`` pixels of the source's own context on each side.

Real GDAL on real COGs: the aerial image (EPSG:3857, on the z18 grid, so z18 and z19 reads
are exact copies) and NAIP (UTM, every pixel warped). The oracle is the margin-free read of
the neighbouring tiles: a tile's margin must hold exactly the pixels its neighbours read.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import mercantile
import numpy as np
import pytest
import rasterio
from mercantile import Tile
from rasterio.transform import from_bounds
from test_tile_endpoint import TileServer, tile_server  # noqa: F401 (fixture)

from chipscale.sources import cached_reader, clear_reader_cache, read_tile, read_tiles
from chipscale.sources.cog import TileReader, tile_transform
from chipscale.sources.footprint import cover
from chipscale.sources.xyz import TileEndpointReader
from chipscale.values import ImageData

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

M = 16


def ring(tiles: list[Tile], k: int = 1) -> list[Tile]:
    """``tiles`` and their neighbours ``k`` tiles around."""
    return list(
        dict.fromkeys(
            Tile(t.x + dx, t.y + dy, t.z)
            for t in tiles
            for dy in range(-k, k + 1)
            for dx in range(-k, k + 1)
        )
    )


def mosaic(core: Mapping[Tile, ImageData], tile: Tile, margin: int, size: int) -> ImageData:
    """What ``tile`` with ``margin`` must be, cut from margin-free reads of its neighbours."""
    first = next(iter(core.values()))
    side = size + 2 * margin
    data = np.zeros((first.data.shape[0], side, side), dtype=first.data.dtype)
    mask = np.zeros((side, side), dtype=bool)
    k = -(-margin // size)
    for dy in range(-k, k + 1):
        for dx in range(-k, k + 1):
            image = core[Tile(tile.x + dx, tile.y + dy, tile.z)]
            top, left = margin + dy * size, margin + dx * size
            r0, r1 = max(top, 0), min(top + size, side)
            c0, c1 = max(left, 0), min(left + size, side)
            if r1 > r0 and c1 > c0:
                data[:, r0:r1, c0:c1] = image.data[:, r0 - top : r1 - top, c0 - left : c1 - left]
                mask[r0:r1, c0:c1] = image.mask[r0 - top : r1 - top, c0 - left : c1 - left]
    return ImageData(data=data, mask=mask, margin=margin)


def assert_same(a: ImageData, b: ImageData) -> None:
    assert a.margin == b.margin
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.data, b.data)


@pytest.mark.parametrize("z", [18, 19])
def test_margin_holds_the_neighbours_pixels(aerial: Path, z: int) -> None:
    tiles = list(cover(z, source=str(aerial)))
    core = dict(read_tiles(aerial, ring(tiles)))
    packed = dict(read_tiles(aerial, tiles, margin=M))
    assert list(packed) == tiles
    for tile in tiles:
        image = packed[tile]
        assert image.data.shape == (3, 256 + 2 * M, 256 + 2 * M)
        assert image.mask.shape == (256 + 2 * M, 256 + 2 * M)
        assert_same(image, mosaic(core, tile, M, 256))
        # the tile itself is today's read
        np.testing.assert_array_equal(image.core_mask, core[tile].mask)
    # the margins are not all empty: neighbours' pixels made it in
    inner = [t for t in tiles if all(n in tiles for n in ring([t]))]
    for tile in inner:
        assert packed[tile].mask[:M].all() and packed[tile].mask[-M:].all()


def test_pack_equals_per_tile_reads_with_margin(aerial: Path) -> None:
    tiles = list(cover(19, source=str(aerial)))
    packed = dict(read_tiles(aerial, tiles, margin=M))
    with TileReader(aerial, margin=M) as reader:
        for tile in tiles:
            assert_same(packed[tile], reader.tile(tile))
    assert_same(read_tile(aerial, tiles[5], margin=M), packed[tiles[5]])


def test_margin_wider_than_a_tile(aerial: Path) -> None:
    """A margin of more than one tile reaches into the second ring of neighbours."""
    size, margin = 64, 80  # 64 px tiles at z20: the image's own pixel grid
    tiles = list(cover(20, source=str(aerial)))[100:112]
    core = dict(read_tiles(aerial, ring(tiles, 2), size=size))
    for tile, image in read_tiles(aerial, tiles, size=size, margin=margin):
        assert image.data.shape == (3, size + 2 * margin, size + 2 * margin)
        assert_same(image, mosaic(core, tile, margin, size))


def test_edge_tile_is_invalid_and_zero_outside_the_source(aerial: Path) -> None:
    tiles = list(cover(19, source=str(aerial)))
    with rasterio.open(aerial) as dataset:
        left, _, _, top = dataset.bounds
    edge = min(tiles, key=lambda t: (t.x, t.y))  # north-west corner of the image
    image = read_tile(aerial, edge, margin=M)
    side = 256 + 2 * M
    transform = tile_transform(edge.x, edge.y, edge.z, 256, M)
    cols = transform.c + (np.arange(side) + 0.5) * transform.a
    rows = transform.f + (np.arange(side) + 0.5) * transform.e
    outside = (cols[np.newaxis, :] < left) | (rows[:, np.newaxis] > top)
    assert outside.any() and (~outside).any()
    assert not image.mask[outside].any()
    assert (image.data[:, outside] == 0).all()
    # inside the image, the margin to the east and south holds valid pixels
    assert image.mask[M:-M, -M:].any() and image.mask[-M:, M:-M].any()


def test_tile_beyond_the_source_is_empty_with_its_margin(aerial: Path) -> None:
    image = read_tile(aerial, Tile(0, 0, 19), margin=M)
    assert image.margin == M and image.is_empty
    assert image.data.shape == (3, 256 + 2 * M, 256 + 2 * M)
    assert not image.mask.any() and not image.data.any()


def test_margin_beyond_the_edge_of_the_world(tmp_path: Path) -> None:
    """A global raster: the margin of a tile on the antimeridian or the top edge of the
    world has nothing there (no wrap-around, no extrapolation)."""
    path = tmp_path / "world.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=720,
        height=340,
        count=1,
        dtype="uint8",
        crs="EPSG:4326",
        transform=from_bounds(-180, -85, 180, 85, 720, 340),
        tiled=True,
        blockxsize=256,
        blockysize=256,
    ) as dataset:
        dataset.write(np.full((1, 340, 720), 7, dtype=np.uint8))
    for tile, image in read_tiles(path, [Tile(0, 0, 2), Tile(3, 1, 2)], margin=M):
        core = image.data[0, M:-M, M:-M]
        assert (core == 7).mean() > 0.5, tile
        world_edge = image.mask[:, :M] if tile.x == 0 else image.mask[:, -M:]
        assert not world_edge.any(), tile
        if tile.y == 0:
            assert not image.mask[:M].any()
        else:  # between tiles inside the world the margin is the neighbour's pixels
            assert image.mask[:M, M:-M].all()


def test_reprojected_margin_matches_neighbours(naip: Path) -> None:
    """Off-grid, a few nearest-neighbour ties break differently with the window origin
    (as between a pack and a single read): under 0.2 % of the pixels."""
    tiles = list(cover(15, source=str(naip)))
    core = dict(read_tiles(naip, ring(tiles)))
    packed = dict(read_tiles(naip, tiles, margin=M))
    with TileReader(naip, margin=M) as reader:
        single = {tile: reader.tile(tile) for tile in tiles}
    total = data_diff = mask_diff = pack_diff = 0
    for tile in tiles:
        image, expected = packed[tile], mosaic(core, tile, M, 256)
        assert image.data.shape == (4, 256 + 2 * M, 256 + 2 * M)
        total += image.mask.size
        mask_diff += int((image.mask != expected.mask).sum())
        data_diff += int((image.data != expected.data).any(axis=0).sum())
        pack_diff += int((image.data != single[tile].data).any(axis=0).sum())
    assert mask_diff / total < 0.002
    assert data_diff / total < 0.002
    assert pack_diff / total < 0.002
    # NAIP's nodata collar: outside the data, invalid and zero
    assert all(
        (~image.mask & (image.data != 0).any(axis=0)).sum() == 0 for image in packed.values()
    )


def test_margin_zero_is_todays_read(aerial: Path) -> None:
    tiles = list(cover(19, source=str(aerial)))
    plain = dict(read_tiles(aerial, tiles))
    for tile, image in read_tiles(aerial, tiles, margin=0):
        assert image.margin == 0
        assert image.data.shape == (3, 256, 256)
        assert image.data.tobytes() == plain[tile].data.tobytes()
        assert image.mask.tobytes() == plain[tile].mask.tobytes()


def test_cached_reader_keys_on_the_margin(aerial: Path) -> None:
    clear_reader_cache()
    try:
        plain = cached_reader(aerial)
        wide = cached_reader(aerial, margin=M)
        assert wide is not plain and wide.margin == M and plain.margin == 0
        assert cached_reader(aerial, margin=M) is wide
        tile = next(iter(cover(19, source=str(aerial))))
        assert wide.tile(tile).data.shape == (3, 256 + 2 * M, 256 + 2 * M)
    finally:
        clear_reader_cache()


def test_negative_margin_is_refused(aerial: Path) -> None:
    with pytest.raises(ValueError, match="margin must be >= 0"):
        TileReader(aerial, margin=-1)


def test_endpoint_margin_equals_the_cog(
    tile_server: TileServer,  # noqa: F811
    aerial: Path,
) -> None:
    """An XYZ endpoint serving the aerial COG's tiles as PNG: the reader fetches the
    neighbouring tiles and crops the margin from them, so it equals the COG read with the
    same margin (404 beyond the imagery: invalid there)."""
    tiles = list(cover(19, source=str(aerial)))
    expected = dict(read_tiles(aerial, tiles, margin=M))
    with TileEndpointReader(tile_server.template("png"), margin=M) as reader:
        got = dict(reader.read(tiles))
        assert list(got) == tiles
        for tile in tiles:
            assert_same(got[tile], expected[tile])
        far = reader.tile(Tile(0, 0, 19))  # the world's corner: neighbours off the grid
        assert far.is_empty and far.data.shape == (3, 256 + 2 * M, 256 + 2 * M)
    # a margin of more than a tile: the second ring
    size_two = read_tiles(tile_server.template("png"), tiles[:3], margin=300)
    wide = dict(read_tiles(aerial, tiles[:3], margin=300))
    for tile, image in size_two:
        assert_same(image, wide[tile])


def test_mercantile_neighbours_agree_with_the_ring() -> None:
    """The oracle's neighbourhood is mercantile's: a sanity check of the helper."""
    tile = Tile(10, 10, 5)
    assert set(ring([tile])) - {tile} == set(mercantile.neighbors(tile))
