"""The drift check of ``chipscale model package --precision``: run a model file as exported
(fp32) and with other inference settings on the same sample tiles, and measure how far the
scores move. Both runs use ``model_server.chipscale_runtime``, as TorchServe and the in-process
predictor do."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from chipscale.errors import ChipscaleError, ModelFormatError
from chipscale.models.serving import DEFAULT_SAMPLES, DEFAULT_TOLERANCE

#: Half the width of the web-mercator world, metres.
_ORIGIN = 20037508.342789244


class DriftRefused(ChipscaleError):
    """The settings moved scores more than the tolerance allows."""


@dataclass(frozen=True, slots=True)
class DriftReport:
    """Scores of ``settings`` against fp32 on ``tiles`` sample tiles."""

    settings: dict[str, Any]
    tiles: int
    max_drift: float
    mean_drift: float
    tolerance: float
    device: str
    samples_from: str

    @property
    def ok(self) -> bool:
        return math.isfinite(self.max_drift) and self.max_drift <= self.tolerance

    def line(self) -> str:
        changed = ", ".join(
            f"{k}={v}" for k, v in self.settings.items() if v not in (False, "fp32")
        )
        return (
            f"score drift of {changed or 'fp32'} against fp32 on {self.tiles} tiles "
            f"({self.samples_from}, {self.device}): max {self.max_drift:.3g}, mean "
            f"{self.mean_drift:.3g}; tolerance {self.tolerance:g}: "
            + ("accepted" if self.ok else "REFUSED")
        )


def check_drift(
    model: str | os.PathLike[str],
    settings: Any,
    tiles: np.ndarray,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    device: str = "auto",
    samples_from: str = "",
) -> DriftReport:
    """Score ``tiles`` with ``model`` as exported and with ``settings`` (an
    ``InferenceSettings``); the report says whether the largest difference is within
    ``tolerance``."""
    from model_server import chipscale_runtime as rt

    try:
        reference = rt.load_model(model, device, inference=rt.InferenceSettings())
        candidate = rt.load_model(model, device, inference=settings)
        expected, got = reference.predict(tiles), candidate.predict(tiles)
    except rt.ModelRuntimeError as exc:
        raise ModelFormatError(str(exc)) from exc
    if expected.dtype == np.uint8:  # segmentation masks: the share of each tile's pixels
        diff = (got != expected).reshape(len(tiles), -1).mean(axis=1)  # whose class moved
    else:
        diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
        diff[~np.isfinite(diff)] = np.inf
    return DriftReport(
        settings=candidate.inference.to_dict(),
        tiles=len(tiles),
        max_drift=float(diff.max()),
        mean_drift=float(diff.mean()),
        tolerance=tolerance,
        device=str(candidate.device),
        samples_from=samples_from or "synthetic tiles",
    )


def sample_tiles(
    metadata: dict[str, Any], source: str | None = None, count: int = DEFAULT_SAMPLES
) -> np.ndarray:
    """``count`` tiles the model takes: read from ``source`` (spread over its footprint at
    about its native resolution, mostly-valid tiles only), or deterministic synthetic tiles
    with structure when no source is given."""
    bands, size = int(metadata["bands"]), int(metadata["tile_size"])
    margin = int(metadata.get("margin") or 0)  # the model takes size + 2 * margin
    if source is None:
        return _synthetic(bands, size + 2 * margin, count)
    from chipscale.tiles import read_tiles, source_info

    info = source_info(source)
    if info.count < bands:
        raise ChipscaleError(f"{source} has {info.count} bands; the model takes {bands}")
    data = [
        image.data
        for _, image in read_tiles(
            source, _spread(info, size, count), size, list(range(1, bands + 1)), margin=margin
        )
        if image.mask.mean() > 0.5
    ]
    if not data:
        raise ChipscaleError(f"no mostly-valid {size}x{size} tile found in {source}")
    return np.stack(data)


def _spread(info: Any, size: int, count: int) -> list[tuple[int, int, int]]:
    """About ``count`` tiles on an even grid over the source footprint, at the zoom whose
    pixel is closest to the source's."""
    import mercantile

    west, south, east, north = info.bounds_lonlat
    x0, _ = mercantile.xy(west, south)
    x1, _ = mercantile.xy(east, north)
    res = max((x1 - x0) / max(info.width, 1), 1e-3)
    zoom = min(24, max(0, round(math.log2(2 * _ORIGIN / (size * res)))))
    first = mercantile.tile(west, north, zoom)
    last = mercantile.tile(east, south, zoom)
    side = max(1, math.ceil(math.sqrt(count)))
    xs = np.unique(np.linspace(first.x, last.x, side).round().astype(int))
    ys = np.unique(np.linspace(first.y, last.y, side).round().astype(int))
    return [(int(x), int(y), zoom) for y in ys for x in xs][:count]


def _synthetic(bands: int, size: int, count: int) -> np.ndarray:
    """uint8 tiles with smooth structure and noise (flat tiles would hide drift)."""
    rng = np.random.default_rng(17)
    ramp = np.linspace(0, 2 * np.pi, size, dtype=np.float32)
    tiles = np.empty((count, bands, size, size), dtype=np.float32)
    for i in range(count):
        fx, fy = rng.uniform(0.5, 6, 2)
        base = 0.5 + 0.4 * np.sin(fx * ramp[None, :]) * np.cos(fy * ramp[:, None])
        for band in range(bands):
            noise = rng.normal(0, 0.05, (size, size))
            tiles[i, band] = np.clip(base * rng.uniform(0.6, 1.2) + noise, 0, 1)
    return (tiles * 255).round().astype(np.uint8)
