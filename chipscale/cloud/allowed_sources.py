"""Which sources the cloud worker may read: its allow-list, compared as GDAL, curl and urllib3
will resolve a URL, not as text.

A source becomes a :class:`Location` (scheme, bucket or host and port, path), refusing what
has no single reading, and is then compared with each allowed prefix segment by segment.
Why: docs/design.md, "Security".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from chipscale.errors import InvalidMessageError

#: S3 bucket names (lower case only: ``s3://RTBUCKET`` names no bucket).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
#: A ``.`` or ``..`` segment; ``?`` and ``#`` end one too (GDAL resolves the whole key), and
#: so does ``;`` (Tomcat and Spring read ``/..;/`` as ``/../``).
_DOT_SEGMENT = re.compile(r"(?:^|[/?#;])\.\.?(?:[/?#;]|$)")
_HOST = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")
_IPV6 = re.compile(r"[0-9a-f:.]+")
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Kept as they are when a path is re-encoded: RFC 3986's sub-delimiters, ":" and "@".
_PATH_SAFE = "/:@!$&'()*+,;="


@dataclass(frozen=True, slots=True)
class Location:
    """What a source URL reads: ``s3`` and a bucket, or ``http(s)`` and ``host:port``; the
    object key or the path in one canonical spelling (the query is not part of it)."""

    scheme: str
    authority: str
    path: str

    def within(self, prefix: Location) -> bool:
        """Whether this location lies under ``prefix``: ``.../a/`` and ``.../a`` both hold
        ``.../a/x.tif``; ``.../a`` also names ``.../a`` itself, never ``.../ab``."""
        if (self.scheme, self.authority) != (prefix.scheme, prefix.authority):
            return False
        base = prefix.path
        if base in ("", "/") or base.endswith("/"):
            return self.path.startswith(base)
        return self.path == base or self.path.startswith(base + "/")


def locate(url: str) -> Location:
    """The :class:`Location` ``url`` reads, or :class:`InvalidMessageError` saying why it has
    no single reading.

    >>> locate("http://Host:80/a/%62.tif?sig=1")
    Location(scheme='http', authority='host:80', path='/a/b.tif')
    >>> locate("s3://bucket/a/../b.tif")
    Traceback (most recent call last):
    chipscale.errors.InvalidMessageError: it has a dot segment (. or ..)
    """
    decoded = _decoded(url)
    if "\\" in decoded:
        raise InvalidMessageError("it has a backslash")
    if url.startswith("s3://"):
        bucket, _, key = url.removeprefix("s3://").partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise InvalidMessageError(f"{bucket!r} is not an S3 bucket name")
        _refuse_dot_segments(key)
        return Location("s3", bucket, key)
    if not url.startswith(("http://", "https://")):
        raise InvalidMessageError("it is not an s3:// or http(s):// URL")
    parts = urlsplit(url)
    if "#" in url:
        raise InvalidMessageError("it has a fragment (#)")
    if "@" in parts.netloc:
        raise InvalidMessageError("it carries user information (@)")
    host = parts.hostname or ""
    if not (_HOST.fullmatch(host) or (":" in host and _IPV6.fullmatch(host))):
        raise InvalidMessageError(f"{parts.netloc!r} is not a host name")
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise InvalidMessageError(f"{parts.netloc!r} has a malformed port") from None
    path = parts.path or "/"
    _refuse_dot_segments(path)
    if re.search("%2f|%5c", path, re.IGNORECASE):
        raise InvalidMessageError("its path has an encoded / or \\")
    host = f"[{host}]" if ":" in host else host
    return Location(parts.scheme, f"{host}:{port}", quote(unquote(path), safe=_PATH_SAFE))


def check_prefix(prefix: str) -> Location:
    """An allowed prefix as a :class:`Location`, or :class:`InvalidMessageError` saying why
    it cannot be one (a query or a dot segment in a prefix is a configuration mistake)."""
    if "?" in prefix and not prefix.startswith("s3://"):
        raise InvalidMessageError(f"allowed source {prefix!r} has a query")
    try:
        return locate(prefix)
    except InvalidMessageError as exc:
        raise InvalidMessageError(f"allowed source {prefix!r}: {exc}") from None


def source_refusal(source: str, allowed: Sequence[str]) -> str | None:
    """Why the cloud worker must not read ``source``, or None when it may.

    s3:// sources must lie under an allowed ``s3://`` prefix (the worker's IAM role reads only
    those buckets anyway; refusing here records a clear reason instead of an AccessDenied).
    http(s) sources must lie under an allowed http(s) prefix when any is configured, and are
    open otherwise. Anything else (a local path, a GDAL ``/vsi`` path) would read the
    Lambda's own file system and is refused, as is any source :func:`locate` cannot read
    one way only. An allowed prefix that is malformed allows nothing.

    >>> source_refusal("s3://tiles/a/x.tif", ["s3://tiles/a/"]) is None
    True
    >>> source_refusal("s3://tiles-b/x.tif", ["s3://tiles"])
    "source 's3://tiles-b/x.tif' is outside the allowed sources: s3://tiles"
    """
    try:
        where = locate(source)
    except InvalidMessageError as exc:
        return f"source {source!r} is refused: {exc}"
    web = where.scheme != "s3"
    candidates = [p for p in allowed if p.startswith(("http://", "https://") if web else "s3://")]
    if web and not candidates:
        return None
    for prefix in candidates:
        try:
            if where.within(check_prefix(prefix)):
                return None
        except InvalidMessageError:
            continue
    listed = ", ".join(candidates) or "(no s3:// source is configured)"
    return f"source {source!r} is outside the allowed sources: {listed}"


def pack_refusal(
    source: str, assets: Sequence[tuple[str, str]], allowed: Sequence[str]
) -> str | None:
    """Why the worker must not read a message's pack, or None when it may: its ``source``,
    or, for a mosaic pack, each of its candidate ``assets`` (``(id, href)``; the source then
    only names the job's list or search and is never read). The reason names the first asset
    refused.

    >>> pack_refusal("naip.txt", [("a", "s3://tiles/a.tif")], ["s3://tiles/"]) is None
    True
    >>> pack_refusal("naip.txt", [("b", "s3://other/b.tif")], ["s3://tiles/"])
    "asset 'b': source 's3://other/b.tif' is outside the allowed sources: s3://tiles/"
    """
    if not assets:
        return source_refusal(source, allowed)
    for asset_id, href in assets:
        refusal = source_refusal(href, allowed)
        if refusal is not None:
            return f"asset {asset_id!r}: {refusal}"
    return None


def _decoded(text: str) -> str:
    """``text`` percent-decoded until nothing changes (a server may decode it again)."""
    while True:
        decoded = unquote(text)
        if decoded == text:
            return text
        text = decoded


def _refuse_dot_segments(path: str) -> None:
    if _DOT_SEGMENT.search(_decoded(path)):
        raise InvalidMessageError("it has a dot segment (. or ..)")
