"""A factory of small rasters for every case the tile reader must handle.

Plain functions writing real GeoTIFFs under a directory (``tmp_path``), so each test builds
exactly the file it needs: dtype, band count, CRS, nodata, alpha band, internal or external
mask, tiled with overviews or strip-organised, crossing the antimeridian, and one 40,000 x
40,000 px COG cheap enough to write in a few seconds (sparse: most blocks are never written).

Every raster has an "invalid" left quarter (nodata, alpha 0 or mask 0, depending on the mask
kind) and a deterministic pattern elsewhere, so tests can check both data and mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp, Resampling

MaskKind = Literal["none", "nodata", "alpha", "internal", "external"]

#: Half the width of the web-mercator world, metres.
ORIGIN = 20037508.342789244


def mercator_res(z: int, size: int = 256) -> float:
    """Pixel size at zoom ``z`` of the web-mercator tile grid."""
    return 2 * ORIGIN / ((1 << z) * size)


def grid_origin(x: int, y: int, z: int) -> tuple[float, float]:
    """Top-left corner (metres) of tile (x, y, z): rasters starting there are on the grid."""
    span = 2 * ORIGIN / (1 << z)
    return -ORIGIN + x * span, ORIGIN - y * span


#: Where each CRS's raster sits: (crs, west, north, pixel size in CRS units).
PLACES: dict[str, tuple[str, float, float, float]] = {
    # On the z16 grid (tile 34952, 23450 is near lon 12.0, lat 45.6), pixel = z16 pixel.
    "EPSG:3857": ("EPSG:3857", *grid_origin(34952, 23450, 16), mercator_res(16)),
    "EPSG:4326": ("EPSG:4326", 12.0, 45.6, 2e-5),
    "UTM": ("EPSG:32633", 300000.0, 5050000.0, 2.0),  # UTM 33N, near lon 12.4, lat 45.6
    # 179.99..180.01 E at 1e-4 deg x 512 px: crosses the antimeridian.
    "ANTIMERIDIAN": ("EPSG:4326", 179.9744, -16.0, 1e-4),
    # UTM zone 60S spanning 180: centred near lon 180, lat -16.
    "ANTIMERIDIAN_UTM": ("EPSG:32760", 820000.0, 8230000.0, 10.0),
}


def pattern(count: int, height: int, width: int, dtype: str) -> np.ndarray:
    """Deterministic, band-distinct, never-zero values (zero is the nodata value in tests)."""
    rows, cols = np.mgrid[0:height, 0:width]
    bands = [((rows * 7 + cols * 3 + b * 50) % 250 + 1) for b in range(count)]
    data = np.stack(bands).astype(dtype)
    if np.dtype(dtype).kind == "u" and np.dtype(dtype).itemsize > 1:
        data = data * np.array(200, dtype=dtype)  # uint16: use the high range too
    return data


def make_raster(
    directory: Path,
    name: str = "raster.tif",
    *,
    dtype: str = "uint8",
    count: int = 3,
    place: str = "EPSG:3857",
    width: int = 512,
    height: int = 512,
    mask: MaskKind = "none",
    nodata: float | None = 0,
    tiled: bool = True,
    overviews: bool = True,
    blocksize: int = 256,
) -> Path:
    """Write one raster and return its path.

    ``mask`` chooses how the left quarter is marked invalid: ``nodata`` (pixel value
    ``nodata`` in every band), ``alpha`` (an extra alpha band, 0 there), ``internal``
    (``GDAL_TIFF_INTERNAL_MASK``), ``external`` (a ``.msk`` sidecar), or ``none``.
    """
    crs, west, north, res = PLACES[place]
    path = Path(directory) / name
    data = pattern(count, height, width, dtype)
    invalid = np.zeros((height, width), dtype=bool)
    invalid[:, : width // 4] = True
    profile: dict = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count + (1 if mask == "alpha" else 0),
        "dtype": dtype,
        "crs": crs,
        "transform": Affine(res, 0, west, 0, -res, north),
        "compress": "deflate",
    }
    if tiled:
        profile.update(tiled=True, blockxsize=blocksize, blockysize=blocksize)
    else:
        profile.update(tiled=False, blockysize=8)
    if mask == "nodata":
        profile["nodata"] = nodata
        data[:, invalid] = nodata
    if mask == "alpha":
        alpha = np.where(invalid, 0, np.iinfo(dtype).max if np.dtype(dtype).kind in "ui" else 1)
        data = np.concatenate([data, alpha[None].astype(dtype)])
    with (
        rasterio.Env(GDAL_TIFF_INTERNAL_MASK=mask == "internal"),
        rasterio.open(path, "w", **profile) as dst,
    ):
        dst.write(data)
        if mask == "alpha":
            dst.colorinterp = [
                *(
                    [ColorInterp.gray]
                    if count == 1
                    else [ColorInterp.red, ColorInterp.green, ColorInterp.blue][:count]
                ),
                *[ColorInterp.undefined] * max(0, count - 3),
                ColorInterp.alpha,
            ][: count + 1]
        if mask in ("internal", "external"):
            dst.write_mask(np.where(invalid, 0, 255).astype("uint8"))
        if overviews:
            dst.build_overviews([2, 4], Resampling.nearest)
    if mask == "external":
        assert path.with_name(path.name + ".msk").exists()
    if mask == "internal":
        assert not path.with_name(path.name + ".msk").exists()
    return path


def make_big_cog(directory: Path, name: str = "big.tif", size: int = 40_000) -> Path:
    """A real ``size`` x ``size`` px, 3-band uint8 tiled deflate GeoTIFF with overviews.

    Sparse (``SPARSE_OK``): only a diagonal band of blocks is written, the rest reads as 0,
    so the file is small and quick to make while a reader still sees a 40k x 40k image.
    It starts on the z18 grid at tile (218000, 100000) with z18 pixels (about 24 km across).
    """
    path = Path(directory) / name
    block = 512
    west, north = grid_origin(218000, 100000, 18)
    res = mercator_res(18)
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:3857",
        "transform": Affine(res, 0, west, 0, -res, north),
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": "deflate",
        "sparse_ok": True,
        "nodata": 0,
    }
    tile = pattern(3, block, block, "uint8")
    with rasterio.open(path, "w", **profile) as dst:
        for offset in range(0, size - block + 1, block * 4):
            window = rasterio.windows.Window(offset, offset, block, block)
            dst.write(tile, window=window)
        dst.build_overviews([2, 4, 8, 16, 32, 64], Resampling.nearest)
    return path


def make_mosaic_cog(image: Path, out: Path, repeat: int = 4) -> Path:
    """``image`` tiled ``repeat`` x ``repeat`` as a JPEG COG with 512 px blocks: from the
    aerial image, 4096 x 4096 px and about 5 MB, too large for GDAL to hold whole after a few
    reads, so a pack at zoom 20 (one block) reads bytes no earlier pack fetched."""
    from rasterio.io import MemoryFile
    from rasterio.shutil import copy as rio_copy

    with rasterio.open(image) as src:
        pixels = np.tile(src.read(), (1, repeat, repeat))
        profile = {
            "driver": "GTiff",
            "width": pixels.shape[2],
            "height": pixels.shape[1],
            "count": pixels.shape[0],
            "dtype": pixels.dtype.name,
            "crs": src.crs,
            "transform": src.transform,
        }
    with MemoryFile() as memfile:
        with memfile.open(**profile) as dst:
            dst.write(pixels)
        with memfile.open() as flat:
            rio_copy(flat, out, driver="COG", compress="JPEG", blocksize=512, quality=90)
    return out
