"""Tile reading: real imagery cross-checked with rio-tiler, every mask kind, packs, memory,
and remote sources (S3 and HTTP range reads against a local moto server).

Tolerances against rio-tiler: where the source is on the web-mercator grid
(``rasterio_cogeo.tif``, EPSG:3857 at the z18 pixel size) pixels and masks must be identical.
For reprojected sources both libraries pick nearest neighbours with different transformer
approximations and, when zoomed out, different overview/decimation paths; there at most 0.5 %
of mask pixels and 10 % of data pixels may differ (a pick of the neighbouring source pixel),
and the mean value over valid pixels must agree within 1 %.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mercantile
import numpy as np
import psutil
import pytest
import rasterio
from cogs import make_big_cog, make_raster, pattern
from mercantile import Tile
from rio_tiler.io import Reader

from chipscale.errors import InvalidTileError, SourceError, SourceUnavailable
from chipscale.sources import (
    READER_CACHE_SIZE,
    cached_reader,
    clear_reader_cache,
    read_tile,
    read_tiles,
)
from chipscale.sources.cog import SlowSourceWarning, TileReader, source_info
from chipscale.sources.datasets import gdal_path
from chipscale.sources.footprint import source_footprint_lonlat
from chipscale.sources.gdal_env import gdal_options, s3_endpoint_options

# The first z16 tile of every raster placed at PLACES["EPSG:3857"] (on-grid, z16 pixels).
ONGRID = Tile(34952, 23450, 16)


def tiles_over(path: Path, z: int) -> list[Tile]:
    return list(mercantile.tiles(*source_footprint_lonlat(path), z))


def rio_tiler_tile(path: Path, tile: Tile, indexes=None) -> tuple[np.ndarray, np.ndarray]:
    with Reader(str(path)) as reader:
        img = reader.tile(
            tile.x, tile.y, tile.z, tilesize=256, indexes=indexes, resampling_method="nearest"
        )
    return img.data, ~np.ma.getmaskarray(img.array).any(axis=0)


# -- real imagery --------------------------------------------------------------------------


@pytest.mark.parametrize("z", [17, 18, 19, 20])
def test_aerial_on_grid_identical_to_rio_tiler(aerial: Path, z: int) -> None:
    tiles = tiles_over(aerial, z)
    got = dict(read_tiles(aerial, tiles))
    assert list(got) and set(got) == set(tiles)
    for tile in tiles[:: max(1, len(tiles) // 16)]:
        data, mask = rio_tiler_tile(aerial, tile)
        image = got[tile]
        assert image.data.shape == (3, 256, 256) and image.data.dtype == np.uint8
        assert image.mask.dtype == bool
        np.testing.assert_array_equal(image.mask, mask)
        np.testing.assert_array_equal(image.data[:, mask], data[:, mask])


@pytest.mark.parametrize(("name", "z"), [("naip", 14), ("naip", 15), ("cog", 7), ("cog", 8)])
def test_reprojected_near_rio_tiler(naip: Path, shared_data: Path, name: str, z: int) -> None:
    path = naip if name == "naip" else shared_data / "cog.tif"
    tiles = tiles_over(path, z)
    mask_diff = data_diff = total = 0
    sums = np.zeros(2)
    for tile, image in read_tiles(path, tiles):
        data, mask = rio_tiler_tile(path, tile)
        assert image.data.dtype == data.dtype  # uint16 stays uint16
        assert image.data.shape == data.shape
        total += mask.size
        mask_diff += int((image.mask != mask).sum())
        both = mask & image.mask
        data_diff += int(((image.data != data).any(axis=0) & both).sum())
        sums += image.data[:, both].sum(), data[:, both].sum()
    assert mask_diff / total < 0.005
    assert data_diff / total < 0.10
    assert abs(sums[0] - sums[1]) / sums[1] < 0.01  # the same picture


def test_pack_equals_single_on_grid(aerial: Path) -> None:
    tiles = tiles_over(aerial, 20)
    packed = dict(read_tiles(aerial, tiles))
    with TileReader(aerial) as reader:
        for tile in tiles:
            single = reader.tile(tile)
            np.testing.assert_array_equal(packed[tile].data, single.data)
            np.testing.assert_array_equal(packed[tile].mask, single.mask)


def test_pack_near_single_reprojected(naip: Path) -> None:
    """Exact equality cannot hold off-grid: a few nearest-neighbour ties break differently
    with the window origin. The warp transformer tolerance keeps that under 0.2 %."""
    tiles = tiles_over(naip, 15)
    packed = dict(read_tiles(naip, tiles))
    differ = 0
    with TileReader(naip) as reader:
        for tile in tiles:
            single = reader.tile(tile)
            differ += int((packed[tile].data != single.data).any(axis=0).sum())
            differ += int((packed[tile].mask != single.mask).sum())
    assert differ / (len(tiles) * 256 * 256) < 0.002


def test_yields_each_tile_once_in_pack_order(aerial: Path) -> None:
    tiles = tiles_over(aerial, 20)
    order = [t for t, _ in read_tiles(aerial, [*tiles, *tiles[:5]], max_window=512)]
    assert sorted(order) == sorted(tiles)
    # packs of 2x2 tiles (512 px): each tile's pack parent at z19 appears in one run
    parents = [mercantile.parent(t) for t in order]
    runs = [p for i, p in enumerate(parents) if i == 0 or parents[i - 1] != p]
    assert len(runs) == len(set(parents))


def test_bands_selection_and_uint16(shared_data: Path) -> None:
    path = shared_data / "cog.tif"
    tile = tiles_over(path, 7)[5]
    image = read_tile(path, tile, bands=[1])
    assert image.data.shape == (1, 256, 256) and image.data.dtype == np.uint16
    with pytest.raises(SourceError, match=r"cog\.tif"):
        read_tile(path, tile, bands=[2])


def test_source_info(aerial: Path, naip: Path) -> None:
    info = source_info(aerial)
    assert (info.count, info.dtype, info.crs, info.tiled) == (3, "uint8", "EPSG:3857", True)
    assert info.overviews == (2, 4, 8, 16, 32, 64) and info.mask == "mask"
    w, s, e, n = info.bounds_lonlat
    assert 128.655 < w < e < 128.661 and 37.666 < s < n < 37.671
    assert source_info(naip).mask == "nodata"


def test_overviews_used_when_zoomed_out(aerial: Path) -> None:
    with TileReader(aerial) as reader:
        assert reader._dataset_for(18).width == 1024  # native: z18 pixels
        assert reader._dataset_for(17).width == 512  # overview 2
        assert reader._dataset_for(14).width == 64  # overview 16
    _data, mask = rio_tiler_tile(aerial, tiles_over(aerial, 15)[0])
    image = read_tile(aerial, tiles_over(aerial, 15)[0])
    np.testing.assert_array_equal(image.mask, mask)


# -- every mask kind, dtype, CRS and layout ---------------------------------------------------


@pytest.mark.parametrize("mask", ["nodata", "alpha", "internal", "external"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_mask_kinds_on_grid(tmp_path: Path, mask: str, dtype: str) -> None:
    path = make_raster(tmp_path, dtype=dtype, count=3, mask=mask)
    expected_mask = np.ones((256, 256), dtype=bool)
    expected_mask[:, :128] = False
    image = read_tile(path, ONGRID)
    assert image.data.shape == (3, 256, 256) and image.data.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(image.mask, expected_mask)
    expected = pattern(3, 256, 256, dtype)
    np.testing.assert_array_equal(image.data[:, expected_mask], expected[:, expected_mask])
    _data, rt_mask = rio_tiler_tile(path, ONGRID)
    np.testing.assert_array_equal(image.mask, rt_mask)
    # the pack read of all four z16 tiles agrees with the single read
    quad = [Tile(ONGRID.x + dx, ONGRID.y + dy, 16) for dy in (0, 1) for dx in (0, 1)]
    packed = dict(read_tiles(path, quad))
    np.testing.assert_array_equal(packed[ONGRID].data, image.data)
    np.testing.assert_array_equal(packed[ONGRID].mask, image.mask)
    assert packed[quad[1]].mask.all()


def test_float32_nan_nodata(tmp_path: Path) -> None:
    path = make_raster(tmp_path, dtype="float32", count=1, mask="nodata", nodata=float("nan"))
    image = read_tile(path, ONGRID)
    assert image.data.dtype == np.float32
    assert not image.mask[:, :128].any() and image.mask[:, 128:].all()


def test_uint16_multiband_default_excludes_alpha(tmp_path: Path) -> None:
    path = make_raster(tmp_path, dtype="uint16", count=4, mask="alpha")
    assert source_info(path).count == 5
    image = read_tile(path, ONGRID)
    assert image.data.shape == (4, 256, 256) and image.data.dtype == np.uint16
    image = read_tile(path, ONGRID, bands=[4, 2])
    np.testing.assert_array_equal(
        image.data[:, 0, 200], pattern(4, 1, 256, "uint16")[[3, 1], 0, 200]
    )


def test_strip_layout_warns_and_reads(tmp_path: Path) -> None:
    strip = make_raster(tmp_path, "strip.tif", tiled=False, overviews=False, mask="nodata")
    tiled = make_raster(tmp_path, "tiled.tif", mask="nodata")
    assert not source_info(strip).tiled
    with pytest.warns(SlowSourceWarning, match="strip"):
        image = read_tile(strip, ONGRID)
    np.testing.assert_array_equal(image.data, read_tile(tiled, ONGRID).data)


@pytest.mark.parametrize("place", ["EPSG:4326", "UTM"])
def test_other_crs_near_rio_tiler(tmp_path: Path, place: str) -> None:
    path = make_raster(tmp_path, place=place, mask="internal", count=3)
    tiles = tiles_over(path, 16)
    assert tiles
    for tile, image in read_tiles(path, tiles):
        data, mask = rio_tiler_tile(path, tile)
        assert (image.mask != mask).mean() < 0.005
        assert ((image.data != data).any(axis=0) & mask & image.mask).mean() < 0.05


@pytest.mark.parametrize("place", ["ANTIMERIDIAN", "ANTIMERIDIAN_UTM"])
def test_antimeridian(tmp_path: Path, place: str) -> None:
    path = make_raster(tmp_path, place=place, mask="none", count=1)
    w, s, e, n = source_footprint_lonlat(path)
    assert w > e and 179 < w < 180 and -180 < e < -179
    z = 14
    west_side = list(mercantile.tiles(w, s, 180.0, n, z))
    east_side = list(mercantile.tiles(-180.0, s, e, n, z))
    got = dict(read_tiles(path, west_side + east_side))
    assert any(got[t].mask.any() for t in west_side)
    assert any(got[t].mask.any() for t in east_side)
    # pixels meet at the antimeridian: edge columns on both sides are valid on the same rows
    last = (1 << z) - 1
    for west_tile in (t for t in west_side if t.x == last):
        east_tile = Tile(0, west_tile.y, z)
        rows = got[west_tile].mask[:, -1] & got[east_tile].mask[:, 0]
        assert rows.any() == got[west_tile].mask.any()
    assert any(got[t].mask[:, -1].any() for t in west_side if t.x == last)


def test_tile_outside_is_empty_not_an_error(aerial: Path, tmp_path: Path) -> None:
    far = Tile(0, 0, 18)
    for path in (aerial, make_raster(tmp_path, mask="nodata")):
        image = read_tile(path, far)
        assert not image.mask.any() and image.is_empty
        assert image.data.shape[1:] == (256, 256)
    # one tile outside among tiles inside, in the same pack window
    inside = tiles_over(aerial, 18)[0]
    neighbour = Tile(inside.x + 7, inside.y, 18)
    got = dict(read_tiles(aerial, [inside, neighbour]))
    assert got[inside].mask.any() and not got[neighbour].mask.any()
    assert not got[neighbour].data.any()


def test_source_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.tif"
    with pytest.raises(SourceError, match=r"missing\.tif"):
        list(read_tiles(missing, [ONGRID]))
    text = tmp_path / "notes.txt"
    text.write_text("not a raster\n")
    with pytest.raises(SourceError, match=r"notes\.txt") as info:
        read_tile(text, ONGRID)
    assert "\n" not in str(info.value)
    with pytest.raises(SourceError, match=r"missing\.tif"):
        source_info(missing)


def test_invalid_tile_rejected(aerial: Path) -> None:
    with pytest.raises(InvalidTileError):
        list(read_tiles(aerial, [(4, 0, 2)]))


# -- memory on a 40,000 x 40,000 px COG ---------------------------------------------------------


class PeakRSS:
    """Samples this process's resident memory in a thread (GDAL's allocations included)."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def big_cog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_big_cog(tmp_path_factory.mktemp("big"))


