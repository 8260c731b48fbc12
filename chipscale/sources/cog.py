"""Read web-mercator tiles from a raster, many tiles per warp.

The worker's first step and its main cost. A queue message carries a pack of adjacent tiles;
warping each tile on its own repeats the per-warp set-up (transformer, block fetches, mask
reads) for every tile. Here tiles that lie together are read with ONE warp of their common
window, then sliced: tiles are grouped by their parent ``k`` zooms up, where ``k`` is chosen so
that a window is at most ``max_window`` x ``max_window`` output pixels. That keeps memory
bounded (one window's arrays plus GDAL's block cache, whatever the size of the image) while
amortising the warp over up to ``(max_window / size) ** 2`` tiles.

How a tile is read
    A :class:`rasterio.vrt.WarpedVRT` to EPSG:3857 whose pixel grid is the tile grid at the
    tile's zoom (``size`` pixels a tile), nearest resampling by default, so a source already
    on that grid is copied pixel for pixel. When the zoom is coarser than the image, the source
    overview whose resolution is the coarsest one still at least as fine as the tile's is
    warped (the VRT alone would read full resolution: slow, and aliased).

Validity mask, first kind present wins (rio-tiler's order):
    1. the dataset nodata value: a pixel is invalid where any selected band equals it (NaN
       for a NaN nodata),
    2. an alpha band: valid where the warped alpha is non-zero,
    3. a per-dataset mask, internal (``GDAL_TIFF_INTERNAL_MASK``) before external
       (``SOURCE.msk``; for local files only, see :mod:`chipscale.sources.gdal_env`): valid
       where the warped mask is non-zero.
    Pixels outside the source are invalid in every case and their data is 0 (or nodata).
    So is, whatever the mask kind, a pixel of a float source that is NaN or inf in any
    selected band: its data becomes 0 (or nodata), so no NaN ever reaches a model.

Order of results
    :func:`read_tiles` yields pack by pack: packs in the order of their first tile in the
    input, tiles within a pack in input order. Input already grouped by parent tile (a queue
    message, ``mercantile.tiles`` over a small area) therefore comes back in input order.
    Each distinct tile is yielded once, however often it is requested.
"""

from __future__ import annotations

import math
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import rasterio
from affine import Affine
from mercantile import Tile
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import RasterioError
from rasterio.io import DatasetReader
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform, transform_bounds

from chipscale.errors import SourceError, SourceUnavailable, one_line, quoted
from chipscale.grid.tilelist import make_tile
from chipscale.sources.gdal_env import gdal_env, is_remote
from chipscale.sources.xyz import TileEndpointReader, is_tile_endpoint
from chipscale.values import ImageData, invalidate_non_finite

WEB_MERCATOR = CRS.from_epsg(3857)
LONLAT = CRS.from_epsg(4326)
#: Half the width of the web-mercator world, metres.
ORIGIN = 20037508.342789244
#: Default cap on one warp's output, pixels a side: 2048 = 8 x 8 tiles of 256.
MAX_WINDOW = 2048
#: Warp transformer error, source pixels. 0 = exact per-pixel transforms, so a tile read in a
#: pack is identical to the same tile read alone (the approximate transformer's error depends
#: on the window, which made a few percent of nearest-neighbour picks differ).
TOLERANCE = 0.01


