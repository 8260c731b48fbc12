"""The raster adapter of the TileSource port: :class:`TileReader` reads web-mercator tiles from
a raster through GDAL, tiles that lie together with ONE warp of their common window (at most
``max_window`` pixels a side), then sliced; plus :func:`source_info`, what a raster holds.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

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

from chipscale.errors import SourceError
from chipscale.grid.tilelist import make_tile
from chipscale.sources.base import ClosesOnExit
from chipscale.sources.datasets import LONLAT, footprint_lonlat, open_dataset
from chipscale.sources.gdal_env import gdal_env
from chipscale.sources.read_errors import source_error
from chipscale.values import ImageData, invalidate_non_finite

WEB_MERCATOR = CRS.from_epsg(3857)
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


def tile_transform(x: int, y: int, z: int, size: int, margin: int = 0) -> Affine:
    """Affine transform of the EPSG:3857 grid whose pixel (``margin``, ``margin``) is tile
    (x, y, z)'s corner (pixel (0, 0) with no margin).

    Computed from the grid origin (not from lon/lat) so adjacent windows share pixel edges;
    a margin shifts the window by whole pixels of the same grid.
    """
    span = 2 * ORIGIN / (1 << z)
    res = span / size
    return Affine(
        res, 0.0, -ORIGIN + x * span - margin * res, 0.0, -res, ORIGIN - y * span + margin * res
    )


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
    with gdal_env(source), open_dataset(source) as dataset:
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


class TileReader(ClosesOnExit):
    """Reads tiles from one raster, opened once; the engine behind
    :func:`chipscale.sources.read_tiles` for rasters.

    Keep one open to read many packs from the same source (a worker handling several
    messages for one image, a benchmark). Not thread-safe: one reader per thread.

    How a tile is read
        A :class:`rasterio.vrt.WarpedVRT` to EPSG:3857 whose pixel grid is the tile grid at
        the tile's zoom (``size`` pixels a tile), nearest resampling by default, so a source
        already on that grid is copied pixel for pixel. When the zoom is coarser than the
        image, the source overview whose resolution is the coarsest one still at least as fine
        as the tile's is warped (the VRT alone would read full resolution: slow, and aliased).
        Tiles are grouped by their parent ``k`` zooms up, ``k`` chosen so that a window is at
        most ``max_window`` x ``max_window`` output pixels, and each group is ONE warp.

    Margin
        With ``margin`` m, each tile comes back ``(bands, size + 2m, size + 2m)`` with
        ``ImageData.margin == m``: the tile and m pixels of the source on each side, the
        very pixels the neighbouring tiles read (the pack's window grows by m pixels on each
        side, still one warp). Beyond the source, and beyond the edges of the web-mercator
        world, data is 0 (or nodata) and the mask False. A tile whose own area misses the
        source comes back empty, margin included: it never reaches a model.

    Validity mask, first kind present wins (rio-tiler's order):
        1. the dataset nodata value: a pixel is invalid where any selected band equals it
           (NaN for a NaN nodata),
        2. an alpha band: valid where the warped alpha is non-zero,
        3. a per-dataset mask, internal (``GDAL_TIFF_INTERNAL_MASK``) before external
           (``SOURCE.msk``; for local files only, see :mod:`chipscale.sources.gdal_env`):
           valid where the warped mask is non-zero.
        Pixels outside the source are invalid in every case and their data is 0 (or nodata).
        So is, whatever the mask kind, a pixel of a float source that is NaN or inf in any
        selected band: its data becomes 0 (or nodata), so no NaN ever reaches a model.

    Order of results
        :meth:`read` yields pack by pack: packs in the order of their first tile in the
        input, tiles within a pack in input order. Input already grouped by parent tile (a
        queue message, ``mercantile.tiles`` over a small area) therefore comes back in input
        order.
        Each distinct tile is yielded once, however often it is requested.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        *,
        size: int = 256,
        bands: Sequence[int] | None = None,
        resampling: Resampling | str = Resampling.nearest,
        max_window: int = MAX_WINDOW,
        margin: int = 0,
    ) -> None:
        if size <= 0:
            raise ValueError(f"tile size must be positive, got {size}")
        if margin < 0:
            raise ValueError(f"tile margin must be >= 0, got {margin}")
        self.source = os.fspath(source)
        self.size = size
        self.margin = int(margin)
        self.resampling = (
            Resampling[resampling] if isinstance(resampling, str) else Resampling(resampling)
        )
        self.shift = _pack_shift(size, max_window)
        self._overviews: dict[int, DatasetReader] = {}
        # The GDAL options are set around each open and read, not for the reader's lifetime:
        # a suspended read_tiles generator must not leave them set for unrelated code.
        with gdal_env(self.source):
            self._dataset = open_dataset(self.source)
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
                self._overviews[level] = open_dataset(self.source, overview_level=level)
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
        side = self.size + 2 * self.margin
        data = np.full((len(self.bands), side, side), self._fill, dtype=self.dtype)
        return ImageData(data=data, mask=np.zeros((side, side), dtype=bool), margin=self.margin)

    def _warp(self, z: int, x0: int, y0: int, nx: int, ny: int) -> tuple[np.ndarray, np.ndarray]:
        """Warp the window of ``nx`` x ``ny`` tiles from tile ``(x0, y0, z)`` plus the margin
        on each side: data and mask."""
        dataset = self._dataset_for(z)
        m = self.margin
        transform = tile_transform(x0, y0, z, self.size, m)
        width, height = nx * self.size + 2 * m, ny * self.size + 2 * m
        if self._on_mercator:
            data, mask = self._read_direct(dataset, transform, width, height)
        else:
            data, mask = self._warp_vrt(dataset, transform, width, height)
        if m:
            self._blank_off_world(data, mask, z, x0, y0)
        return data, mask

    def _blank_off_world(
        self, data: np.ndarray, mask: np.ndarray, z: int, x0: int, y0: int
    ) -> None:
        """Invalidate the margin pixels beyond the edges of the web-mercator world (a global
        source would otherwise wrap around or extrapolate there)."""
        m, world = self.margin, (1 << z) * self.size
        height, width = mask.shape
        col0, row0 = x0 * self.size - m, y0 * self.size - m
        for axis, start, length in ((1, col0, width), (0, row0, height)):
            lo, hi = max(0, -start), max(0, min(length, world - start))
            outside = [slice(0, lo), slice(hi, length)]
            for part in outside:
                if part.stop > part.start:
                    index = (slice(None), part) if axis == 1 else (part, slice(None))
                    mask[index] = False
                    data[(slice(None), *index)] = self._fill

    def _warp_vrt(
        self, dataset: DatasetReader, transform: Affine, width: int, height: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Warp ``width`` x ``height`` output pixels at ``transform`` through a WarpedVRT."""
        params: dict[str, Any] = {
            "crs": WEB_MERCATOR,
            "transform": transform,
            "width": width,
            "height": height,
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
            raise source_error(self.source, exc, reading=True) from None
        return self._split(values)

    def _split(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Data and validity mask from bands read with their alpha/mask band last (or not,
        with nodata): the class's documented mask order, then non-finite pixels."""
        if self.nodata is None:
            data, mask = values[:-1], values[-1] != 0
        elif np.isnan(self.nodata):
            data, mask = values, ~np.isnan(values).any(axis=0)
        else:
            data, mask = values, ~(values == values.dtype.type(self.nodata)).any(axis=0)
        invalidate_non_finite(data, mask, self._fill)
        return data, mask

    def _read_direct(
        self, dataset: DatasetReader, transform: Affine, width: int, height: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """A source already in EPSG:3857 (north up) needs no warp: a windowed, resampled
        read of the part of the window inside the source, placed into an empty window.

        The same pixels as the warp with nearest resampling (on-grid sources are copied),
        at about twice the speed: GDAL's RasterIO skips the warper's per-chunk set-up.
        """
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
                # The alpha band is the mask only without a nodata value (as in the warp).
                with_alpha = self.alpha is not None and self.nodata is None
                indexes = [*self.bands, self.alpha] if with_alpha else list(self.bands)
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
            raise source_error(self.source, exc, reading=True) from None
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
        size, m = self.size, self.margin
        side = size + 2 * m
        for tile in tiles:
            if not (x0 <= tile.x <= x1 and y0 <= tile.y <= y1):
                yield tile, self._empty()
                continue
            r, c = (tile.y - y0) * size, (tile.x - x0) * size
            tile_data = np.ascontiguousarray(data[:, r : r + side, c : c + side])
            tile_mask = np.ascontiguousarray(mask[r : r + side, c : c + side])
            yield tile, ImageData(data=tile_data, mask=tile_mask, margin=m)

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
        """Read every distinct tile once, pack by pack (see the class's "Order of results")."""
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
