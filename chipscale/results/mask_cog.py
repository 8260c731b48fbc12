"""A segmentation job's class mask as a Cloud-Optimized GeoTIFF: uint8 class index (the job's
class order), 255 where no pixel has a class, EPSG:3857 on the zoom's pixel grid, overviews by
mode. Rebuilt from the stored polygons (background regions included), tile by tile: each
tile's regions are rasterized into its block of a sparse tiled GeoTIFF, which GDAL's COG
driver then copies with its overviews, so memory stays one tile (plus GDAL's cache)."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.features import rasterize
from rasterio.shutil import copy as gdal_copy
from rasterio.windows import Window

from chipscale.results.base import ResultStore
from chipscale.results.export_rows import ExportError, PathLike
from chipscale.values import FeatureRow

__all__ = ["NODATA", "mask_extent", "write_mask_cog"]

#: The class index of a pixel without a class.
NODATA = 255
#: Half the web-mercator world's width, in metres.
HALF_WORLD = 20037508.342789244
#: Internal tile size of the COG.
COG_BLOCK = 512


def mask_extent(store: ResultStore, job: str) -> tuple[int, int, int, int, int, int]:
    """``(z, size, xmin, ymin, xmax, ymax)``: the job's zoom and tile size (from its stored
    features) and the tiles its features span, or :class:`ExportError` when it has none."""
    z = size = None
    xmin = ymin = 2**31
    xmax = ymax = -1
    for row in store.iter_features(job, background=True):
        if z is None:
            z, size = row.z, row.size
        elif (row.z, row.size) != (z, size):
            raise ExportError(f"job {job!r} mixes zooms or tile sizes: one mask per grid")
        xmin, xmax = min(xmin, row.x), max(xmax, row.x)
        ymin, ymax = min(ymin, row.y), max(ymax, row.y)
    if z is None or size is None:
        raise ExportError(f"job {job!r} stored no class mask (no features): nothing to write")
    return z, size, xmin, ymin, xmax, ymax


def _class_index(job_classes: Sequence[str]) -> dict[str, int]:
    index = {name: i for i, name in enumerate(job_classes)}
    if len(index) >= NODATA:
        raise ExportError(f"a class mask holds at most {NODATA} classes, not {len(index)}")
    return index


def write_mask_cog(
    store: ResultStore,
    job: str,
    path: PathLike,
    *,
    classes: Sequence[str] | None = None,
) -> int:
    """Write the job's class mask to ``path`` as a COG (only ``classes`` when given: other
    pixels are 255); returns how many tiles were drawn. Written atomically."""
    info = store.get_job(job)
    if info is None:
        raise ExportError(f"No job {job!r} in {store.url}")
    z, size, xmin, ymin, xmax, ymax = mask_extent(store, job)
    index = _class_index(info.classes)
    res = 2 * HALF_WORLD / (2**z * size)
    transform = Affine(
        res, 0, -HALF_WORLD + xmin * size * res, 0, -res, HALF_WORLD - ymin * size * res
    )
    width, height = (xmax - xmin + 1) * size, (ymax - ymin + 1) * size
    block = size if size % 16 == 0 else 256
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    drawn = 0
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        sparse = os.path.join(tmp, "mask.tif")
        profile = dict(
            driver="GTiff", width=width, height=height, count=1, dtype="uint8", nodata=NODATA,
            crs="EPSG:3857", transform=transform, tiled=True, blockxsize=block,
            blockysize=block, compress="deflate", zlevel=1, sparse_ok=True, bigtiff="if_safer",
        )  # fmt: skip
        with rasterio.open(sparse, "w", **profile) as dst:
            rows = store.iter_features(job, classes=classes, background=True)
            for (tx, ty), group in itertools.groupby(rows, key=lambda r: (r.x, r.y)):
                tile = _rasterize_tile(group, index, size)
                window = Window((tx - xmin) * size, (ty - ymin) * size, size, size)
                dst.write(tile, 1, window=window)
                drawn += 1
        part = os.path.join(tmp, "mask.cog.tif")
        gdal_copy(
            sparse, part, driver="COG", COMPRESS="DEFLATE", PREDICTOR="NO", BLOCKSIZE=COG_BLOCK,
            OVERVIEW_RESAMPLING="MODE", BIGTIFF="IF_SAFER", SPARSE_OK="TRUE",
        )  # fmt: skip
        os.chmod(part, 0o644)
        os.replace(part, target)
    return drawn


def _rasterize_tile(rows: Iterable[FeatureRow], index: dict[str, int], size: int) -> np.ndarray:
    """One tile's block: its regions burnt with their class index over 255. Pixel regions with
    integer vertices cover whole pixels, so the pixel-centre rule gives back the mask exactly."""
    shapes = []
    for row in rows:
        if row.cls not in index:
            raise ExportError(
                f"stored class {row.cls!r} is not one of the job's classes {list(index)}"
            )
        shapes.append((shapely.from_wkb(row.wkb), index[row.cls]))
    if not shapes:
        return np.full((size, size), NODATA, dtype=np.uint8)
    return rasterize(
        shapes, out_shape=(size, size), fill=NODATA, transform=Affine.identity(), dtype="uint8"
    )
