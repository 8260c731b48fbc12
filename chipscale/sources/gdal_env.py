"""GDAL settings for reading tiles, in one place: the cloud-optimised defaults (TiTiler's
recommendations, see FIELD-NOTES "Reading tiles"), the ones that depend on the source, and
S3-compatible endpoints derived from the AWS SDK's variables. Set here and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import urlsplit

import rasterio

#: Defaults tuned for COGs over HTTP/S3; each can be overridden by the environment.
CLOUD_DEFAULTS: dict[str, str] = {
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "GDAL_HTTP_VERSION": "2",
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": str(64 * 1024 * 1024),  # bytes, per opened file
    "GDAL_CACHEMAX": "256",  # MB: bounds the block cache, hence a worker's memory
    "GDAL_INGESTED_BYTES_AT_OPEN": "32768",
    "GDAL_BAND_BLOCK_CACHE": "HASHSET",
    "GDAL_HTTP_TIMEOUT": "30",
    "GDAL_HTTP_CONNECTTIMEOUT": "10",
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "1",
}

#: Only for remote sources: a local directory listing is cheap and finds ``.msk`` sidecars.
REMOTE_ONLY: dict[str, str] = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}

#: Only for sources whose name ends with one of these suffixes.
TIFF_SUFFIXES = (".tif", ".tiff")
ALLOWED_EXTENSIONS = ".tif,.TIF,.tiff"

_REMOTE_SCHEMES = ("http://", "https://", "s3://", "/vsicurl/", "/vsis3/", "/vsigs/", "/vsiaz/")


def is_remote(source: str | os.PathLike[str] | None) -> bool:
    """True for an http(s) or s3 URL (or a GDAL network path)."""
    return source is not None and str(source).startswith(_REMOTE_SCHEMES)


def s3_endpoint_options(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """GDAL's S3 endpoint options derived from ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``.

    Returns nothing when ``AWS_S3_ENDPOINT`` is already set (GDAL reads it itself) or when no
    custom endpoint is configured (real AWS).

    >>> s3_endpoint_options({"AWS_ENDPOINT_URL": "http://127.0.0.1:5000"})
    {'AWS_S3_ENDPOINT': '127.0.0.1:5000', 'AWS_HTTPS': 'NO', 'AWS_VIRTUAL_HOSTING': 'FALSE'}
    """
    env = os.environ if environ is None else environ
    if env.get("AWS_S3_ENDPOINT"):
        return {}
    url = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if not url:
        return {}
    parts = urlsplit(url if "://" in url else f"https://{url}")
    options = {
        "AWS_S3_ENDPOINT": parts.netloc + parts.path.rstrip("/"),
        "AWS_HTTPS": "NO" if parts.scheme == "http" else "YES",
        # A custom endpoint is addressed by path (http://host/bucket/key): no DNS per bucket.
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }
    return {key: value for key, value in options.items() if key not in env}


def gdal_options(
    source: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The configuration options :func:`gdal_env` sets for reading ``source``.

    Precedence, lowest first: :data:`CLOUD_DEFAULTS`, then the process environment (a user
    who exports ``GDAL_CACHEMAX=1024`` wins: an option already in the environment is left
    out), then keyword overrides given to :func:`gdal_env`. Two defaults depend on the source:

    * ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR`` saves a directory listing per remote open,
      but it also hides a sidecar ``SOURCE.msk`` mask. Local files are cheap to list, so it
      is set for remote sources only and external masks of local files keep working.
    * ``CPL_VSIL_CURL_ALLOWED_EXTENSIONS`` stops GDAL probing sidecar files over HTTP, but it
      makes a URL without a ``.tif`` suffix unreadable; it is set only when the source has
      that suffix.

    S3-compatible endpoints (MinIO, localstack, moto): GDAL reads ``AWS_S3_ENDPOINT``,
    ``AWS_HTTPS`` and ``AWS_VIRTUAL_HOSTING``; when those are unset but the AWS SDK variable
    ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` is, they are derived from it
    (:func:`s3_endpoint_options`), so boto3 and GDAL talk to the same server.
    """
    env = os.environ if environ is None else environ
    options = dict(CLOUD_DEFAULTS)
    if source is None or is_remote(source):
        options.update(REMOTE_ONLY)
    if source is not None and str(source).split("?", 1)[0].lower().endswith(TIFF_SUFFIXES):
        options["CPL_VSIL_CURL_ALLOWED_EXTENSIONS"] = ALLOWED_EXTENSIONS
    options = {key: value for key, value in options.items() if key not in env}
    options.update(s3_endpoint_options(env))
    return options


def gdal_env(source: str | os.PathLike[str] | None = None, **overrides: str) -> rasterio.Env:
    """A :class:`rasterio.Env` with the tuned options for ``source``; use it as a context.

    ``overrides`` win over everything (e.g. ``gdal_env(src, GDAL_CACHEMAX="64")``).
    """
    options: dict[str, str | int] = {**gdal_options(source), **overrides}
    cachemax = options.get("GDAL_CACHEMAX")
    if isinstance(cachemax, str) and cachemax.isdigit():
        # rasterio sets this one through GDALSetCacheMax, which takes BYTES: "256" would be a
        # 256-byte cache (measured: 7x slower warps). GDAL reads values under 100000 as MB.
        megabytes = int(cachemax)
        options["GDAL_CACHEMAX"] = megabytes * 1024 * 1024 if megabytes < 100_000 else megabytes
    return rasterio.Env(**options)
