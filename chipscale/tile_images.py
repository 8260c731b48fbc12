"""Tiles as pictures, for debugging: a PNG a person can open."""

from __future__ import annotations

import numpy as np
from rasterio.io import MemoryFile

from chipscale.types import ImageData


def to_display(image: ImageData) -> np.ndarray:
    """uint8 ``(3, size, size)`` RGB for display: the first three bands (or one, grey).

    Non-uint8 data is stretched 2-98 % over its valid pixels, so uint16 imagery shows.
    """
    bands = image.data[:3] if image.data.shape[0] >= 3 else image.data[:1].repeat(3, axis=0)
    if bands.dtype == np.uint8:
        return bands
    valid = bands[:, image.mask] if image.mask.any() else bands.reshape(bands.shape[0], -1)
    low, high = np.percentile(valid, [2, 98]) if valid.size else (0.0, 1.0)
    scaled = (bands.astype("float64") - low) / max(float(high - low), 1e-12)
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8)


def to_png(image: ImageData) -> bytes:
    """PNG bytes of a tile, invalid pixels transparent."""
    rgb = to_display(image)
    alpha = np.where(image.mask, 255, 0).astype(np.uint8)[np.newaxis]
    pixels = np.concatenate([rgb, alpha])
    _, height, width = pixels.shape
    with MemoryFile() as memfile:
        with memfile.open(
            driver="PNG", width=width, height=height, count=4, dtype="uint8"
        ) as dataset:
            dataset.write(pixels)
        return memfile.read()
