"""Which failures of a GDAL open or read are transient (the queue retries the message) and
which are permanent (the tiles become ``error`` rows), and the remote paths whose last open
failed transiently."""

from __future__ import annotations

import os
import re
import threading

from chipscale.errors import SourceError, SourceUnavailable, one_line
from chipscale.sources.gdal_env import is_remote

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


def source_error(
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


def is_stale(path: str) -> bool:
    """Whether the last open of ``path`` failed transiently (see ``_STALE``)."""
    with _STALE_LOCK:
        return path in _STALE


def mark_stale(path: str, stale: bool) -> None:
    """Record whether the last open of ``path`` failed transiently."""
    with _STALE_LOCK:
        if stale:
            _STALE.add(path)
        else:
            _STALE.discard(path)