class SlowSourceWarning(UserWarning):
    """The source is organised in strips (not tiled): every tile read decodes whole strips."""


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What a caller needs to know about a raster before reading tiles from it."""

    source: str
    count: int
    dtype: str
    crs: str | None
    width: int
    height: int
    bounds_lonlat: tuple[float, float, float, float]
    nodata: float | None
    tiled: bool
    overviews: tuple[int, ...]
    descriptions: tuple[str | None, ...]
    colorinterp: tuple[str, ...]
    mask: str


def gdal_path(source: str | os.PathLike[str]) -> str:
    """The path GDAL opens: ``s3://`` becomes ``/vsis3/``, ``http(s)://`` ``/vsicurl/``.

    Mapped here rather than left to rasterio so that GDAL's own S3 settings (endpoint,
    credentials from the environment) apply, the same for every caller.

    >>> gdal_path("s3://bucket/a.tif")
    '/vsis3/bucket/a.tif'
    >>> gdal_path("https://example.com/a.tif")
    '/vsicurl/https://example.com/a.tif'
    """
    text = os.fspath(source)
    if text.startswith("s3://"):
        return "/vsis3/" + text[len("s3://") :]
    if text.startswith(("http://", "https://")):
        return "/vsicurl/" + text
    return text


#: GDAL/curl messages of a remote read that a later attempt may not meet: the message goes
#: back to the queue instead of recording the tiles as errors. A 403 or 404 is permanent.
_TRANSIENT = re.compile(
    r"HTTP response code: (429|5\d\d)|timed? ?out|Could not connect|Couldn't connect|"
    r"Connection (refused|reset)|Could not resolve|Recv failure|Send failure|SSL|"
    r"throttl|SlowDown|ServiceUnavailable|InternalError",
    re.IGNORECASE,
)


#: GDAL's generic open failures, which name no cause. After a transient failure of the same
#: path they are what GDAL answers from its cache of that failure (see ``_STALE``).
_GENERIC = re.compile(
    r"does not exist in the file system|not recognized as being in a supported file format"
)


#: libtiff's short read of a block of an already-open file: over the network, the connection
#: went away mid-read (GDAL wraps it as "Read failed. See previous exception for details.",
#: so it is only found down the exception chain).
_SHORT_READ = re.compile(r"Read error at .*got \d+ bytes, expected")


def _chain(exc: BaseException) -> list[str]:
    """The messages of an exception and of the ones it was raised from (GDAL chains its
    errors: the top one is often "Read failed. See previous exception for details.")."""
    seen: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < 10:
        seen.append(str(current))
        current = current.__cause__ or current.__context__
    return seen


def _reason(exc: BaseException) -> str:
    """One line saying what failed. GDAL's "Read failed. See previous exception for
    details." says nothing: then the chained messages, which name the band, the block and
    the bytes missing (``IReadBlock failed at X offset 0, Y offset 3 ... got 0 bytes,
    expected 123499``), each once."""
    top = one_line(exc)
    if "See previous exception" not in top:
        return top
    parts: list[str] = []
    for message in _chain(exc)[1:]:
        text = " ".join(message.split())
        if text and not any(text in part for part in parts):
            parts.append(text)
    return "; ".join(parts) or top


def _source_error(
    source: str | os.PathLike[str],
    exc: BaseException,
    *,
    after_outage: bool = False,
    reading: bool = False,
) -> SourceError:
    """The error to raise for a failed open or read of ``source``, transient or not.

    ``after_outage``: the last open of this path failed transiently, so a generic "does not
    exist" is GDAL repeating that failure, not the server saying the object is gone (S3
    says that as "The specified key does not exist" or "HTTP response code: 404").
    ``reading``: the source opened fine and a block read failed; a short read of a remote
    file is the network, not the file (tests/reliability: an S3 outage mid-job must be
    retried, not stored as ``error`` rows).
    """
    text = f"cannot read raster {os.fspath(source)}: {_reason(exc)}"
    message = " | ".join(_chain(exc))
    if not is_remote(os.fspath(source)) and _SHORT_READ.search(message):
        text += " (the file ends before this block: truncated?)"
    if is_remote(os.fspath(source)) and (
        _TRANSIENT.search(message)
        or (after_outage and _GENERIC.search(message))
        or (reading and _SHORT_READ.search(message))
    ):
        return SourceUnavailable(text)
    return SourceError(text)


#: Remote paths whose last open failed transiently. GDAL caches what it learnt about a
#: network path for the life of the process, failures included: after a refused connection
#: the next open of the same path answers "does not exist in the file system" (or "not
#: recognized as being in a supported file format") without asking the server, even once the
#: server is back, so a message the queue redelivers to the same warm worker became
#: permanent ``error`` rows (measured with GDAL 3.10 against moto). Opens of such a path
#: bypass GDAL's cache (``CPL_VSIL_CURL_NON_CACHED``, which also drops the stale entry when
#: the dataset closes) and read a generic failure as transient, until one open succeeds or
#: fails for a stated reason.
_STALE: set[str] = set()
_STALE_LOCK = threading.Lock()


def _mark_stale(path: str, stale: bool) -> None:
    with _STALE_LOCK:
        if stale:
            _STALE.add(path)
        else:
            _STALE.discard(path)


def open_source(source: str | os.PathLike[str], overview_level: int | None = None) -> DatasetReader:
    """Open ``source`` (path, http(s) or s3 URL) or raise :class:`SourceError` naming it.

    Call it inside :func:`chipscale.sources.gdal_env.gdal_env` so the cloud settings apply.
    """
    kwargs = {} if overview_level is None else {"overview_level": overview_level}
    path = gdal_path(source)
    try:
        path.encode()  # GDAL takes UTF-8: a name of undecodable bytes is none it can open
    except UnicodeEncodeError:
        raise SourceError(f"source {quoted(str(source))} is not UTF-8 text") from None
    with _STALE_LOCK:
        stale = path in _STALE
    try:
        # GDAL splits the option's value at ":", so for an http(s) URL it bypasses the cache
        # of every /vsicurl/http path during this one open: harmless, and rare.
        with rasterio.Env(CPL_VSIL_CURL_NON_CACHED=path) if stale else nullcontext():
            dataset = rasterio.open(path, **kwargs)
    except (RasterioError, OSError) as exc:
        error = _source_error(source, exc, after_outage=stale)
        if is_remote(path) and (stale or not error.permanent):
            _mark_stale(path, not error.permanent)
        raise error from None
    if stale:
        _mark_stale(path, False)
    return dataset


def tile_transform(x: int, y: int, z: int, size: int) -> Affine:
    """Affine transform of the EPSG:3857 grid whose pixel (0, 0) is tile (x, y, z)'s corner.

    Computed from the grid origin (not from lon/lat) so adjacent windows share pixel edges.
    """
    span = 2 * ORIGIN / (1 << z)
    res = span / size
    return Affine(res, 0.0, -ORIGIN + x * span, 0.0, -res, ORIGIN - y * span)


def _wrap_lon(lon: float) -> float:
    return (lon + 180.0) % 360.0 - 180.0 if not -180.0 <= lon <= 180.0 else lon


def footprint_lonlat(dataset: DatasetReader) -> tuple[float, float, float, float]:
    """``(west, south, east, north)`` in EPSG:4326 of an open dataset; ``west > east`` when
    the footprint crosses the antimeridian."""
    if dataset.crs is None:
        raise SourceError(f"raster {dataset.name} has no coordinate reference system")
    w, s, e, n = transform_bounds(dataset.crs, LONLAT, *dataset.bounds, densify_pts=21)
    if e - w >= 360.0:
        return (-180.0, s, 180.0, n)
    return (_wrap_lon(w), s, _wrap_lon(e), n)


def source_footprint_lonlat(source: str | os.PathLike[str]) -> tuple[float, float, float, float]:
    """The source's footprint ``(west, south, east, north)`` in EPSG:4326.

    Densified, so a curved edge of a projected raster is not cut off; ``west > east`` when the
    footprint crosses the antimeridian (split it there before computing a tile cover).
    """
    with gdal_env(source), open_source(source) as dataset:
        return footprint_lonlat(dataset)


def _is_tiled(dataset: DatasetReader) -> bool:
    block_height, block_width = dataset.block_shapes[0]
    return block_width < dataset.width or block_height >= dataset.height


def _mask_kind(dataset: DatasetReader) -> str:
    if dataset.nodata is not None:
        return "nodata"
    if ColorInterp.alpha in dataset.colorinterp:
        return "alpha"
    flags = dataset.mask_flag_enums[0]
    if any(flag.name == "per_dataset" for flag in flags):
        return "mask"
    return "none"


def source_info(source: str | os.PathLike[str]) -> SourceInfo:
    """Describe ``source``: bands, dtype, CRS, lon/lat footprint, layout, mask kind."""
    with gdal_env(source), open_source(source) as dataset:
        return SourceInfo(
            source=os.fspath(source),
            count=dataset.count,
            dtype=dataset.dtypes[0],
            crs=dataset.crs.to_string() if dataset.crs else None,
            width=dataset.width,
            height=dataset.height,
            bounds_lonlat=footprint_lonlat(dataset),
            nodata=dataset.nodata,
            tiled=_is_tiled(dataset),
            overviews=tuple(dataset.overviews(1)),
            descriptions=tuple(dataset.descriptions),
            colorinterp=tuple(ci.name for ci in dataset.colorinterp),
            mask=_mask_kind(dataset),
        )


def _pack_shift(size: int, max_window: int) -> int:
    """How many zooms up the pack parent is: ``2**k`` tiles a side fit in ``max_window``."""
    return max(0, math.floor(math.log2(max(1, max_window // size))))


def group_tiles(tiles: Sequence[Tile], shift: int) -> list[list[Tile]]:
    """Group tiles by zoom and by parent ``shift`` zooms up, keeping first-seen order."""
    groups: dict[tuple[int, int, int], list[Tile]] = {}
    for tile in tiles:
        groups.setdefault((tile.z, tile.x >> shift, tile.y >> shift), []).append(tile)
    return list(groups.values())


class TileReader:
    """Reads tiles from one source, opened once; the engine behind :func:`read_tiles`.

    Keep one open to read many packs from the same source (a worker handling several
    messages for one image, a benchmark). Not thread-safe: one reader per thread.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        *,
        size: int = 256,
        bands: Sequence[int] | None = None,
        resampling: Resampling | str = Resampling.nearest,
        max_window: int = MAX_WINDOW,
    ) -> None:
        if size <= 0:
            raise ValueError(f"tile size must be positive, got {size}")
        self.source = os.fspath(source)
        self.size = size
        self.resampling = (
            Resampling[resampling] if isinstance(resampling, str) else Resampling(resampling)
        )
        self.shift = _pack_shift(size, max_window)
        self._overviews: dict[int, DatasetReader] = {}
        # The GDAL options are set around each open and read, not for the reader's lifetime:
        # a suspended read_tiles generator must not leave them set for unrelated code.
        with gdal_env(self.source):
            self._dataset = open_source(self.source)
        try:
            self._setup(bands)
        except BaseException:
            self.close()
            raise

    def _setup(self, bands: Sequence[int] | None) -> None:
        dataset = self._dataset
        if dataset.crs is None:
            raise SourceError(f"raster {self.source} has no coordinate reference system")
        self.dtype = np.dtype(dataset.dtypes[0])
        self.nodata = dataset.nodata
        self.alpha = (
            dataset.colorinterp.index(ColorInterp.alpha) + 1
            if ColorInterp.alpha in dataset.colorinterp
            else None
        )
        if bands is None:
            self.bands = tuple(i for i in dataset.indexes if i != self.alpha)
        else:
            self.bands = tuple(int(b) for b in bands)
            bad = [b for b in self.bands if not 1 <= b <= dataset.count]
            if bad or not self.bands:
                raise SourceError(
                    f"raster {self.source} has bands 1..{dataset.count}; requested {bad or '[]'}"
                )
        if not _is_tiled(dataset):
            warnings.warn(
                f"{self.source} is organised in strips, not tiled: tile reads decode whole "
                "strips and are slow; convert it to a COG (rio cogeo create)",
                SlowSourceWarning,
                stacklevel=4,
            )
        self.lonlat = footprint_lonlat(dataset)
        self._src_crs = self._warp_src_crs(dataset)
        self._bounds_3857 = self._mercator_bounds()
        self._native_res = self._mercator_resolution()
        self._overview_factors = tuple(dataset.overviews(1))
        self._on_mercator = (
            dataset.crs == WEB_MERCATOR
            and dataset.transform.b == 0.0
            and dataset.transform.d == 0.0
            and dataset.transform.e < 0.0 < dataset.transform.a
        )

    def _warp_src_crs(self, dataset: DatasetReader) -> CRS | None:
        """For a geographic source whose longitudes pass ±180, a CRS that wraps longitudes
        around its centre, so tiles on both sides of the antimeridian find its pixels."""
        if not dataset.crs.is_geographic:
            return None
        left, right = dataset.bounds.left, dataset.bounds.right
        if left >= -180.0 and right <= 180.0:
            return None
        centre = (left + right) / 2.0
        return CRS.from_proj4(f"{dataset.crs.to_proj4()} +lon_wrap={centre}")

    def _mercator_bounds(self) -> tuple[float, float, float, float] | None:
        """Footprint in EPSG:3857, or None when it cannot be used to skip tiles (crossing
        the antimeridian, or beyond the projection's latitude range)."""
        w, s, e, n = self.lonlat
        if w > e:
            return None
        try:
            bounds = transform_bounds(LONLAT, WEB_MERCATOR, w, s, e, n, densify_pts=21)
        except RasterioError:
            return None
        return bounds if all(math.isfinite(v) for v in bounds) else None

    def _mercator_resolution(self) -> float:
        """Size of a source pixel in EPSG:3857 metres (the finer of x and y)."""
        dataset = self._dataset
        if dataset.crs == WEB_MERCATOR:
            return min(abs(dataset.transform.a), abs(dataset.transform.e))
        try:
            transform, _, _ = calculate_default_transform(
                dataset.crs, WEB_MERCATOR, dataset.width, dataset.height, *dataset.bounds
            )
        except RasterioError:
            return min(abs(dataset.transform.a), abs(dataset.transform.e))
        return min(abs(transform.a), abs(transform.e))

    # -- reading --------------------------------------------------------------------------

    def _dataset_for(self, z: int) -> DatasetReader:
        """The full-resolution dataset or the overview that suits zoom ``z``.

        GDAL's choice for a decimating read: the coarsest overview whose decimation factor
        does not exceed the ratio of tile pixel size to source pixel size.
        """
        target = 2 * ORIGIN / ((1 << z) * self.size)
        ratio = target / self._native_res
        level = None
        for i, factor in enumerate(self._overview_factors):
            if factor <= ratio * 1.01:
                level = i
        if level is None:
            return self._dataset
        if level not in self._overviews:
            with gdal_env(self.source):
                self._overviews[level] = open_source(self.source, overview_level=level)
        return self._overviews[level]

    def _tile_range(self, z: int) -> tuple[int, int, int, int] | None:
        """Tiles ``(xmin, ymin, xmax, ymax)`` at zoom ``z`` that may touch the source."""
        if self._bounds_3857 is None:
            return None
        w, s, e, n = self._bounds_3857
        span = 2 * ORIGIN / (1 << z)
        last = (1 << z) - 1
        xmin = max(0, math.floor((w + ORIGIN) / span))
        xmax = min(last, math.ceil((e + ORIGIN) / span) - 1)
        ymin = max(0, math.floor((ORIGIN - n) / span))
        ymax = min(last, math.ceil((ORIGIN - s) / span) - 1)
        return xmin, ymin, xmax, ymax

    @property
    def _fill(self) -> float:
        """The data value of invalid pixels: the nodata value, else 0 (a NaN nodata too)."""
        return 0 if self.nodata is None or np.isnan(self.nodata) else self.nodata

    def _empty(self) -> ImageData:
        data = np.full((len(self.bands), self.size, self.size), self._fill, dtype=self.dtype)
        return ImageData(data=data, mask=np.zeros((self.size, self.size), dtype=bool))

    def _warp(self, z: int, x0: int, y0: int, nx: int, ny: int) -> tuple[np.ndarray, np.ndarray]:
        """Warp the window of ``nx`` x ``ny`` tiles from tile ``(x0, y0, z)``: data and mask."""
        dataset = self._dataset_for(z)
        if self._on_mercator:
            return self._read_direct(dataset, tile_transform(x0, y0, z, self.size), nx, ny)
        params: dict = {
            "crs": WEB_MERCATOR,
            "transform": tile_transform(x0, y0, z, self.size),
            "width": nx * self.size,
            "height": ny * self.size,
            "resampling": self.resampling,
            "dtype": self.dtype.name,
            "tolerance": TOLERANCE,
        }
        if self._src_crs is not None:
            params["src_crs"] = self._src_crs
        if self.nodata is not None:
            params.update(src_nodata=self.nodata, nodata=self.nodata)
            indexes = list(self.bands)
        elif self.alpha is not None:
            params.update(src_alpha=self.alpha, dst_alpha=self.alpha, nodata=0)
            indexes = [*self.bands, self.alpha]
        else:
            params.update(add_alpha=True, nodata=0)
            indexes = [*self.bands, dataset.count + 1]
        try:
            with gdal_env(self.source), WarpedVRT(dataset, **params) as vrt:
                values = vrt.read(indexes=indexes)
        except RasterioError as exc:
            raise _source_error(self.source, exc, reading=True) from None
        return self._split(values)

    def _split(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Data and validity mask from bands read with their alpha/mask band last (or not,
        with nodata): the module's documented mask order, then non-finite pixels."""
        if self.nodata is None:
            data, mask = values[:-1], values[-1] != 0
        elif np.isnan(self.nodata):
            data, mask = values, ~np.isnan(values).any(axis=0)
        else:
            data, mask = values, ~(values == values.dtype.type(self.nodata)).any(axis=0)
        invalidate_non_finite(data, mask, self._fill)
        return data, mask

    def _read_direct(
        self, dataset: DatasetReader, transform: Affine, nx: int, ny: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """A source already in EPSG:3857 (north up) needs no warp: a windowed, resampled
        read of the part of the window inside the source, placed into an empty window.

        The same pixels as the warp with nearest resampling (on-grid sources are copied),
        at about twice the speed: GDAL's RasterIO skips the warper's per-chunk set-up.
        """
        width, height = nx * self.size, ny * self.size
        left, top = transform.c, transform.f
        right, bottom = left + width * transform.a, top + height * transform.e
        win = rasterio.windows.from_bounds(left, bottom, right, top, dataset.transform)
        col0, row0 = max(win.col_off, 0.0), max(win.row_off, 0.0)
        col1 = min(win.col_off + win.width, dataset.width)
        row1 = min(win.row_off + win.height, dataset.height)
        sx, sy = width / win.width, height / win.height
        ox0, ox1 = round((col0 - win.col_off) * sx), round((col1 - win.col_off) * sx)
        oy0, oy1 = round((row0 - win.row_off) * sy), round((row1 - win.row_off) * sy)
        extra = 0 if self.nodata is not None else 1
        values = np.full((len(self.bands) + extra, height, width), self._fill, dtype=self.dtype)
        if ox1 <= ox0 or oy1 <= oy0:
            return self._split(values)
        sub = rasterio.windows.Window(col0, row0, col1 - col0, row1 - row0)
        shape = (oy1 - oy0, ox1 - ox0)
        try:
            with gdal_env(self.source):
                out = values[:, oy0:oy1, ox0:ox1]
                indexes = [*self.bands, self.alpha] if self.alpha else list(self.bands)
                part = dataset.read(
                    indexes,
                    window=sub,
                    out_shape=(len(indexes), *shape),
                    resampling=self.resampling,
                )
                out[: len(indexes)] = part
                if self.nodata is None and self.alpha is None:
                    out[-1] = dataset.read_masks(
                        1, window=sub, out_shape=shape, resampling=Resampling.nearest
                    )
        except RasterioError as exc:
            raise _source_error(self.source, exc, reading=True) from None
        return self._split(values)

    def read_pack(self, tiles: Sequence[Tile]) -> Iterator[tuple[Tile, ImageData]]:
        """Read tiles of one zoom that share a pack parent with ONE warp of their window."""
        if not tiles:
            return
        z = tiles[0].z
        window = self._clip([t for t in tiles if self._touches(t)])
        if window is None:
            for tile in tiles:
                yield tile, self._empty()
            return
        x0, y0, x1, y1 = window
        data, mask = self._warp(z, x0, y0, x1 - x0 + 1, y1 - y0 + 1)
        size = self.size
        for tile in tiles:
            if not (x0 <= tile.x <= x1 and y0 <= tile.y <= y1):
                yield tile, self._empty()
                continue
            r, c = (tile.y - y0) * size, (tile.x - x0) * size
            tile_data = np.ascontiguousarray(data[:, r : r + size, c : c + size])
            tile_mask = np.ascontiguousarray(mask[r : r + size, c : c + size])
            yield tile, ImageData(data=tile_data, mask=tile_mask)

    def _touches(self, tile: Tile) -> bool:
        bounds = self._tile_range(tile.z)
        if bounds is None:
            return True
        xmin, ymin, xmax, ymax = bounds
        return xmin <= tile.x <= xmax and ymin <= tile.y <= ymax

    @staticmethod
    def _clip(tiles: Sequence[Tile]) -> tuple[int, int, int, int] | None:
        if not tiles:
            return None
        xs = [t.x for t in tiles]
        ys = [t.y for t in tiles]
        return min(xs), min(ys), max(xs), max(ys)

    def read(self, tiles: Iterable[Tile | Sequence[int]]) -> Iterator[tuple[Tile, ImageData]]:
        """Read every distinct tile once, pack by pack (see the module's "Order of results")."""
        unique = list(dict.fromkeys(make_tile(*t) for t in tiles))
        for group in group_tiles(unique, self.shift):
            yield from self.read_pack(group)

    def tile(self, tile: Tile | Sequence[int]) -> ImageData:
        """Read one tile (one warp of its own window)."""
        tile = make_tile(*tile)
        return next(self.read_pack([tile]))[1]

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the dataset and the overviews opened for it."""
        for dataset in (*self._overviews.values(), getattr(self, "_dataset", None)):
            if dataset is not None:
                dataset.close()
        self._overviews = {}

    def __enter__(self) -> TileReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_tiles(
    source: str | os.PathLike[str],
    tiles: Iterable[Tile | Sequence[int]],
    size: int = 256,
    bands: Sequence[int] | None = None,
    *,
    resampling: Resampling | str = Resampling.nearest,
    max_window: int = MAX_WINDOW,
) -> Iterator[tuple[Tile, ImageData]]:
    """Yield ``(tile, ImageData)`` for every distinct tile, reading packs with one warp each.

    ``source``: a local path, an http(s) URL or an ``s3://`` URL, opened once for the call.
    ``bands``: 1-based band indexes; default every band but an alpha band.
    ``data`` is ``(bands, size, size)`` in the source dtype, ``mask`` is ``(size, size)``
    bool, True where valid. A tile that misses the source has an all-False mask.
    Raises :class:`~chipscale.errors.SourceError` when the source cannot be read and
    :class:`~chipscale.errors.InvalidTileError` for a tile off the grid.

    An XYZ tile endpoint (``https://host/{z}/{x}/{y}.png``, see
    :mod:`chipscale.sources.xyz`) is read by a :class:`TileEndpointReader` instead;
    ``max_window`` does not apply to it.
    """
    if is_tile_endpoint(source):
        with TileEndpointReader(source, size=size, bands=bands, resampling=resampling) as endpoint:
            yield from endpoint.read(tiles)
        return
    with TileReader(
        source, size=size, bands=bands, resampling=resampling, max_window=max_window
    ) as reader:
        yield from reader.read(tiles)


#: Open readers kept per thread by :func:`cached_reader`: a worker handles many packs of few
#: sources, and opening costs a header read each time (milliseconds locally, a round trip
#: or more to S3).
READER_CACHE_SIZE = 4
_local = threading.local()


def cached_reader(
    source: str | os.PathLike[str], *, size: int = 256, bands: Sequence[int] | None = None
) -> TileReader | TileEndpointReader:
    """An open reader for ``source`` from this thread's small LRU cache: a
    :class:`TileReader`, or a :class:`TileEndpointReader` for an XYZ tile endpoint.

    Per thread because a reader is not thread-safe. The least recently used reader is closed
    when the cache is full. Sources are taken to be immutable while a process runs (COGs in a
    bucket): a file rewritten in place needs :func:`clear_reader_cache`.
    """
    cache: OrderedDict[tuple, TileReader | TileEndpointReader] = (
        getattr(_local, "readers", None) or OrderedDict()
    )
    _local.readers = cache
    key = (os.fspath(source), size, tuple(bands) if bands is not None else None)
    reader = cache.pop(key, None)
    if reader is None:
        kind = TileEndpointReader if is_tile_endpoint(source) else TileReader
        reader = kind(source, size=size, bands=bands)
        while len(cache) >= READER_CACHE_SIZE:
            cache.popitem(last=False)[1].close()
    cache[key] = reader
    return reader


def clear_reader_cache() -> None:
    """Close this thread's cached readers."""
    cache = getattr(_local, "readers", None) or {}
    for reader in cache.values():
        reader.close()
    _local.readers = OrderedDict()


def read_tile(
    source: str | os.PathLike[str],
    tile: Tile | Sequence[int],
    size: int = 256,
    bands: Sequence[int] | None = None,
    *,
    resampling: Resampling | str = Resampling.nearest,
) -> ImageData:
    """Read one tile (the CLI's ``chipscale tile``); see :func:`read_tiles`."""
    kind = TileEndpointReader if is_tile_endpoint(source) else TileReader
    with kind(source, size=size, bands=bands, resampling=resampling) as reader:
        return reader.tile(tile)


__all__ = [
    "MAX_WINDOW",
    "SlowSourceWarning",
    "SourceInfo",
    "TileReader",
    "cached_reader",
    "clear_reader_cache",
    "gdal_path",
    "group_tiles",
    "open_source",
    "read_tile",
    "read_tiles",
    "source_footprint_lonlat",
    "source_info",
    "tile_transform",
]
