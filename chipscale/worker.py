"""``process_pack()``: read a pack's tiles, predict, store. The same function runs in the
Lambda and in the local runner; only the adapters around it differ.

Failure policy (see :mod:`chipscale.errors`): a permanent failure of the pack (the source
cannot be opened, is not a raster) becomes ``error`` rows carrying the reason, so the message
is done; a transient failure (model server, database, a read that broke mid-way) raises, so
the queue delivers the message again. Tiles without a valid pixel are ``empty`` and never
reach the model. Writes are upserts keyed on (job, z, x, y): a repeat is harmless.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from mercantile import Tile

from chipscale.errors import ChipscaleError, SourceError
from chipscale.messages import PackMessage
from chipscale.predictors import Predictor
from chipscale.stores import ResultStore
from chipscale.tiles import read_tiles
from chipscale.types import ImageData, ModelInfo, TileResult

log = logging.getLogger(__name__)

#: Scores are stored rounded: six decimals are far below any model's meaningful precision.
SCORE_DECIMALS = 6


@dataclass(frozen=True, slots=True)
class PackOutcome:
    """What one pack produced, with the time spent in each stage (for metrics)."""

    ok: int
    empty: int
    error: int
    read_seconds: float
    predict_seconds: float
    write_seconds: float

    @property
    def tiles(self) -> int:
        return self.ok + self.empty + self.error


def process_pack(
    message: PackMessage,
    *,
    predictor: Predictor,
    store: ResultStore,
    bands: Sequence[int] | None = None,
) -> PackOutcome:
    """Run one pack through read, predict and write; see the module docstring for failures."""
    info = predictor.info
    started = time.perf_counter()
    try:
        images = dict(read_tiles(message.source, message.tiles, size=info.tile_size, bands=bands))
        full = [tile for tile in message.tiles if not images[tile].is_empty]
        batch = _stack(info, [images[t] for t in full]) if full else None
    except ChipscaleError as exc:
        if not exc.permanent:
            raise
        log.warning("pack of %d tiles of job %s failed: %s", len(message.tiles), message.job, exc)
        read_done = time.perf_counter()
        store.write([_result(message.job, t, info, error=str(exc)) for t in message.tiles])
        return PackOutcome(
            0, 0, len(message.tiles), read_done - started, 0.0, time.perf_counter() - read_done
        )
    read_done = time.perf_counter()

    outputs: dict[Tile, dict[str, float]] = {}
    if batch is not None:
        scores = predictor.predict(batch)
        for tile, row in zip(full, scores, strict=True):
            outputs[tile] = {
                name: round(float(v), SCORE_DECIMALS)
                for name, v in zip(info.classes, row, strict=True)
            }
    predict_done = time.perf_counter()

    store.write([_result(message.job, t, info, output=outputs.get(t)) for t in message.tiles])
    done = time.perf_counter()
    ok = len(outputs)
    return PackOutcome(
        ok,
        len(message.tiles) - ok,
        0,
        read_done - started,
        predict_done - read_done,
        done - predict_done,
    )


def _stack(info: ModelInfo, images: list[ImageData]) -> np.ndarray:
    """Stack tiles into the model's batch, keeping as many bands as the model takes.

    A source with more bands than the model accepts (e.g. RGBN into an RGB model) gives the
    model its first bands; fewer bands than it needs is a permanent error of the source.
    """
    batch = np.stack([image.data for image in images])
    accepted = info.band_counts or (info.bands,)
    channels = batch.shape[1]
    if channels in accepted:
        return batch
    usable = [n for n in accepted if n <= channels]
    if not usable:
        raise SourceError(
            f"model {info.name} needs {info.bands} bands; the source gives {channels}"
        )
    return batch[:, : max(usable)]


def _result(
    job: str,
    tile: Tile,
    info: ModelInfo,
    *,
    output: dict[str, float] | None = None,
    error: str | None = None,
) -> TileResult:
    status = "error" if error is not None else "ok" if output is not None else "empty"
    return TileResult(
        job=job,
        tile=tile,
        status=status,
        output=output,
        error=error,
        model_name=info.name,
        model_version=info.version,
    )
