"""A segmentation tile's class mask to what is stored of it: the per-class pixel fractions
(the tile's ``output``) and the 4-connected region of every class as a polygon (its
features), vectorized by GDAL's polygonize (:func:`rasterio.features.shapes`) with the
identity transform, so vertices are integer pixel coordinates of the tile and polygons of
neighbouring tiles meet exactly. Figures: docs/design.md, "Segmentation"."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import orjson
import shapely
from affine import Affine
from rasterio.features import shapes

from chipscale.errors import ModelFormatError
from chipscale.values import ModelInfo, TileFeature

#: The class index of a pixel without a class (masked by the source, or the model said so).
NO_CLASS = 255


def class_mask(mask: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The model's ``(S, S)`` class indices with :data:`NO_CLASS` where ``valid`` (the tile's
    core mask) is False, as uint8 (a copy).

    >>> class_mask(np.array([[0, 1], [2, 3]]), np.array([[True, False], [True, True]])).tolist()
    [[0, 255], [2, 3]]
    """
    out = np.asarray(mask).astype(np.uint8, copy=True)
    out[~np.asarray(valid, dtype=bool)] = NO_CLASS
    return out


def check_classes(mask: np.ndarray, classes: Sequence[str]) -> None:
    """ModelFormatError when a pixel holds a class index the model does not have (other than
    :data:`NO_CLASS`)."""
    counts = np.bincount(mask.ravel(), minlength=NO_CLASS + 1)
    unknown = np.flatnonzero(counts[len(classes) : NO_CLASS])
    if unknown.size:
        raise ModelFormatError(
            f"the model returned class index {int(unknown[0]) + len(classes)} for a pixel; "
            f"it has {len(classes)} classes (0 to {len(classes) - 1})"
        )


def class_fractions(mask: np.ndarray, classes: Sequence[str], decimals: int) -> dict[str, float]:
    """The share of the valid pixels (those not :data:`NO_CLASS`) of each class, rounded to
    ``decimals``: every class, in the model's order, 0 for a class absent from the tile.

    >>> class_fractions(np.array([[0, 0], [1, 255]], dtype=np.uint8), ("a", "b", "c"), 6)
    {'a': 0.666667, 'b': 0.333333, 'c': 0.0}
    """
    counts = np.bincount(mask.ravel(), minlength=NO_CLASS + 1)[: len(classes)]
    valid = int(counts.sum())
    if valid == 0:
        return dict.fromkeys(classes, 0.0)
    return {name: round(int(n) / valid, decimals) for name, n in zip(classes, counts, strict=True)}


def regions(mask: np.ndarray, info: ModelInfo) -> tuple[TileFeature, ...]:
    """Every 4-connected region of one class in a ``(S, S)`` uint8 class mask (no feature
    for :data:`NO_CLASS` pixels) as a polygon, holes kept, in GDAL's order (by each region's
    first pixel in row order); the model's ``background`` class is flagged.

    >>> info = ModelInfo("m", "1", ("land", "water"), 3, 2, background="land")
    >>> [(f.cls, f.background, shapely.from_wkb(f.wkb).area) for f in
    ...  regions(np.array([[1, 0], [0, 255]], dtype=np.uint8), info)]
    [('water', False, 1.0), ('land', True, 1.0), ('land', True, 1.0)]
    """
    size = int(mask.shape[-1])
    found = list(shapes(mask, mask=mask != NO_CLASS, connectivity=4, transform=Affine.identity()))
    if not found:
        return ()
    # GeoJSON text through orjson, then GEOS reads and writes them all in one call each:
    # 2x (smooth masks) to 3.5x (noisy ones) the speed of shapely.geometry.shape per polygon,
    # the same bytes (bench/vectorize.py).
    polygons = shapely.from_geojson([orjson.dumps(geometry) for geometry, _ in found])
    return tuple(
        TileFeature(cls, wkb, background=cls == info.background, size=size)
        for cls, wkb in zip(
            (info.classes[int(value)] for _, value in found),
            shapely.to_wkb(polygons).tolist(),
            strict=True,
        )
    )


def segment(
    mask: np.ndarray, valid: np.ndarray, info: ModelInfo, decimals: int
) -> tuple[dict[str, float], tuple[TileFeature, ...]]:
    """A tile's stored output (:func:`class_fractions`) and features (:func:`regions`) from
    the model's ``(S, S)`` class indices and the tile's ``(S, S)`` core mask.

    Raises ModelFormatError (permanent: the tile's row is ``error``) for a class index the
    model does not have.
    """
    classes = class_mask(mask, valid)
    check_classes(classes, info.classes)
    return class_fractions(classes, info.classes, decimals), regions(classes, info)
