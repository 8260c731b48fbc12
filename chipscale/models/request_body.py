"""Request bodies of the TorchServe wire protocol: the tiles as a ``.npy`` file, compressed
with zstd (``Content-Encoding: zstd``) when the server says it decodes it. Why zstd level 1
by default, with its figures: docs/design.md, section 9.3.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from chipscale.errors import ChipscaleError

try:  # the standard library from Python 3.14
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # the backport, in the worker extra
    try:
        from backports import zstd  # type: ignore[import-not-found,no-redef,unused-ignore]
    except ImportError:  # a client without it sends plain .npy bodies
        zstd = None

#: ``auto``: zstd when the server decodes it (its metadata answer lists it) and this
#: interpreter has zstd, else a plain ``.npy``; ``zstd``: required; ``identity``: never.
CONTENT_ENCODINGS = ("auto", "zstd", "identity")
DEFAULT_CONTENT_ENCODING = "auto"
#: Level 1: 1.3x smaller uint8 RGB aerial tiles for 0.3 ms a tile; level 3 gains 5 % more for
#: 3x the CPU (bench/handler_decode.py).
ZSTD_LEVEL = 1

_NPY = {"Content-Type": "application/octet-stream", "Accept": "application/json"}
_ZSTD = {**_NPY, "Content-Encoding": "zstd"}


def npy(tiles: np.ndarray) -> bytes:
    """``tiles`` as the bytes of a ``.npy`` file (no pickles)."""
    buffer = io.BytesIO()
    np.save(buffer, tiles, allow_pickle=False)
    return buffer.getvalue()


def negotiate(requested: str, advertised: Any, url: str) -> str:
    """The encoding to send to ``url`` (``zstd`` or ``identity``), from the one asked for and
    the ``content_encodings`` of the server's metadata answer (absent from older handlers)."""
    if requested not in CONTENT_ENCODINGS:
        raise ChipscaleError(
            f"content_encoding must be one of {', '.join(CONTENT_ENCODINGS)}, got {requested!r}"
        )
    offered = isinstance(advertised, list) and "zstd" in advertised
    if requested == "zstd":
        if zstd is None:
            raise ChipscaleError(
                "content_encoding='zstd' needs the backports.zstd package "
                "(pip install 'chipscale[worker]')"
            )
        if not offered:
            raise ChipscaleError(
                f"{url} does not decode zstd request bodies (its handler predates them or "
                "lacks backports.zstd): use content_encoding 'auto' or 'identity'"
            )
        return "zstd"
    if requested == "auto" and offered and zstd is not None:
        return "zstd"
    return "identity"


def encode(tiles: np.ndarray, encoding: str) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a request carrying ``tiles``."""
    body = npy(tiles)
    if encoding != "zstd":
        return body, _NPY
    assert zstd is not None
    return zstd.compress(body, level=ZSTD_LEVEL), _ZSTD


def encoding_refused(status: int, message: str) -> bool:
    """Whether a host refused a zstd body for not decoding zstd (415; 400 "not a .npy file"
    from a handler older than zstd support): a mixed fleet in a rollout. The request is then
    sent again as a plain ``.npy``, not refused."""
    return status == 415 or (status == 400 and "not a .npy file" in message)
