"""Tiles as pictures, for debugging: a PNG a person can open."""

from __future__ import annotations

import warnings

import numpy as np
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile

from chipscale.values import ImageData


def stretch_to_uint8(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """To uint8 for display: uint8 as is, anything else (uint16 imagery, floats) by a
    2-98 % stretch of each band's valid pixels, so one bright outlier does not grey it out."""
    if data.dtype == np.uint8:
        return data
    out = np.zeros(data.shape, dtype=np.uint8)
    for i, band in enumerate(data.astype("float64")):
        valid = band[mask & np.isfinite(band)]
        if valid.size == 0:
            continue
        low, high = np.percentile(valid, [2, 98])
        span = high - low or 1.0
        out[i] = (np.clip((np.nan_to_num(band) - low) / span, 0, 1) * 255).astype(np.uint8)
    return out


def to_display(image: ImageData) -> np.ndarray:
    """uint8 ``(3, size, size)`` RGB for display: the first three bands (or one, grey)."""
    bands = image.data[:3] if image.data.shape[0] >= 3 else image.data[:1].repeat(3, axis=0)
    return stretch_to_uint8(bands, image.mask)


def to_png(image: ImageData) -> bytes:
    """PNG bytes of a tile, invalid pixels transparent; a picture, so no georeferencing
    (rasterio's warning that it has none is expected, not shown)."""
    rgb = to_display(image)
    alpha = np.where(image.mask, 255, 0).astype(np.uint8)[np.newaxis]
    pixels = np.concatenate([rgb, alpha])
    _, height, width = pixels.shape
    with MemoryFile() as memfile, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with memfile.open(
            driver="PNG", width=width, height=height, count=4, dtype="uint8"
        ) as dataset:
            dataset.write(pixels)
        return memfile.read()