@pytest.mark.parametrize(
    ("zoom", "expected"),
    [(15, (300, 600)), (18, (24_000, 25_000))],  # overview 8; every full-resolution tile
)
def test_big_cog_memory_bounded(big_cog: Path, zoom: int, expected: tuple[int, int]) -> None:
    with rasterio.open(big_cog) as src:
        assert src.shape == (40_000, 40_000)
    tiles = tiles_over(big_cog, zoom)
    assert expected[0] < len(tiles) < expected[1]
    valid = 0
    with PeakRSS() as rss:
        for _, image in read_tiles(big_cog, tiles):
            valid += int(image.mask.any())
    assert valid > 10  # the written diagonal blocks
    growth_mb = (rss.peak - rss.start) / 2**20
    assert growth_mb < 300, f"peak RSS grew by {growth_mb:.0f} MB"


def test_big_cog_full_resolution_corner(big_cog: Path) -> None:
    tile = Tile(218000, 100000, 18)  # the raster's first tile, written, on-grid
    image = read_tile(big_cog, tile)
    np.testing.assert_array_equal(image.data, pattern(3, 256, 256, "uint8"))
    assert image.mask.all()


# -- GDAL settings ----------------------------------------------------------------------------


def test_gdal_options_local_keeps_sidecars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GDAL_DISABLE_READDIR_ON_OPEN", raising=False)
    assert "GDAL_DISABLE_READDIR_ON_OPEN" not in gdal_options("/data/a.tif")
    assert gdal_options("s3://b/a.tif")["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    assert "CPL_VSIL_CURL_ALLOWED_EXTENSIONS" not in gdal_options("https://host/image")
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "9")
    assert "GDAL_HTTP_MAX_RETRY" not in gdal_options("s3://b/a.tif")  # the user's value wins


