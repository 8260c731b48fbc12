"""Read, predict, store one pack: ``predict_pack`` (read and predict) and ``process_pack``
(that, then one write), each also in two steps (``read_pack``, then ``predict_read`` or
``process_read``) so a worker can read the next pack while this one is predicted
(:mod:`chipscale.pipeline.read_ahead`).

The local runner calls ``process_pack``; the SQS worker calls ``predict_pack`` per message
and stores the batch's rows in one write. Permanent failures become ``error`` rows, transient
ones raise (:mod:`chipscale.errors`); tiles without a valid pixel are ``empty``. The failure
model: docs/design.md, "The failure model".
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from mercantile import Tile

from chipscale.errors import (
    ChipscaleError,
    ModelFormatError,
    PartialPrediction,
    SourceError,
    storable_text,
)
from chipscale.models.predictors import Predictor
from chipscale.models.scores import non_finite_rows
from chipscale.pipeline.messages import PackMessage
from chipscale.pipeline.vectorize import segment
from chipscale.results import ResultStore
from chipscale.sources import TileSource, cached_reader
from chipscale.values import ImageData, ModelInfo, Status, TileFeature, TileResult

log = logging.getLogger(__name__)

#: Scores are stored rounded: six decimals are far below any model's meaningful precision.
SCORE_DECIMALS = 6


@dataclass(frozen=True, slots=True)
class PackResults:
    """A pack's rows, read and predicted but not yet stored, with the time each stage took.

    The cloud worker holds these until every message of its Lambda batch has run, then
    stores the batch's rows in one write (:mod:`chipscale.cloud.sqs_batch`).
    """

    results: list[TileResult]
    read_seconds: float
    predict_seconds: float

    def outcome(self, write_seconds: float) -> PackOutcome:
        """What the pack produced once its rows are stored, ``write_seconds`` later."""
        counts = Counter(result.status for result in self.results)
        return PackOutcome(
            counts["ok"],
            counts["empty"],
            counts["error"],
            self.read_seconds,
            self.predict_seconds,
            write_seconds,
        )


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
    deadline: float | None = None,
) -> PackOutcome:
    """Run one pack through read, predict and write; see the module docstring for failures.

    ``deadline`` (a :func:`time.monotonic` instant) bounds the prediction: the Lambda passes
    its remaining time so a slow model server fails this pack alone, not the invocation.
    """
    read = read_pack(message, predictor.info, bands=bands)
    return process_read(read, predictor=predictor, store=store, deadline=deadline)


def process_read(
    read: ReadPack, *, predictor: Predictor, store: ResultStore, deadline: float | None = None
) -> PackOutcome:
    """Predict and store a pack :func:`read_pack` read (the local runner's read-ahead)."""
    pack = predict_read(read, predictor=predictor, deadline=deadline)
    start = time.perf_counter()
    store.write(pack.results)
    return pack.outcome(time.perf_counter() - start)


def predict_pack(
    message: PackMessage,
    *,
    predictor: Predictor,
    bands: Sequence[int] | None = None,
    deadline: float | None = None,
) -> PackResults:
    """Read and predict one pack: one row per tile of the message, in its order, to store.

    A permanent failure becomes ``error`` rows; a transient one raises (module docstring).
    """
    read = read_pack(message, predictor.info, bands=bands)
    return predict_read(read, predictor=predictor, deadline=deadline)


@dataclass(frozen=True, slots=True)
class ReadPack:
    """A pack read and stacked for its model, not yet predicted (:func:`read_pack`): what a
    read-ahead thread hands to the predicting one."""

    message: PackMessage
    info: ModelInfo
    #: The tiles with pixels, in the order of ``batch``'s rows.
    at_stake: tuple[Tile, ...]
    batch: np.ndarray | None
    #: Tiles that cannot be read, with why (their rows are ``error``).
    errors: dict[Tile, str]
    read_seconds: float
    #: A segmentation model's: the tiles' core masks ``(N, S, S)``, rows as ``batch``'s.
    valid: np.ndarray | None = None
    #: The assets that supplied each tile's pixels (a mosaic's), stored with its row.
    assets: dict[Tile, tuple[str, ...]] = field(default_factory=dict)


def read_pack(
    message: PackMessage, info: ModelInfo, *, bands: Sequence[int] | None = None
) -> ReadPack:
    """Read one pack's tiles and stack the model's batch; a permanent failure of the source
    becomes ``errors``, a transient one raises. Safe to run in another thread."""
    start = time.perf_counter()
    errors: dict[Tile, str] = {}
    at_stake: tuple[Tile, ...] = message.tiles
    batch = valid = None
    assets: dict[Tile, tuple[str, ...]] = {}
    try:
        reader = _pack_source(message, info, bands)
        images, errors = _read_images(reader, message.tiles)
        assets = {t: image.assets for t, image in images.items() if image.assets}
        at_stake = tuple(t for t in message.tiles if t in images and not images[t].is_empty)
        batch = _stack(info, [images[t] for t in at_stake]) if at_stake else None
        if at_stake and info.task == "segmentation":
            valid = np.stack([images[t].core_mask for t in at_stake])
    except ChipscaleError as exc:
        if not exc.permanent:
            raise
        log.warning("%d tiles of job %s failed: %s", len(at_stake), message.job, exc)
        errors.update(dict.fromkeys(at_stake, str(exc)))
        at_stake, batch, valid = (), None, None
    seconds = time.perf_counter() - start
    return ReadPack(message, info, at_stake, batch, errors, seconds, valid, assets)


def _pack_source(message: PackMessage, info: ModelInfo, bands: Sequence[int] | None) -> TileSource:
    """The message's source, or a mosaic of its candidate assets when it carries any."""
    if not message.assets:
        return cached_reader(message.source, size=info.tile_size, bands=bands, margin=info.margin)
    from chipscale.sources.mosaic_source import pack_reader

    return pack_reader(
        message.assets,
        source=message.source,
        size=info.tile_size,
        bands=bands,
        margin=info.margin,
    )


def predict_read(
    read: ReadPack, *, predictor: Predictor, deadline: float | None = None
) -> PackResults:
    """Predict a pack :func:`read_pack` read: its rows, as :func:`predict_pack` makes them."""
    message, info, at_stake = read.message, read.info, read.at_stake
    outputs: dict[Tile, dict[str, float]] = {}
    # A segmentation model's rows always carry features, () for none: a redelivered tile's
    # stored polygons are replaced whatever its status (None: classification, none kept).
    features: dict[Tile, tuple[TileFeature, ...]] | None = (
        {} if info.task == "segmentation" else None
    )
    errors = dict(read.errors)
    start = time.perf_counter()
    try:
        if read.batch is not None:
            try:
                scores, refused = predictor.predict(read.batch, deadline=deadline), {}
            except PartialPrediction as exc:  # only some tiles refused: keep the rest
                scores, refused = exc.scores, exc.failed
                log.warning("job %s: %s", message.job, exc)
            if features is not None:
                _segment(read, scores, refused, outputs, features, errors)
            else:
                _score(read, scores, refused, outputs, errors)
    except ChipscaleError as exc:
        if not exc.permanent:
            raise
        log.warning("%d tiles of job %s failed: %s", len(at_stake), message.job, exc)
        errors.update(dict.fromkeys(at_stake, str(exc)))
        outputs.clear()
    predict_seconds = time.perf_counter() - start
    results = [
        _result(
            message.job,
            t,
            info,
            output=outputs.get(t),
            error=errors.get(t),
            features=None if features is None else features.get(t, ()),
            assets=read.assets.get(t, ()),
        )
        for t in message.tiles
    ]
    return PackResults(results, read.read_seconds, predict_seconds)


def _score(
    read: ReadPack,
    scores: np.ndarray,
    refused: dict[int, str],
    outputs: dict[Tile, dict[str, float]],
    errors: dict[Tile, str],
) -> None:
    """A classification model's ``(N, classes)`` scores into rounded outputs (or errors)."""
    # Whatever the predictor, a NaN score is no score (a refused row's is NaN).
    unscored = {i: r for i, r in non_finite_rows(scores).items() if i not in refused}
    if unscored:
        log.warning("job %s: %d tiles got non-finite scores", read.message.job, len(unscored))
        refused = {**refused, **unscored}
    for i, (tile, row) in enumerate(zip(read.at_stake, scores, strict=True)):
        if i in refused:
            errors[tile] = refused[i]
            continue
        outputs[tile] = {
            name: round(float(v), SCORE_DECIMALS)
            for name, v in zip(read.info.classes, row, strict=True)
        }


def _segment(
    read: ReadPack,
    masks: np.ndarray,
    refused: dict[int, str],
    outputs: dict[Tile, dict[str, float]],
    features: dict[Tile, tuple[TileFeature, ...]],
    errors: dict[Tile, str],
) -> None:
    """A segmentation model's ``(N, S, S)`` class masks into per-class pixel fractions and
    polygons (:mod:`chipscale.pipeline.vectorize`), pixels outside a tile's core mask
    without a class; a mask of another shape is a permanent error of the whole pack."""
    size = read.info.tile_size
    expected = (len(read.at_stake), size, size)
    if read.valid is None or tuple(np.shape(masks)) != expected:
        raise ModelFormatError(
            f"segmentation model {read.info.name} answered shape {tuple(np.shape(masks))}, "
            f"expected {expected} (tiles, {size}, {size}) class indices"
        )
    for i, (tile, mask) in enumerate(zip(read.at_stake, masks, strict=True)):
        if i in refused:
            errors[tile] = refused[i]
            continue
        try:
            outputs[tile], features[tile] = segment(mask, read.valid[i], read.info, SCORE_DECIMALS)
        except ModelFormatError as exc:
            errors[tile] = str(exc)


def _read_images(
    reader: TileSource, tiles: Sequence[Tile]
) -> tuple[dict[Tile, ImageData], dict[Tile, str]]:
    """Each tile's pixels, or why they cannot be read (tile -> reason).

    Adjacent tiles are read with one warp of their common window. When such a shared read
    fails for good (a damaged or truncated file), the tiles not yet read are read one at a
    time, so only the tiles whose own pixels are unreadable become ``error`` rows, as
    ``chipscale tile`` would find them. A transient failure raises (the message is retried).
    """
    images: dict[Tile, ImageData] = {}
    try:
        for tile, image in reader.read(tiles):  # kept as they come: packs read before a failure
            images[tile] = image
        return images, {}
    except SourceError as exc:
        if not exc.permanent:
            raise
        log.info("a shared read failed, reading the other tiles alone: %s", exc)
    errors: dict[Tile, str] = {}
    for tile in dict.fromkeys(tiles):
        if tile in images:
            continue
        try:
            images[tile] = reader.tile(tile)
        except SourceError as exc:
            if not exc.permanent:
                raise
            errors[tile] = str(exc)
    return images, errors


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
    features: tuple[TileFeature, ...] | None = None,
    assets: tuple[str, ...] = (),
) -> TileResult:
    status: Status = "error" if error is not None else "ok" if output is not None else "empty"
    return TileResult(
        job=job,
        tile=tile,
        status=status,
        output=output,
        error=None if error is None else storable_text(error),
        model_name=info.name,
        model_version=info.version,
        features=features if error is None else None if features is None else (),
        assets=assets,
    )
