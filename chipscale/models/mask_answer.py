"""A segmentation model's answer over the wire: the ``"masks"`` of the TorchServe handler's
200 answer (``model_server/chipscale_handler.py``) decoded into the ``(N, S, S)`` uint8
class indices the in-process predictor gives. Why zstd, with the figures: docs/design.md 9.3.
Needs no torch: the worker Lambda decodes answers too."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import numpy as np

from chipscale.errors import ChipscaleError
from chipscale.values import ModelInfo

try:  # the standard library from Python 3.14, as chipscale.models.request_body
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    try:
        from backports import zstd  # type: ignore[import-not-found,no-redef,unused-ignore]
    except ImportError:  # masks then come as "identity" only
        zstd = None

#: The request header a client lists the mask encodings it decodes in (the handler's
#: ``MASK_ENCODINGS_HEADER``); without it the handler answers zstd when it has zstd.
MASK_ENCODINGS_HEADER = "X-Chipscale-Mask-Encodings"

#: The class index of a pixel with no class (``chipscale_runtime.NO_CLASS``): the whole mask of
#: a tile the model has no answer for.
NO_CLASS = 255


def empty_answer(info: ModelInfo, n: int) -> np.ndarray:
    """What a predictor fills for ``n`` tiles before any answer: NaN ``(n, classes)`` scores,
    or a segmentation model's ``(n, S, S)`` masks of :data:`NO_CLASS`."""
    if info.task == "segmentation":
        return np.full((n, info.tile_size, info.tile_size), NO_CLASS, dtype=np.uint8)
    return np.full((n, len(info.classes)), np.nan, dtype=np.float32)


def answer_headers(info: ModelInfo) -> dict[str, str]:
    """Headers a request for ``info``'s model adds: a segmentation model's mask encodings this
    Python decodes (zstd needs ``backports.zstd`` before Python 3.14)."""
    if info.task != "segmentation":
        return {}
    return {MASK_ENCODINGS_HEADER: "identity" if zstd is None else "zstd, identity"}


def decode_masks(masks: Any, tiles: int, info: ModelInfo, origin: str) -> np.ndarray:
    """The ``(tiles, S, S)`` uint8 masks of an answer's ``"masks"`` object; ``origin`` (the
    server's URL) names who answered in the :class:`~chipscale.errors.ChipscaleError` raised
    for an answer that is not what it says (shape, encoding, class indices).

    >>> from chipscale.models.model_info import model_info
    >>> info = model_info({"name": "m", "version": "1", "classes": ["a", "b"], "bands": 1,
    ...                    "tile_size": 2, "task": "segmentation"})
    >>> data = base64.b64encode(bytes([0, 1, 1, 255])).decode()
    >>> decode_masks({"shape": [1, 2, 2], "dtype": "uint8", "encoding": "identity",
    ...               "data": data}, 1, info, "test").tolist()
    [[[0, 1], [1, 255]]]
    """
    size = info.tile_size
    expected = (tiles, size, size)

    def garbled(why: str) -> ChipscaleError:
        return ChipscaleError(f"TorchServe at {origin} answered masks that {why}")

    if not isinstance(masks, Mapping):
        raise garbled(f"are not an object: {type(masks).__name__}")
    shape = tuple(masks.get("shape") or ())
    if shape != expected or masks.get("dtype") != "uint8":
        raise garbled(
            f"are {masks.get('dtype')} {shape} for {tiles} tiles, expected uint8 {expected} "
            "(tiles, tile_size, tile_size)"
        )
    try:
        data = base64.b64decode(str(masks.get("data", "")), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise garbled(f"are not base64: {exc}") from exc
    encoding = masks.get("encoding")
    length = tiles * size * size
    if encoding == "zstd":
        if zstd is None:
            raise garbled("are zstd-compressed, and this Python has no zstd (backports.zstd)")
        decompressor = zstd.ZstdDecompressor()
        try:
            data = decompressor.decompress(data, max_length=length + 1)
        except zstd.ZstdError as exc:
            raise garbled(f"are not a readable zstd frame: {exc}") from exc
        if not decompressor.eof or decompressor.unused_data:
            raise garbled("are not exactly one whole zstd frame")
    elif encoding != "identity":
        raise garbled(f"have an unknown encoding {encoding!r} (known: zstd, identity)")
    if len(data) != length:
        raise garbled(f"hold {len(data)} bytes, expected {length} for {expected}")
    array = np.frombuffer(data, dtype=np.uint8).reshape(expected).copy()
    stray = array[(array >= len(info.classes)) & (array != NO_CLASS)]
    if stray.size:
        raise garbled(f"hold class index {stray[0]}, and the model has {len(info.classes)} classes")
    return array