def test_s3_endpoint_from_sdk_variables() -> None:
    env = {"AWS_ENDPOINT_URL_S3": "https://minio.local:9000/"}
    assert s3_endpoint_options(env) == {
        "AWS_S3_ENDPOINT": "minio.local:9000",
        "AWS_HTTPS": "YES",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }
    assert s3_endpoint_options({"AWS_S3_ENDPOINT": "x", "AWS_ENDPOINT_URL": "http://y"}) == {}
    assert s3_endpoint_options({}) == {}
    assert gdal_path("s3://b/k.tif") == "/vsis3/b/k.tif"


# -- remote sources -----------------------------------------------------------------------------


def _same_as_local(source: str, aerial: Path) -> None:
    tiles = tiles_over(aerial, 19)
    local = dict(read_tiles(aerial, tiles))
    remote = dict(read_tiles(source, tiles))
    assert set(remote) == set(tiles)
    for tile in tiles:
        np.testing.assert_array_equal(remote[tile].data, local[tile].data)
        np.testing.assert_array_equal(remote[tile].mask, local[tile].mask)


def test_s3_source(bucket: str, aerial: Path) -> None:
    source = f"s3://{bucket}/aerial.tif"
    _same_as_local(source, aerial)
    assert source_info(source).count == 3
    with pytest.raises(SourceError, match=r"nothere\.tif") as missing:
        read_tile(f"s3://{bucket}/nothere.tif", ONGRID)
    assert missing.value.permanent  # a 404 never heals: record it, do not retry


