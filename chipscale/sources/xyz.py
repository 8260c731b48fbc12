"""The XYZ-endpoint adapter of the TileSource port: :class:`TileEndpointReader` reads
web-mercator tiles from a URL template (``https://host/{z}/{x}/{y}.png``) that a tile server
(TiTiler, MapProxy, a CDN of pre-rendered tiles, an imagery provider; what chip-n-scale's
worker read) answers one image per tile. :func:`chipscale.sources.open_tile_source` picks it
for any source for which :func:`is_tile_endpoint` is true.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import urllib3
from mercantile import Tile
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader, MemoryFile

from chipscale import redaction
from chipscale.errors import SourceError, SourceUnavailable, one_line
from chipscale.grid.tilelist import make_tile
from chipscale.retry import RETRY_STATUSES, Backoff, RetryPolicy, RetrySettingsError, retry_after
from chipscale.sources.base import ClosesOnExit
from chipscale.values import ImageData, invalidate_non_finite

log = logging.getLogger(__name__)

#: Requests in flight per reader: a tile is a small round trip, so latency, not bandwidth,
#: bounds a pack; 8 brings a 100-tile pack at 50 ms a tile under a second.
DEFAULT_CONCURRENCY = 8
#: A tile server that has not accepted in 3 s is down; a tile takes well under a second.
DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_READ_TIMEOUT = 10.0
#: Retries per tile, then the pack goes back to the queue (which retries it later).
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 0.25
DEFAULT_BACKOFF_MAX = 4.0
#: The longest ``Retry-After`` waited for; a longer one is left to the queue's redelivery.
DEFAULT_RETRY_AFTER_MAX = 10.0
#: Redirects followed (http to https, a CDN's edge); credentials are dropped across hosts.
MAX_REDIRECTS = 5
#: Tiles fetched per round: bounds memory (64 RGB 256 px tiles are 12 MiB) on long inputs.
CHUNK = 64

#: Answers that mean "no imagery here": the tile is empty.
EMPTY_STATUSES = frozenset({204, 404})
#: Content types that are never an image, whatever the body.
_NOT_IMAGE = ("text/", "application/json", "application/xml", "application/xhtml", "message/")

_HEADERS = {
    # Tile servers' usage policies (OpenStreetMap's, for one) ask clients to identify.
    "User-Agent": "chipscale-tile-reader",
    "Accept": "image/png,image/jpeg,image/webp,image/tiff;q=0.9,*/*;q=0.5",
}
_PLACEHOLDER = re.compile(r"\{(z|x|y|-y)\}")
_ANY_PLACEHOLDER = re.compile(r"\{[^{}/]*\}")
#: rasterio warns on opening any image without a geotransform (every PNG or JPEG tile), and
#: ``warnings.catch_warnings`` swaps process-global state: opens are serialised to keep that
#: safe among the pool's threads. Opening parses a header only; decoding runs in parallel.
_OPEN_LOCK = threading.Lock()


def is_tile_endpoint(source: str | os.PathLike[str]) -> bool:
    """True for an http(s) URL template with ``{z}``, ``{x}`` and ``{y}`` (or ``{-y}``).

    >>> is_tile_endpoint("https://tiles.example.com/{z}/{x}/{y}.png")
    True
    >>> is_tile_endpoint("https://example.com/image.tif")
    False
    """
    text = os.fspath(source)
    if not isinstance(text, str) or not text.lower().startswith(("http://", "https://")):
        return False
    return "{z}" in text and "{x}" in text and ("{y}" in text or "{-y}" in text)


def tile_url(template: str, tile: Tile) -> str:
    """The URL of ``tile`` in ``template``.

    >>> tile_url("https://h/{z}/{x}/{y}.png", Tile(1, 2, 3))
    'https://h/3/1/2.png'
    >>> tile_url("https://h/tms/{z}/{x}/{-y}.png", Tile(1, 2, 3))
    'https://h/tms/3/1/5.png'
    """
    values = {"z": tile.z, "x": tile.x, "y": tile.y, "-y": (1 << tile.z) - 1 - tile.y}
    return _PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), template)


#: ``url`` fit for messages and logs (no user information, no query string): the one
#: redaction of :mod:`chipscale.redaction`.
redact = redaction.redact


@dataclass(frozen=True, slots=True)
class _Decoded:
    """A decoded tile before the reader checks it against the others."""

    data: np.ndarray
    mask: np.ndarray


class _Abandoned(Exception):
    """Another tile of the read failed first: this one stops without a result."""


class TileEndpointReader(ClosesOnExit):
    """Reads tiles from an XYZ tile endpoint.

    Template
        ``{z}``, ``{x}`` and ``{y}`` (XYZ numbering, y down from the north); ``{-y}`` instead of
        ``{y}`` for a TMS endpoint (y up from the south: ``2**z - 1 - y``). Any other placeholder
        (``{s}`` subdomains, ``{q}`` quadkeys, ``{r}``) is refused when the reader is made. Put
        secrets (API keys) in the query string or in ``headers``: error messages and logs show
        the URL without its query string and user information, but with its path.

    What each answer means
        - 200 with an image body (PNG, JPEG, WebP, GeoTIFF: whatever GDAL's drivers decode):
          the tile. A 200 whose body is not an image (a text, HTML, JSON or XML content type, or
          bytes GDAL cannot decode) is :class:`~chipscale.errors.SourceError`: an error page
          served as 200 must never reach the model. A 200 with an empty body is an empty tile.
        - 204 and 404: an empty tile (all-False mask). Tile servers answer 404 where they have
          no imagery (outside the coverage, a zoom they do not render), so 404 is a tile that
          misses the source, as a tile outside a COG is, not an error.
        - 408, 429, 5xx, connection errors and timeouts: retried ``retries`` times with full
          jitter backoff; a ``Retry-After`` (seconds or an HTTP date) is honoured up to
          ``retry_after_max`` seconds, and a longer one ends the retries at once. Still failing:
          :class:`~chipscale.errors.SourceUnavailable` (transient: the queue delivers the message
          again).
        - any other status (401, 403, 410, 3xx after redirects are exhausted...):
          :class:`~chipscale.errors.SourceError` (permanent), naming the status and the URL.
        One failed tile fails the read (its first failure, in completion order, is raised and the
        pack's other requests are abandoned): the reader has no per-tile error to yield, so the
        worker records a permanent failure on every tile of the pack, as for an unreadable COG.

    Pixels
        ``data`` is ``(bands, size, size)`` in the image's dtype (uint8 for PNG/JPEG/WebP,
        anything for GeoTIFF). The validity mask follows ``TileReader``'s order: the
        image's nodata value (a GeoTIFF's: invalid where any selected band equals it), then an
        alpha band, then a mask GDAL derives for the whole image (an internal mask, or a PNG
        ``tRNS`` colour: invalid where every band matches it); otherwise every pixel is valid (a
        JPEG). An alpha band is never data.
        A paletted image (PNG8) is expanded to RGB through its colour table, whose alpha is the
        mask. ``bands`` selects 1-based bands like ``TileReader`` (of the expanded RGB for a
        paletted image); by default every band but alpha.

        Tiles of another size than ``size`` (512 px tiles for a 256 px model) are resampled by
        GDAL while decoding, with ``resampling`` (nearest by default, as ``TileReader``;
        ``average`` gives smoother downsampling); the mask is always resampled nearest. A tile
        that is not square is refused (it is no web-mercator tile).

        An empty tile's data is zeros of the band count and dtype of the tiles this reader has
        decoded (``len(bands)`` if given; 3 bands of uint8 before any tile was decoded).

    Margin
        With ``margin`` m, each tile comes back ``(bands, size + 2m, size + 2m)``: the
        neighbouring tiles (``ceil(m / size)`` rings) are fetched too and the tile's context
        is cropped from them, so the margin holds exactly what those tiles read. A neighbour
        the endpoint has no imagery for (404), or beyond the edge of the world, gives data 0
        and mask False there. Cost: the extra requests of the ring around each chunk (100
        requests for an 8 x 8 block with m <= size, instead of 64).

    Order of results
        Each distinct tile once, in input order. Tiles are fetched ``concurrency`` at a time from
        a thread pool the reader owns (each is a round trip), over one keep-alive connection pool
        (at most ``concurrency`` connections), ``CHUNK`` tiles per round so memory stays bounded
        whatever the length of the input.

    Parameters:

    - ``source``: the URL template;
    - ``size``, ``bands``, ``resampling``, ``margin``: as
      :class:`chipscale.sources.cog.TileReader`;
    - ``concurrency``: requests in flight, and connections kept alive;
    - ``connect_timeout``, ``read_timeout``: seconds, per attempt;
    - ``retries``, ``backoff``, ``backoff_max``: a failed attempt ``k`` (0-based) waits a
      uniformly random time in ``[0, min(backoff_max, backoff * 2**k)]`` (full jitter, so
      many workers do not come back to a recovering server at once), or the server's
      ``Retry-After`` when longer, up to ``retry_after_max``;
    - ``headers``: sent with every request (an API key header, a Referer);
    - ``sleep``, ``rng``: injectable for tests.

    Not thread-safe, like ``TileReader``: one reader per thread
    (:func:`chipscale.sources.cached_reader` keeps one per thread); the reader's own pool runs
    the requests.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        *,
        size: int = 256,
        bands: Sequence[int] | None = None,
        resampling: Resampling | str = Resampling.nearest,
        concurrency: int = DEFAULT_CONCURRENCY,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        retry_after_max: float = DEFAULT_RETRY_AFTER_MAX,
        headers: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        margin: int = 0,
    ) -> None:
        self.source = os.fspath(source)
        self._check_template()
        if size <= 0:
            raise ValueError(f"tile size must be positive, got {size}")
        if margin < 0:
            raise ValueError(f"tile margin must be >= 0, got {margin}")
        self.margin = int(margin)
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1; got {concurrency}")
        self.policy = RetryPolicy.of_retries(retries, backoff, backoff_max, owner="tile reader")
        if retry_after_max < 0:
            raise RetrySettingsError(f"retry_after_max must be >= 0; got {retry_after_max}")
        self.size = size
        self.bands = tuple(int(b) for b in bands) if bands is not None else None
        if self.bands is not None and (not self.bands or min(self.bands) < 1):
            raise SourceError(f"bands must be 1-based band numbers, got {list(self.bands)}")
        self.resampling = (
            Resampling[resampling] if isinstance(resampling, str) else Resampling(resampling)
        )
        self.concurrency = concurrency
        self.retry_after_max = retry_after_max
        self._sleep = sleep
        self._backoff = Backoff(self.policy, rng)
        #: Band count and dtype of the decoded tiles: the shape of empty tiles, and what
        #: every later tile must match (a batch stacks them).
        self._kind: tuple[int, np.dtype] | None = None
        self._http = urllib3.PoolManager(
            num_pools=4,
            headers={**_HEADERS, **(headers or {})},
            maxsize=concurrency,
            block=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        )
        # Only redirects are left to urllib3; every other retry is this reader's, so that it
        # can tell transient from permanent and honour Retry-After with a cap.
        self._redirects = urllib3.Retry(
            total=None, connect=0, read=0, redirect=MAX_REDIRECTS, status=0, other=0
        )
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            concurrency, thread_name_prefix="tile-endpoint"
        )

    def __repr__(self) -> str:
        return f"TileEndpointReader({redact(self.source)!r}, size={self.size})"

    def _check_template(self) -> None:
        if not is_tile_endpoint(self.source):
            raise SourceError(
                f"{redact(self.source)} is not a tile endpoint: expected an http(s) URL "
                "template with {z}, {x} and {y} (or {-y})"
            )
        unknown = sorted(set(_ANY_PLACEHOLDER.findall(_PLACEHOLDER.sub("", self.source))))
        if unknown:
            raise SourceError(
                f"tile endpoint {redact(self.source)} has unsupported placeholders "
                f"{', '.join(unknown)}: only {{z}}, {{x}}, {{y}} and {{-y}} are filled in"
            )

    # -- reading --------------------------------------------------------------------------

    def read(self, tiles: Iterable[Tile | Sequence[int]]) -> Iterator[tuple[Tile, ImageData]]:
        """Yield ``(tile, ImageData)`` for every distinct tile, in input order."""
        unique = list(dict.fromkeys(make_tile(*t) for t in tiles))
        for start in range(0, len(unique), CHUNK):
            chunk = unique[start : start + CHUNK]
            wanted = list(dict.fromkeys(n for t in chunk for n in self._neighbourhood(t)))
            decoded = self._fetch_all(wanted)
            if self._kind is None:  # before the chunk's empty tiles take their shape from it
                first = next((decoded[t] for t in wanted if decoded[t] is not None), None)
                self._kind = None if first is None else (first.data.shape[0], first.data.dtype)
            for tile in chunk:
                if self.margin:
                    yield tile, self._with_margin(tile, decoded)
                else:
                    yield tile, self._image(tile, decoded[tile])

    def tile(self, tile: Tile | Sequence[int]) -> ImageData:
        """Read one tile."""
        tile = make_tile(*tile)
        return next(self.read([tile]))[1]

    def _rings(self) -> int:
        """How many rings of neighbouring tiles the margin reaches into."""
        return -(-self.margin // self.size)

    def _neighbourhood(self, tile: Tile) -> list[Tile]:
        """``tile`` and the neighbours its margin reaches, inside the world."""
        k, last = self._rings(), (1 << tile.z) - 1
        return [
            Tile(tile.x + dx, tile.y + dy, tile.z)
            for dy in range(-k, k + 1)
            for dx in range(-k, k + 1)
            if 0 <= tile.x + dx <= last and 0 <= tile.y + dy <= last
        ]

    def _with_margin(self, tile: Tile, decoded: Mapping[Tile, _Decoded | None]) -> ImageData:
        """The tile with its margin cropped from the decoded neighbourhood."""
        core = self._image(tile, decoded[tile])
        size, m = self.size, self.margin
        side = size + 2 * m
        data = np.zeros((core.data.shape[0], side, side), dtype=core.data.dtype)
        mask = np.zeros((side, side), dtype=bool)
        for other in self._neighbourhood(tile):
            if decoded[other] is None:
                continue
            image = core if other == tile else self._image(other, decoded[other])
            # The neighbour's pixels in the canvas: [m + dx * size, m + (dx + 1) * size).
            top, left = m + (other.y - tile.y) * size, m + (other.x - tile.x) * size
            r0, r1 = max(top, 0), min(top + size, side)
            c0, c1 = max(left, 0), min(left + size, side)
            data[:, r0:r1, c0:c1] = image.data[:, r0 - top : r1 - top, c0 - left : c1 - left]
            mask[r0:r1, c0:c1] = image.mask[r0 - top : r1 - top, c0 - left : c1 - left]
        return ImageData(data=data, mask=mask, margin=m)

    def _fetch_all(self, tiles: Sequence[Tile]) -> dict[Tile, _Decoded | None]:
        """Fetch and decode ``tiles`` concurrently; the first failure abandons the rest."""
        executor = self._executor
        if executor is None:
            raise SourceError(f"the reader of {redact(self.source)} is closed")
        abandon = threading.Event()
        futures: dict[Future[_Decoded | None], Tile] = {
            executor.submit(self._fetch, tile, abandon): tile for tile in tiles
        }
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        error = next((f.exception() for f in done if f.exception() is not None), None)
        if error is not None:
            abandon.set()
            for future in pending:
                future.cancel()
            raise error
        return {futures[future]: future.result() for future in done}

    def _fetch(self, tile: Tile, abandon: threading.Event) -> _Decoded | None:
        """One tile (run in the pool): decoded pixels, or None for an empty tile."""
        url = tile_url(self.source, tile)
        response = self._get(tile, url, abandon)
        status = response.status
        if status in EMPTY_STATUSES or (status == 200 and not response.data):
            return None
        if status != 200:
            raise SourceError(
                f"cannot read {_name(tile)} from tile endpoint {redact(url)}: HTTP {status}"
                f"{_reason(response)}"
            )
        return self._decode(tile, url, response)

    def _get(self, tile: Tile, url: str, abandon: threading.Event) -> urllib3.BaseHTTPResponse:
        """GET ``url``, retrying what a retry may fix; the final answer otherwise."""
        last, wait_for = "", 0.0
        for attempt in range(self.policy.max_attempts):
            if attempt:
                self._sleep(max(self._backoff.delay(attempt), wait_for))
            if abandon.is_set():
                raise _Abandoned
            try:
                response = self._http.request(
                    "GET", url, retries=self._redirects, preload_content=True
                )
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                last, wait_for = _describe(exc, url), 0.0
                log.info("tile endpoint %s, attempt %d: %s", redact(url), attempt + 1, last)
                continue
            if response.status not in RETRY_STATUSES:
                return response
            last = f"HTTP {response.status}{_reason(response)}"
            wait_for = retry_after(response.headers.get("Retry-After"))
            log.info("tile endpoint %s, attempt %d: %s", redact(url), attempt + 1, last)
            if wait_for > self.retry_after_max:
                raise SourceUnavailable(
                    f"cannot read {_name(tile)} from tile endpoint {redact(url)}: {last}, "
                    f"asked to retry after {wait_for:.0f} s (more than {self.retry_after_max:g})"
                )
        raise SourceUnavailable(
            f"cannot read {_name(tile)} from tile endpoint {redact(url)} after "
            f"{self.policy.max_attempts} attempts: {last}"
        )

    # -- decoding -------------------------------------------------------------------------

    def _decode(self, tile: Tile, url: str, response: urllib3.BaseHTTPResponse) -> _Decoded:
        """The pixels of a 200 answer, or SourceError when it is not an image."""
        content_type = (response.headers.get("Content-Type") or "").split(";")[0].strip()
        where = f"{_name(tile)} from tile endpoint {redact(url)}"
        if content_type.lower().startswith(_NOT_IMAGE):
            raise SourceError(
                f"{where} is not an image: HTTP 200 with a {content_type} body{_reason(response)}"
            )
        memfile = MemoryFile(response.data)
        try:
            with _OPEN_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                dataset = memfile.open()
            with dataset:
                return self._pixels(dataset, where)
        except RasterioError as exc:
            raise SourceError(
                f"{where} is not an image GDAL can decode ({content_type or 'no content type'}, "
                f"{len(response.data)} bytes): {one_line(exc)}"
            ) from None
        finally:
            memfile.close()

    def _pixels(self, dataset: DatasetReader, where: str) -> _Decoded:
        """Data and mask of a decoded image at ``size`` x ``size``."""
        if dataset.width != dataset.height:
            raise SourceError(f"{where} is {dataset.width} x {dataset.height} px, not square")
        if dataset.count == 1 and dataset.colorinterp[0] == ColorInterp.palette:
            return self._palette(dataset, where)
        alpha = (
            dataset.colorinterp.index(ColorInterp.alpha) + 1
            if ColorInterp.alpha in dataset.colorinterp
            else None
        )
        bands = self.bands or tuple(i for i in dataset.indexes if i != alpha)
        _check_bands(bands, dataset.count, where)
        data = self._read(dataset, list(bands), self.resampling)
        flags = {flag.name for flag in dataset.mask_flag_enums[0]}
        nodata = dataset.nodata
        if nodata is not None and "per_dataset" not in flags:
            if math.isnan(nodata):
                mask = ~np.isnan(data).any(axis=0)
            else:
                mask = ~(data == data.dtype.type(nodata)).any(axis=0)
        elif alpha is not None:
            mask = self._read(dataset, [alpha], Resampling.nearest)[0] != 0
        elif "per_dataset" in flags:
            # A mask GDAL derives for the whole image: an internal mask, or a PNG's tRNS
            # colour key (NODATA_VALUES: transparent where every band matches the colour).
            mask = dataset.read_masks(1, out_shape=(self.size, self.size)) != 0
        else:
            mask = np.ones((self.size, self.size), dtype=bool)
        invalidate_non_finite(data, mask, 0 if nodata is None or math.isnan(nodata) else nodata)
        return _Decoded(data, mask)

    def _palette(self, dataset: DatasetReader, where: str) -> _Decoded:
        """A paletted image as RGB through its colour table; the table's alpha is the mask.

        Indexes are resampled nearest whatever ``resampling`` says: they are no quantities.
        """
        lut = np.zeros((256, 4), dtype=np.uint8)
        for index, colour in dataset.colormap(1).items():
            if 0 <= index < 256:
                lut[index] = colour
        indexes = self._read(dataset, [1], Resampling.nearest)[0]
        rgba = np.moveaxis(lut[indexes], -1, 0)
        bands = self.bands or (1, 2, 3)
        _check_bands(bands, 3, where)
        data = np.ascontiguousarray(rgba[[b - 1 for b in bands]])
        return _Decoded(data, rgba[3] != 0)

    def _read(
        self, dataset: DatasetReader, indexes: list[int], resampling: Resampling
    ) -> np.ndarray:
        if dataset.width == self.size:
            return dataset.read(indexes)
        return dataset.read(
            indexes, out_shape=(len(indexes), self.size, self.size), resampling=resampling
        )

    def _image(self, tile: Tile, decoded: _Decoded | None) -> ImageData:
        """The tile's ImageData: an empty one, or the decoded pixels once checked to be of
        the same kind as the reader's other tiles (a batch stacks them)."""
        if decoded is None:
            count, dtype = self._kind or (3, np.dtype(np.uint8))
            count = len(self.bands) if self.bands is not None else count
            data = np.zeros((count, self.size, self.size), dtype=dtype)
            return ImageData(data=data, mask=np.zeros((self.size, self.size), dtype=bool))
        kind = (decoded.data.shape[0], decoded.data.dtype)
        if self._kind is not None and kind != self._kind:
            raise SourceError(
                f"{_name(tile)} from tile endpoint {redact(self.source)} has {kind[0]} bands of "
                f"{kind[1]}, earlier tiles {self._kind[0]} of {self._kind[1]}: the endpoint "
                "mixes kinds of image (pass bands= to select the same bands from each)"
            )
        return ImageData(data=decoded.data, mask=decoded.mask)

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the request threads and close the connections; idempotent.

        Does not wait for requests still in flight (those a failed read abandoned): they end
        within their timeout and their connections are closed, not reused.
        """
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        self._http.clear()


# ----------------------------------------------------------------------------- helpers


def _name(tile: Tile) -> str:
    return f"Tile(x={tile.x}, y={tile.y}, z={tile.z})"


def _check_bands(bands: Sequence[int], count: int, where: str) -> None:
    bad = [b for b in bands if not 1 <= b <= count]
    if bad:
        raise SourceError(f"{where} has bands 1..{count}; requested {bad}")


def _describe(exc: BaseException, url: str) -> str:
    """A connection failure in one line, without the URL's query string (urllib3 quotes the
    request path, query included, in MaxRetryError)."""
    reason = getattr(exc, "reason", None) or exc
    text = f"{type(reason).__name__}: {one_line(reason)}"
    query = urlsplit(url).query
    return text.replace(query, "...") if query else text


def _reason(response: urllib3.BaseHTTPResponse, limit: int = 120) -> str:
    """``": <start of the body>"`` for a text answer (a server's reason), else nothing."""
    content_type = (response.headers.get("Content-Type") or "").lower()
    if not content_type.startswith(_NOT_IMAGE) or not response.data:
        return ""
    text = " ".join(response.data[:limit].decode("utf-8", errors="replace").split())
    return f": {text}{'...' if len(response.data) > limit else ''}" if text else ""


__all__ = [
    "CHUNK",
    "EMPTY_STATUSES",
    "TileEndpointReader",
    "is_tile_endpoint",
    "redact",
    "tile_url",
]
