"""Opening a raster with GDAL: the path GDAL opens, the open itself (a failure becomes a
:class:`~chipscale.errors.SourceError` naming the source), and where an open dataset lies."""

from __future__ import annotations

import os
from contextlib import nullcontext

import rasterio
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.io import DatasetReader
from rasterio.warp import transform_bounds

from chipscale.errors import SourceError, quoted
from chipscale.sources.gdal_env import is_remote
from chipscale.sources.read_errors import is_stale, mark_stale, source_error

LONLAT = CRS.from_epsg(4326)


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


def open_dataset(
    source: str | os.PathLike[str], overview_level: int | None = None
) -> DatasetReader:
    """Open ``source`` (path, http(s) or s3 URL) or raise :class:`SourceError` naming it.

    Call it inside :func:`chipscale.sources.gdal_env.gdal_env` so the cloud settings apply.
    """
    kwargs = {} if overview_level is None else {"overview_level": overview_level}
    path = gdal_path(source)
    try:
        path.encode()  # GDAL takes UTF-8: a name of undecodable bytes is none it can open
    except UnicodeEncodeError:
        raise SourceError(f"source {quoted(str(source))} is not UTF-8 text") from None
    stale = is_stale(path)
    try:
        # GDAL splits the option's value at ":", so for an http(s) URL it bypasses the cache
        # of every /vsicurl/http path during this one open: harmless, and rare.
        with rasterio.Env(CPL_VSIL_CURL_NON_CACHED=path) if stale else nullcontext():
            dataset = rasterio.open(path, **kwargs)
    except (RasterioError, OSError) as exc:
        error = source_error(source, exc, after_outage=stale)
        if is_remote(path) and (stale or not error.permanent):
            mark_stale(path, not error.permanent)
        raise error from None
    if stale:
        mark_stale(path, False)
    return dataset


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
