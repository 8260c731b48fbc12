"""XYZ tile endpoints: a real HTTP server on loopback serving real tiles of the aerial COG.

The server renders each tile with the COG reader (``read_tile``) and encodes it as a real
PNG, JPEG, WebP or GeoTIFF with rasterio; other routes answer what tile servers answer on a
bad day (404 outside the coverage, 5xx, 429 with Retry-After, 403, an HTML page with 200, a
hang). A tile the COG reader finds empty is a 404, as a tile server has no imagery there.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mercantile
import numpy as np
import pytest
from mercantile import Tile
from rasterio.io import MemoryFile

from chipscale.errors import SourceError, SourceUnavailable
from chipscale.models.predictors import open_predictor
from chipscale.pipeline.messages import PackMessage
from chipscale.pipeline.process import process_pack
from chipscale.results import open_store
from chipscale.sources import cached_reader, clear_reader_cache, read_tile, read_tiles
from chipscale.sources.footprint import cover
from chipscale.sources.xyz import TileEndpointReader, is_tile_endpoint, redact, tile_url
from chipscale.values import ImageData

FAR_AWAY = Tile(0, 0, 19)  # a valid tile that misses the image: the server answers 404

# The server encodes PNGs with rasterio, which warns that they have no geotransform.
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def encode(pixels: np.ndarray, driver: str, **options: object) -> bytes:
    """``pixels`` (bands, h, w) as an image file of ``driver``, with rasterio."""
    count, height, width = pixels.shape
    with MemoryFile() as memfile:
        with memfile.open(
            driver=driver,
            width=width,
            height=height,
            count=count,
            dtype=pixels.dtype.name,
            **options,
        ) as dataset:
            dataset.write(pixels)
        return memfile.read()


def rgba(image: ImageData) -> np.ndarray:
    """RGB plus the validity mask as alpha: what a tile server renders from a COG."""
    alpha = np.where(image.mask, 255, 0).astype(np.uint8)[np.newaxis]
    return np.concatenate([image.data, alpha])


def gray_uint16() -> np.ndarray:
    """One uint16 band, nodata 0 on the left half."""
    rows, cols = np.mgrid[0:256, 0:256]
    data = (rows * 200 + cols * 3 + 1).astype(np.uint16)
    data[:, :128] = 0
    return data[np.newaxis]


def palette_png() -> bytes:
    """A paletted PNG (PNG8): index 0 transparent, 1 red, 2 half-transparent green."""
    indexes = (np.arange(256 * 256) % 3).astype(np.uint8).reshape(1, 256, 256)
    with MemoryFile() as memfile:
        with memfile.open(driver="PNG", width=256, height=256, count=1, dtype="uint8") as ds:
            ds.write(indexes)
            ds.write_colormap(1, {0: (0, 0, 0, 0), 1: (255, 0, 0, 255), 2: (0, 255, 0, 128)})
        return memfile.read()


class TileServer:
    """The state of the loopback tile server: what it saw, and its rendered tiles."""

    def __init__(self, aerial: Path, naip: Path) -> None:
        self.aerial = aerial
        self.naip = naip
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._cache: dict[tuple[str, Tile], bytes | None] = {}
        self.url = ""

    def render(self, kind: str, tile: Tile) -> bytes | None:
        """The body of ``tile`` in the format of ``kind``; None where the COG has nothing."""
        key = (kind, tile)
        with self.lock:
            if key in self._cache:
                return self._cache[key]
        size = 512 if kind == "big" else 256
        if kind == "naip":  # reprojected, with nodata edges: partly transparent tiles
            image = read_tile(self.naip, tile, bands=[1, 2, 3])
        else:
            image = read_tile(self.aerial, tile, size=size)
        body: bytes | None = None
        if not image.is_empty:
            if kind == "jpeg":
                body = encode(image.data, "JPEG", quality=95)
            elif kind == "webp":
                body = encode(rgba(image), "WEBP", lossless=True)
            elif kind == "rgb":
                body = encode(image.data, "PNG")
            else:
                body = encode(rgba(image), "PNG")
        with self.lock:
            self._cache[key] = body
        return body

    def template(self, route: str, suffix: str = ".png") -> str:
        return f"{self.url}/{route}/{{z}}/{{x}}/{{y}}{suffix}"


def make_handler(state: TileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real tile servers
        disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms stall

        def setup(self) -> None:
            super().setup()
            with state.lock:
                state.connections += 1

        def log_message(self, *args: object) -> None:
            pass

        def answer(
            self,
            status: int,
            body: bytes = b"",
            content_type: str = "image/png",
            headers: dict[str, str] | None = None,
        ) -> None:
            self.send_response(status)
            if status != 204:
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if status != 204:
                self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            with state.lock:
                state.requests[path] += 1
                seen = state.requests[path]
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                self.route(path, seen)
            finally:
                with state.lock:
                    state.in_flight -= 1

        def route(self, path: str, seen: int) -> None:
            route, z, x, y = path.strip("/").split("/")
            tile = Tile(int(x), int(y.split(".")[0]), int(z))
            if route == "tms":  # y counted from the south
                tile = Tile(tile.x, (1 << tile.z) - 1 - tile.y, tile.z)
            if route == "missing":
                return self.answer(404, b"<html>no tile here</html>", "text/html")
            if route == "nocontent":
                return self.answer(204)
            if route == "forbidden":
                return self.answer(403, b"Invalid access token", "text/plain")
            if route == "gone":
                return self.answer(410)
            if route == "html":
                return self.answer(200, b"<html><body>Service notice</body></html>", "text/html")
            if route == "garbage":
                return self.answer(200, b"\x00\x01 not an image", "application/octet-stream")
            if route == "down":
                return self.answer(503, b"upstream unavailable", "text/plain")
            if route == "flaky" and seen == 1:
                return self.answer(500, b"oops", "text/plain")
            if route == "throttle" and seen == 1:
                return self.answer(429, b"slow down", "text/plain", {"Retry-After": "2"})
            if route == "banned":
                return self.answer(
                    429, b"come back tomorrow", "text/plain", {"Retry-After": "86400"}
                )
            if route == "slow":
                time.sleep(2.0)
            if route == "delay":
                time.sleep(0.1)
            if route == "sparse" and tile.x % 2:
                return self.answer(404)
            if route in ("tiff", "sparse"):
                return self.answer(200, encode(gray_uint16(), "GTiff", nodata=0), "image/tiff")
            if route == "palette":
                return self.answer(200, palette_png())
            if route == "float":  # float32 without nodata: a NaN half, one inf pixel
                pixels = gray_uint16().astype(np.float32)
                pixels[:, :, :128] = np.nan
                pixels[:, 0, 200] = np.inf
                return self.answer(200, encode(pixels, "GTiff"), "image/tiff")
            kind = route if route in ("jpeg", "webp", "big", "rgb", "naip") else "png"
            body = state.render(kind, tile)
            if body is None:
                return self.answer(404, b"Tile not found", "text/plain")
            content_type = {"jpeg": "image/jpeg", "webp": "image/webp"}.get(kind, "image/png")
            return self.answer(200, body, content_type)

    return Handler


@pytest.fixture(scope="module")
def tile_server(aerial: Path, naip: Path) -> Iterator[TileServer]:
    """A ThreadingHTTPServer on 127.0.0.1 serving the routes of :func:`make_handler`."""
    state = TileServer(aerial, naip)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def z19_tiles(aerial: Path) -> list[Tile]:
    return list(cover(19, source=str(aerial)))


def no_sleep(seconds: float) -> None:
    pass


# -- templates -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("https://tiles.example.com/{z}/{x}/{y}.png", True),
        ("http://127.0.0.1:8000/tiles/{z}/{x}/{y}@2x.jpg?token=abc", True),
        ("HTTPS://h/{z}/{x}/{-y}.png", True),
        ("https://h/{z}/{x}.png", False),
        ("https://example.com/image.tif", False),
        ("s3://bucket/{z}/{x}/{y}.png", False),
        ("/data/{z}/{x}/{y}.png", False),
        ("https://h/{z}/{y}/{x}", True),
    ],
)
def test_is_tile_endpoint(source: str, expected: bool) -> None:
    assert is_tile_endpoint(source) is expected


def test_tile_url_and_redact() -> None:
    tile = Tile(3, 1, 2)
    assert tile_url("https://h/{z}/{x}/{y}.png?k=1", tile) == "https://h/2/3/1.png?k=1"
    assert tile_url("https://h/{z}/{x}/{-y}.png", tile) == "https://h/2/3/2.png"
    assert redact("https://u:p@h:81/2/3/1.png?key=SECRET") == "https://h:81/2/3/1.png?..."
    assert redact("https://h/2/3/1.png") == "https://h/2/3/1.png"


def test_unsupported_placeholder_is_refused() -> None:
    with pytest.raises(SourceError, match=r"\{s\}"):
        TileEndpointReader("https://{s}.tile.example.com/{z}/{x}/{y}.png")


# -- pixels ----------------------------------------------------------------------------------


def test_png_tiles_equal_the_cog(tile_server: TileServer, aerial: Path) -> None:
    tiles = z19_tiles(aerial)
    cog = dict(read_tiles(aerial, tiles))
    got = dict(read_tiles(tile_server.template("png"), tiles))
    assert list(got) == tiles  # input order
    for tile in tiles:
        assert got[tile].data.dtype == np.uint8 and got[tile].data.shape == (3, 256, 256)
        np.testing.assert_array_equal(got[tile].mask, cog[tile].mask)
        np.testing.assert_array_equal(got[tile].data, cog[tile].data)


def test_alpha_band_is_the_mask(tile_server: TileServer, naip: Path) -> None:
    tiles = list(cover(15, source=str(naip)))
    # the server renders one tile at a time: compare with single reads (a pack read of a
    # reprojected source differs in a few nearest-neighbour ties, see test_tiles.py)
    cog = {tile: read_tile(naip, tile, bands=[1, 2, 3]) for tile in tiles}
    got = dict(read_tiles(tile_server.template("naip"), tiles))
    partial = [t for t in tiles if cog[t].mask.any() and not cog[t].mask.all()]
    assert partial  # tiles on the edge of the reprojected image
    for tile in tiles:
        np.testing.assert_array_equal(got[tile].mask, cog[tile].mask)
        np.testing.assert_array_equal(got[tile].data, cog[tile].data)


def test_webp_lossless_with_alpha(tile_server: TileServer, aerial: Path) -> None:
    tiles = z19_tiles(aerial)[:12]
    cog = dict(read_tiles(aerial, tiles))
    for tile, image in read_tiles(tile_server.template("webp", ".webp"), tiles):
        np.testing.assert_array_equal(image.mask, cog[tile].mask)
        valid = image.mask  # WebP may rewrite colours under alpha 0
        np.testing.assert_array_equal(image.data[:, valid], cog[tile].data[:, valid])


def test_jpeg_is_close_and_fully_valid(tile_server: TileServer, aerial: Path) -> None:
    tile = z19_tiles(aerial)[len(z19_tiles(aerial)) // 2]
    expected = read_tile(aerial, tile)
    assert expected.mask.all()
    image = read_tile(tile_server.template("jpeg", ".jpg"), tile)
    assert image.mask.all()  # a JPEG has no alpha: every pixel counts
    error = np.abs(image.data.astype(int) - expected.data.astype(int)).mean()
    assert error < 3.0, f"mean absolute JPEG error {error:.2f}"


def test_png_without_alpha_is_fully_valid(tile_server: TileServer, aerial: Path) -> None:
    tile = z19_tiles(aerial)[0]
    image = read_tile(tile_server.template("rgb"), tile)
    assert image.mask.all()
    np.testing.assert_array_equal(image.data, read_tile(aerial, tile).data)


def test_512_px_tiles_resized_to_256(tile_server: TileServer, aerial: Path) -> None:
    tiles = list(cover(18, source=str(aerial)))  # z18: the COG's native resolution
    big = dict(read_tiles(tile_server.template("big"), tiles, size=256))
    for tile in tiles:
        expected = read_tile(aerial, tile)
        assert big[tile].data.shape == (3, 256, 256)
        np.testing.assert_array_equal(big[tile].mask, expected.mask)
        np.testing.assert_array_equal(big[tile].data, expected.data)
    averaged = read_tile(tile_server.template("big"), tiles[0], resampling="average")
    assert averaged.data.shape == (3, 256, 256)


def test_bands_selection(tile_server: TileServer, aerial: Path) -> None:
    tile = z19_tiles(aerial)[3]
    image = read_tile(tile_server.template("png"), tile, bands=[3, 1])
    np.testing.assert_array_equal(image.data, read_tile(aerial, tile).data[[2, 0]])
    with pytest.raises(SourceError, match=r"bands 1\.\.4; requested \[5\]"):
        read_tile(tile_server.template("png"), tile, bands=[5])


def test_geotiff_uint16_with_nodata(tile_server: TileServer) -> None:
    image = read_tile(tile_server.template("tiff", ".tif"), Tile(1, 1, 2))
    assert image.data.dtype == np.uint16 and image.data.shape == (1, 256, 256)
    assert not image.mask[:, :128].any() and image.mask[:, 128:].all()
    np.testing.assert_array_equal(image.data, gray_uint16())


def test_non_finite_pixels_of_a_float_tile_are_invalid(tile_server: TileServer) -> None:
    # As from a COG: NaN and inf are no data, set to 0, and never reach a model.
    image = read_tile(tile_server.template("float", ".tif"), Tile(1, 1, 2))
    assert image.data.dtype == np.float32 and np.isfinite(image.data).all()
    assert not image.mask[:, :128].any() and not image.mask[0, 200]
    assert image.mask[1:, 128:].all()
    assert (image.data[:, :, :128] == 0).all()


def test_paletted_png_expanded_to_rgb(tile_server: TileServer) -> None:
    image = read_tile(tile_server.template("palette"), Tile(1, 1, 2))
    assert image.data.shape == (3, 256, 256) and image.data.dtype == np.uint8
    flat = image.data.reshape(3, -1)
    index = np.arange(256 * 256) % 3
    assert (flat[:, index == 1].T == (255, 0, 0)).all()
    assert (flat[:, index == 2].T == (0, 255, 0)).all()
    np.testing.assert_array_equal(image.mask.reshape(-1), index != 0)


def test_tms_template(tile_server: TileServer, aerial: Path) -> None:
    tile = z19_tiles(aerial)[7]
    tms = read_tile(f"{tile_server.url}/tms/{{z}}/{{x}}/{{-y}}.png", tile)
    np.testing.assert_array_equal(tms.data, read_tile(aerial, tile).data)


# -- answers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["missing", "nocontent"])
def test_404_and_204_are_empty_tiles(tile_server: TileServer, aerial: Path, route: str) -> None:
    image = read_tile(tile_server.template(route), z19_tiles(aerial)[0])
    assert image.is_empty and image.data.shape == (3, 256, 256)
    assert image.data.dtype == np.uint8 and not image.data.any()


def test_empty_tile_takes_the_shape_of_the_others(tile_server: TileServer) -> None:
    tiles = [Tile(1, 1, 2), Tile(2, 1, 2)]  # the server has imagery for even x only
    got = dict(read_tiles(tile_server.template("sparse", ".tif"), tiles))
    assert got[tiles[0]].is_empty and not got[tiles[1]].is_empty
    assert got[tiles[0]].data.shape == (1, 256, 256) and got[tiles[0]].data.dtype == np.uint16


def test_flaky_500_is_retried(tile_server: TileServer, aerial: Path) -> None:
    tile = z19_tiles(aerial)[1]
    with TileEndpointReader(tile_server.template("flaky"), sleep=no_sleep) as reader:
        image = reader.tile(tile)
    np.testing.assert_array_equal(image.data, read_tile(aerial, tile).data)
    assert tile_server.requests[f"/flaky/{tile.z}/{tile.x}/{tile.y}.png"] == 2


def test_retry_after_is_honoured(tile_server: TileServer, aerial: Path) -> None:
    slept: list[float] = []
    with TileEndpointReader(tile_server.template("throttle"), sleep=slept.append) as reader:
        assert not reader.tile(z19_tiles(aerial)[2]).is_empty
    assert slept and slept[0] >= 2.0


def test_retry_after_beyond_the_cap_gives_up_at_once(tile_server: TileServer) -> None:
    tile = Tile(5, 5, 5)
    with (
        TileEndpointReader(tile_server.template("banned"), sleep=no_sleep) as reader,
        pytest.raises(SourceUnavailable, match="86400"),
    ):
        reader.tile(tile)
    assert tile_server.requests["/banned/5/5/5.png"] == 1


def test_always_5xx_is_transient(tile_server: TileServer) -> None:
    tile = Tile(6, 6, 6)
    with (
        TileEndpointReader(tile_server.template("down"), retries=2, sleep=no_sleep) as reader,
        pytest.raises(SourceUnavailable, match=r"after 3 attempts: HTTP 503") as error,
    ):
        reader.tile(tile)
    assert not error.value.permanent
    assert tile_server.requests["/down/6/6/6.png"] == 3


def test_403_is_permanent_and_hides_the_query(tile_server: TileServer) -> None:
    source = tile_server.template("forbidden") + "?access_token=SECRET"
    with pytest.raises(SourceError, match=r"HTTP 403: Invalid access token") as error:
        read_tile(source, Tile(7, 7, 7))
    assert error.value.permanent
    assert "/forbidden/7/7/7.png" in str(error.value)
    assert "SECRET" not in str(error.value)
    with pytest.raises(SourceError, match="HTTP 410"):
        read_tile(tile_server.template("gone"), Tile(7, 7, 7))


@pytest.mark.parametrize(("route", "reason"), [("html", "text/html"), ("garbage", "decode")])
def test_200_that_is_not_an_image_is_permanent(
    tile_server: TileServer, route: str, reason: str
) -> None:
    with pytest.raises(SourceError, match=reason) as error:
        read_tile(tile_server.template(route), Tile(8, 8, 8))
    assert error.value.permanent and "not an image" in str(error.value)


def test_timeout_is_transient(tile_server: TileServer) -> None:
    with (
        TileEndpointReader(
            tile_server.template("slow"), read_timeout=0.2, retries=1, sleep=no_sleep
        ) as reader,
        pytest.raises(SourceUnavailable, match=r"(?i)timed out") as error,
    ):
        reader.tile(Tile(9, 9, 9))
    assert not error.value.permanent


def test_connection_refused_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    with (
        TileEndpointReader(
            f"http://127.0.0.1:{port}/{{z}}/{{x}}/{{y}}.png?key=SECRET", sleep=no_sleep
        ) as reader,
        pytest.raises(SourceUnavailable, match=r"(?i)refused") as error,
    ):
        reader.tile(Tile(1, 1, 1))
    assert "SECRET" not in str(error.value)


# -- connections --------------------------------------------------------------------------------


def test_keep_alive_and_concurrency(tile_server: TileServer, aerial: Path) -> None:
    tiles = [child for tile in z19_tiles(aerial)[:16] for child in mercantile.children(tile)]
    before = tile_server.connections
    with TileEndpointReader(tile_server.template("delay"), concurrency=8) as reader:
        got = dict(reader.read(tiles))
        again = dict(reader.read(tiles[:16]))
    connections = tile_server.connections - before
    assert len(got) == 64 and len(again) == 16
    assert 1 <= connections <= 8, f"{connections} connections for 80 requests"
    # Fetched concurrently, not one after the other (counted at the server, not timed).
    assert tile_server.max_in_flight >= 4


# -- the worker ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor():
    return open_predictor(None)


@pytest.fixture
def store(tmp_path: Path):
    with open_store(f"sqlite:///{tmp_path}/results.db") as store:
        yield store


def test_process_pack_from_an_endpoint_equals_the_cog(
    tile_server: TileServer, aerial: Path, predictor, store
) -> None:
    tiles = (*z19_tiles(aerial)[:40], FAR_AWAY)
    clear_reader_cache()
    endpoint = tile_server.template("png")
    assert isinstance(cached_reader(endpoint), TileEndpointReader)
    from_endpoint = process_pack(
        PackMessage(job="xyz", source=endpoint, tiles=tiles), predictor=predictor, store=store
    )
    from_cog = process_pack(
        PackMessage(job="cog", source=str(aerial), tiles=tiles), predictor=predictor, store=store
    )
    clear_reader_cache()
    assert (from_endpoint.ok, from_endpoint.empty, from_endpoint.error) == (
        from_cog.ok,
        from_cog.empty,
        0,
    )
    assert from_endpoint.ok >= 30
    xyz = {(r.x, r.y): r for r in store.iter_results("xyz")}
    cog = {(r.x, r.y): r for r in store.iter_results("cog")}
    assert xyz[(FAR_AWAY.x, FAR_AWAY.y)].status == "empty"  # the server's 404
    for key, row in cog.items():
        assert (xyz[key].status, xyz[key].output) == (row.status, row.output)


def test_process_pack_endpoint_failures(tile_server: TileServer, predictor, store) -> None:
    tiles = (Tile(10, 10, 10), Tile(11, 10, 10))
    clear_reader_cache()
    down = PackMessage(job="down", source=tile_server.template("down"), tiles=tiles)
    with pytest.raises(SourceUnavailable):
        process_pack(down, predictor=predictor, store=store)
    assert store.counts("down")["total"] == 0  # back to the queue, nothing recorded
    html = PackMessage(job="html", source=tile_server.template("html"), tiles=tiles)
    outcome = process_pack(html, predictor=predictor, store=store)
    clear_reader_cache()
    assert outcome.error == 2  # an error page never reaches the model
    rows = list(store.iter_results("html"))
    assert {(r.x, r.y, r.z) for r in rows} == {(t.x, t.y, t.z) for t in tiles}  # one row each
    assert all(r.status == "error" and "not an image" in r.error for r in rows)