@pytest.fixture
def failing_server() -> Iterator[str]:
    """A local HTTP server that answers every request 503, like an overloaded origin."""

    class Busy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(503, "Slow Down")

        do_HEAD = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_unreachable_remote_source_is_transient(
    failing_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")  # the user's setting wins over ours
    with pytest.raises(SourceUnavailable, match="503") as busy:
        read_tile(f"{failing_server}/aerial.tif", ONGRID)
    assert not busy.value.permanent  # the queue must deliver the message again
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(SourceUnavailable, match="connect"):
        read_tile(f"http://127.0.0.1:{port}/aerial.tif", ONGRID)


def test_http_range_source(bucket: str, moto_server: str, aerial: Path) -> None:
    _same_as_local(f"{moto_server}/{bucket}/aerial.tif", aerial)


def test_cached_reader_is_reused_per_thread_and_evicts_lru(aerial: Path, naip: Path) -> None:
    clear_reader_cache()
    first = cached_reader(aerial)
    assert cached_reader(aerial) is first
    assert cached_reader(aerial, bands=[1]) is not first
    other: list[TileReader] = []
    thread = threading.Thread(target=lambda: other.append(cached_reader(aerial)))
    thread.start()
    thread.join()
    assert other[0] is not first  # readers are not thread-safe: one per thread
    for i in range(READER_CACHE_SIZE):
        cached_reader(naip, size=64 + i)
    assert first._dataset.closed  # least recently used, closed on eviction
    clear_reader_cache()
