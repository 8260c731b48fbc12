"""Value types shared across the ports (tiles, predictors, stores).

Kept apart so the worker, the stores and the adapters agree on one shape without importing
each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from mercantile import Tile

Status = Literal["ok", "empty", "error"]

#: What a model answers (``chipscale.json``'s ``"task"``): scores per tile, a class per pixel,
#: or boxes.
Task = Literal["classification", "segmentation", "detection"]


@dataclass(frozen=True, slots=True)
class ImageData:
    """One tile's pixels: ``data`` is ``(bands, size + 2 * margin, size + 2 * margin)`` in the
    source dtype and ``mask`` is ``(size + 2 * margin, size + 2 * margin)`` bool, True where
    the pixel is valid. The margin holds the source's own neighbouring pixels (the pixels the
    neighbouring tiles read), not padding. ``assets`` names the assets that supplied the
    pixels, in the order they were used (a mosaic source; empty for a single raster)."""

    data: np.ndarray
    mask: np.ndarray
    margin: int = 0
    assets: tuple[str, ...] = ()

    @property
    def core_mask(self) -> np.ndarray:
        """The mask of the tile itself, without its margin: ``(size, size)``."""
        m = self.margin
        return self.mask[m : self.mask.shape[0] - m, m : self.mask.shape[1] - m] if m else self.mask

    @property
    def is_empty(self) -> bool:
        """True when no pixel of the tile itself is valid: such a tile never reaches the model
        (pixels in its margin alone do not count)."""
        return not bool(self.core_mask.any())


def invalidate_non_finite(data: np.ndarray, mask: np.ndarray, fill: float) -> None:
    """Mark NaN and inf pixels of float ``(bands, h, w)`` data invalid in ``mask`` and set
    them to ``fill``, in place: no source's NaN reaches a model, and an all-NaN tile is empty.

    >>> data, mask = np.array([[[1.0, np.nan]]]), np.array([[True, True]])
    >>> invalidate_non_finite(data, mask, 0)
    >>> data.tolist(), mask.tolist()
    ([[[1.0, 0.0]]], [[True, False]])
    """
    if data.dtype.kind != "f":
        return
    finite = np.isfinite(data).all(axis=0)
    if not finite.all():
        data[:, ~finite] = fill
        mask &= finite


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a predictor says about the model it runs (from the model file's metadata)."""

    name: str
    version: str
    classes: tuple[str, ...]
    bands: int
    tile_size: int
    #: Every band count the model accepts (e.g. RGB or RGB+NIR); empty means just ``bands``.
    band_counts: tuple[int, ...] = ()
    #: What the model answers: scores per tile, a class per pixel, or boxes.
    task: Task = "classification"
    #: Context in pixels read on each side of a tile: the model takes ``tile_size + 2 * margin``.
    margin: int = 0
    #: A segmentation class that is never vectorized into features (its pixels are still
    #: stored, so the class mask can be rebuilt).
    background: str | None = None


@dataclass(frozen=True, slots=True)
class TileFeature:
    """One vector feature a tile produced: a 4-connected region of one class (segmentation)
    or a box (detection).

    ``wkb`` is the geometry as WKB in the tile's pixel coordinates: ``(column, row)`` with the
    origin at the top-left corner of the tile itself (its margin excluded), y down, one unit
    a pixel of the zoom's grid (so a tile spans ``[0, size]``). Segmentation regions have
    integer vertices, which is what makes the merge across tiles exact. Detection boxes may
    reach outside ``[0, size]``.
    """

    cls: str
    wkb: bytes
    #: A detection's score; None for a segmentation region.
    score: float | None = None
    #: True for a region of the model's ``background`` class: stored (the class mask is
    #: rebuilt from the features) but never exported as a feature.
    background: bool = False
    #: The tile size in pixels the coordinates are measured in (the model's ``tile_size``;
    #: stored as :attr:`FeatureRow.size`).
    size: int = 256


@dataclass(frozen=True, slots=True)
class TileResult:
    """One result row before it is stored: the unit of idempotent upsert is
    ``(job, tile.z, tile.x, tile.y)``. Its ``features`` are replaced in the same write (``()``
    leaves the tile with none); None, a task without features (classification), leaves the
    stored features alone, so such a write costs no feature statement."""

    job: str
    tile: Tile
    status: Status
    output: dict[str, Any] | None = None
    error: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    features: tuple[TileFeature, ...] | None = None
    #: The assets that supplied the tile's pixels (:attr:`ImageData.assets`).
    assets: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class JobInfo:
    """A job as recorded in the store: where its tiles come from and how they are scored."""

    job: str
    source: str
    zoom: int | None = None
    model_name: str | None = None
    model_version: str | None = None
    tiles_total: int | None = None
    classes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A queue message that can never succeed and has no tile to carry an ``error`` row
    (not JSON, wrong schema, a tile off the grid): kept with its reason in the store's
    ``rejects`` table instead of being retried until the dead-letter queue.

    ``message_id`` is the queue's id (SQS MessageId): recording the same delivery twice keeps
    one row. ``body`` is the message as received, cut to :data:`MAX_REJECTED_BODY` characters.
    """

    message_id: str
    reason: str
    body: str
    job: str | None = None


#: Characters of a rejected message body kept in the rejects table.
MAX_REJECTED_BODY = 4096


@dataclass(frozen=True, slots=True)
class ResultRow:
    """One stored result as read back for export."""

    job: str
    z: int
    x: int
    y: int
    status: Status
    output: dict[str, Any] | None
    error: str | None
    model_name: str | None
    model_version: str | None
    attempts: int
    created_at: str
    updated_at: str
    #: The assets that supplied the tile's pixels (empty for a single raster).
    assets: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FeatureRow:
    """One stored feature as read back for the merge and export (:class:`TileFeature` with its
    tile). ``size`` is the tile size in pixels the geometry's coordinates are measured in."""

    job: str
    z: int
    x: int
    y: int
    seq: int
    cls: str
    wkb: bytes
    size: int
    score: float | None = None
    background: bool = False
