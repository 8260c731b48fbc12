"""COG reads from S3 through GDAL's ``/vsis3/``, as the worker Lambda does them.

moto stands in for S3, behind a small counting forwarder: GDAL talks to the forwarder
(``AWS_ENDPOINT_URL`` points at it, and :mod:`chipscale.sources.gdal_env` derives GDAL's S3 settings
from that variable, as in the Lambda), which passes each request on to moto and records its
``Range`` header and the bytes of the answer. That proves the reader fetches byte ranges of
the COG (header, then the blocks a tile needs), not the whole object.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from cogs import make_mosaic_cog
from mercantile import Tile

from chipscale.errors import SourceError, SourceUnavailable
from chipscale.sources import (
    cached_reader,
    clear_reader_cache,
    read_tile,
    read_tiles,
)
from chipscale.sources.cog import TileReader
from chipscale.sources.footprint import cover

#: Headers that belong to one connection, not to the request: never forwarded.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "upgrade",
    "http2-settings",
    "transfer-encoding",
    "proxy-connection",
    "te",
    "trailer",
}


@dataclass(frozen=True, slots=True)
class Seen:
    """One request the forwarder passed on."""

    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int


class CountingForwarder:
    """An HTTP forwarder to ``upstream`` (moto) on a fixed loopback port, recording each
    request; ``stop()`` closes the port (connections are refused), ``start()`` reopens it."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def gets(self) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.method == "GET"]

    def clear(self) -> None:
        with self.lock:
            self.seen.clear()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        forwarder = self

        class Forward(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream = http.client.HTTPConnection(*forwarder.upstream, timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                head = self.command == "HEAD"
                seen = Seen(
                    self.command,
                    self.path,
                    self.headers.get("Range"),
                    answer.status,
                    0 if head else len(data),
                )
                with forwarder.lock:  # before answering: the client may look right after
                    forwarder.seen.append(seen)
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in HOP_BY_HOP | {"content-length", "date", "server"}:
                        self.send_header(name, value)
                length_header = answer.getheader("Content-Length", "0") if head else len(data)
                self.send_header("Content-Length", str(length_header))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            do_HEAD = do_GET
            do_PUT = do_GET

        return Forward


@pytest.fixture
def forwarder(moto_server: str) -> Iterator[CountingForwarder]:
    proxy = CountingForwarder(moto_server)
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture
def via_forwarder(
    bucket: str, forwarder: CountingForwarder, monkeypatch: pytest.MonkeyPatch
) -> CountingForwarder:
    """GDAL pointed at moto through the forwarder, from the environment as in the Lambda."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", forwarder.url)
    clear_reader_cache()
    return forwarder


@pytest.fixture(scope="module")
def mosaic(aerial: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4096 x 4096 px JPEG COG (512 px blocks, overviews) of the real aerial image tiled
    4 x 4: large enough beside one tile's blocks to show what a range read saves."""
    return make_mosaic_cog(aerial, tmp_path_factory.mktemp("mosaic") / "mosaic.tif")


def upload(moto_server: str, bucket: str, path: Path, key: str) -> str:
    import boto3

    boto3.client("s3", endpoint_url=moto_server).upload_file(str(path), bucket, key)
    return f"s3://{bucket}/{key}"


def only_ranges(forwarder: CountingForwarder) -> list[Seen]:
    gets = forwarder.gets()
    assert gets, "GDAL sent nothing through the forwarder"
    assert all(seen.range and seen.range.startswith("bytes=") for seen in gets), gets
    assert all(seen.status == 206 for seen in gets), gets
    return gets


# -- range requests ------------------------------------------------------------------------------


def test_one_tile_reads_ranges_not_the_file(
    via_forwarder: CountingForwarder, bucket: str, aerial: Path
) -> None:
    tile = list(cover(19, source=str(aerial)))[27]
    reader = cached_reader(f"s3://{bucket}/aerial.tif")  # what process_pack does
    assert isinstance(reader, TileReader)
    image = dict(reader.read([tile]))[tile]
    clear_reader_cache()
    gets = only_ranges(via_forwarder)
    fetched = sum(seen.body_bytes for seen in gets)
    size = aerial.stat().st_size
    assert fetched < size / 2, f"{fetched} of {size} bytes for one tile"
    expected = read_tile(aerial, tile)
    np.testing.assert_array_equal(image.data, expected.data)
    np.testing.assert_array_equal(image.mask, expected.mask)


def test_large_cog_one_tile_is_a_small_fraction(
    via_forwarder: CountingForwarder, moto_server: str, bucket: str, mosaic: Path
) -> None:
    source = upload(moto_server, bucket, mosaic, "mosaic.tif")
    tiles = list(cover(19, source=str(mosaic)))
    tile = tiles[len(tiles) // 2 + 5]
    image = read_tile(source, tile)
    gets = only_ranges(via_forwarder)
    fetched = sum(seen.body_bytes for seen in gets)
    size = mosaic.stat().st_size
    assert fetched < size * 0.05, f"{fetched} of {size} bytes for one tile ({len(gets)} GETs)"
    expected = read_tile(mosaic, tile)
    np.testing.assert_array_equal(image.data, expected.data)
    np.testing.assert_array_equal(image.mask, expected.mask)


def test_a_pack_reads_its_blocks_only(
    via_forwarder: CountingForwarder, moto_server: str, bucket: str, mosaic: Path
) -> None:
    source = upload(moto_server, bucket, mosaic, "pack.tif")
    corner = next(iter(cover(18, source=str(mosaic))))
    pack = [Tile(corner.x + dx, corner.y + dy, 18) for dy in range(2) for dx in range(2)]
    got = dict(read_tiles(source, pack))
    gets = only_ranges(via_forwarder)
    fetched = sum(seen.body_bytes for seen in gets)
    size = mosaic.stat().st_size
    # 4 tiles of 256 px at the native zoom: one 512 px block, plus the header
    assert fetched < size * 0.05, f"{fetched} of {size} bytes for a pack of 4 tiles"
    local = dict(read_tiles(mosaic, pack))
    for tile in pack:
        np.testing.assert_array_equal(got[tile].data, local[tile].data)


# -- failures -------------------------------------------------------------------------------------


def test_missing_key_is_permanent(via_forwarder: CountingForwarder, bucket: str) -> None:
    with pytest.raises(SourceError, match=r"nothere\.tif") as error:
        read_tile(f"s3://{bucket}/nothere.tif", Tile(0, 0, 1))
    assert error.value.permanent  # a 404 never heals: record it, do not retry
    assert not isinstance(error.value, SourceUnavailable)


def test_unreachable_endpoint_is_transient(
    bucket: str, monkeypatch: pytest.MonkeyPatch, aerial: Path
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    tile = next(iter(cover(19, source=str(aerial))))
    for _attempt in range(3):  # the queue's redeliveries meet the same answer
        with pytest.raises(SourceUnavailable, match=r"aerial\.tif") as error:
            read_tile(f"s3://{bucket}/aerial.tif", tile)
        assert not error.value.permanent


def test_outage_then_recovery(via_forwarder: CountingForwarder, bucket: str, aerial: Path) -> None:
    """GDAL remembers a failed open of a path for the life of the process; the reader must
    not turn the redelivered message into permanent errors, and must read once S3 is back."""
    source = f"s3://{bucket}/aerial.tif"
    tile = list(cover(19, source=str(aerial)))[9]
    via_forwarder.stop()
    for _attempt in range(2):
        with pytest.raises(SourceUnavailable):
            read_tile(source, tile)
    via_forwarder.start()
    image = read_tile(source, tile)
    np.testing.assert_array_equal(image.data, read_tile(aerial, tile).data)
    assert read_tile(source, tile).mask.all()  # and the normal, cached path works again
