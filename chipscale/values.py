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


@dataclass(frozen=True, slots=True)
class ImageData:
    """One tile's pixels: ``data`` is ``(bands, size, size)`` in the source dtype and
    ``mask`` is ``(size, size)`` bool, True where the pixel is valid."""

    data: np.ndarray
    mask: np.ndarray

    @property
    def is_empty(self) -> bool:
        """True when no pixel is valid: such a tile never reaches the model."""
        return not bool(self.mask.any())


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


@dataclass(frozen=True, slots=True)
class TileResult:
    """One result row before it is stored: the unit of idempotent upsert is
    ``(job, tile.z, tile.x, tile.y)``."""

    job: str
    tile: Tile
    status: Status
    output: dict[str, Any] | None = None
    error: str | None = None
    model_name: str | None = None
    model_version: str | None = None


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
