"""NaN and inf, in pixels and in scores (issue 14, item 6).

Pixels: a float raster without nodata whose pixels are NaN or inf must treat them as invalid,
as a nodata pixel is (mask False, data the fill value), so an all-NaN tile is ``empty`` and a
partly-NaN one scores like the same raster with those pixels marked nodata. Scores: a model
that answers NaN for some tiles gives ``error`` rows with the reason for those tiles only,
in process and through a real TorchServe (whose handler must never write a ``NaN`` literal),
and a resume redoes them.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
import urllib3
from click.testing import CliRunner
from cogs import make_raster
from conftest import start_torchserve
from mercantile import Tile
from test_torchserve_client import ScriptedServer, scores_of, tiles

from chipscale.cli import cli
from chipscale.errors import PartialPrediction
from chipscale.models.torchserve_client import TorchServePredictor
from chipscale.sources import read_tile
from chipscale.sources.footprint import cover

NAN_COLUMNS = 300  # of 512: all of the first z16 tile column, 44 px of the second


def chipscale(*args: str) -> Any:
    result = CliRunner().invoke(cli, ["-q", *args])
    assert result.exit_code == 0, result.output
    return result


def rows(out: Path) -> dict[tuple[int, int], dict[str, str]]:
    with (out / "results.csv").open() as handle:
        return {(int(r["x"]), int(r["y"])): r for r in csv.DictReader(handle)}


def scores(row: dict[str, str], classes: tuple[str, ...]) -> list[float]:
    return [float(row[c]) for c in classes]


# ----------------------------------------------------------------------------- pixels


def float_rasters(directory: Path) -> tuple[Path, Path]:
    """The same float32 image twice: NaN/inf pixels and no nodata, and those pixels 0 with
    nodata 0 (what the first must read as)."""
    nan = make_raster(directory, "nan.tif", dtype="float32", mask="none", overviews=False)
    with rasterio.open(nan, "r+") as dataset:
        data = dataset.read()
        data[:, :, :NAN_COLUMNS] = np.nan
        data[1, 10:20, 400:420] = np.inf  # one band only: the pixel is still invalid
        data[0, 30:40, 400:420] = -np.inf
        dataset.write(data)
        profile = dataset.profile
    zeroed = directory / "zeroed.tif"
    with rasterio.open(zeroed, "w", **{**profile, "nodata": 0}) as dataset:
        dataset.write(np.where(np.isfinite(data).all(axis=0), data, 0).astype("float32"))
    return nan, zeroed


def test_nan_and_inf_pixels_are_invalid_pixels(tmp_path: Path) -> None:
    nan, zeroed = float_rasters(tmp_path)
    chipscale("run", "--source", str(nan), "--zoom", "16", "--out", str(tmp_path / "a"))
    chipscale("run", "--source", str(zeroed), "--zoom", "16", "--out", str(tmp_path / "b"))
    got, twin = rows(tmp_path / "a"), rows(tmp_path / "b")
    classes = ("snow", "forest", "bare_ground", "road")
    # The all-NaN tile column is empty; the partly NaN tiles score like their nodata twin.
    assert {k: r["status"] for k, r in got.items()} == {k: r["status"] for k, r in twin.items()}
    assert got[(34952, 23450)]["status"] == got[(34952, 23451)]["status"] == "empty"
    for key in ((34953, 23450), (34953, 23451)):
        assert got[key]["status"] == "ok"
        assert all(math.isfinite(v) for v in scores(got[key], classes))
        assert scores(got[key], classes) == pytest.approx(scores(twin[key], classes), abs=1e-6)

    # `chipscale tile` shows the same: those pixels invalid and zero, like nodata pixels.
    out = tmp_path / "t.npz"
    chipscale("tile", str(nan), "16/34953/23450", "-o", str(out))
    with np.load(out) as saved:
        data, mask = saved["data"], saved["mask"]
    assert np.isfinite(data).all()
    assert not mask[:, : NAN_COLUMNS - 256].any() and not mask[10:20, 400 - 256 : 420 - 256].any()
    assert (data[:, ~mask] == 0).all() and mask.sum() == 256 * (512 - NAN_COLUMNS) - 2 * 200
    twin_image = read_tile(zeroed, Tile(34953, 23450, 16))
    np.testing.assert_array_equal(mask, twin_image.mask)
    np.testing.assert_array_equal(data, twin_image.data)


# ----------------------------------------------------------------------------- scores


class NanAbove(torch.nn.Module):
    """Scores ``[mean, 1 - mean]`` of a tile in 0..1, or NaN when its mean is above
    ``threshold``: a model that breaks on some tiles only."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=[1, 2, 3])
        out = torch.stack([mean, 1.0 - mean], dim=1)
        return torch.where(
            (mean > self.threshold).unsqueeze(1), torch.full_like(out, math.nan), out
        )


def nan_model(path: Path, threshold: float) -> Path:
    from model_server.chipscale_runtime import save_torchscript

    meta = {
        "name": "nan-above",
        "version": "1",
        "classes": ["mean", "rest"],
        "bands": 3,
        "tile_size": 256,
        "scaling": {"type": "divide", "value": 255},
    }
    return save_torchscript(torch.jit.script(NanAbove(threshold)), path, meta)


@pytest.fixture(scope="module")
def split(aerial: Path) -> tuple[float, set[Tile]]:
    """A threshold between the 8th and 9th brightest of the aerial image's 16 z18 tiles, and
    the tiles above it (the ones the model answers NaN for)."""
    means = {
        t: float(read_tile(aerial, t).data.astype("float32").mean() / 255)
        for t in cover(18, source=str(aerial))
    }
    ranked = sorted(means.values())
    threshold = (ranked[len(ranked) // 2 - 1] + ranked[len(ranked) // 2]) / 2
    return threshold, {t for t, m in means.items() if m > threshold}


@pytest.fixture(scope="module")
def models(
    split: tuple[float, set[Tile]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """The NaN-answering model, and a corrected build of the same name and version."""
    directory = tmp_path_factory.mktemp("nanmodel")
    return nan_model(directory / "nan.pt", split[0]), nan_model(directory / "fixed.pt", 2.0)


def check_rows(out: Path, bad: set[Tile]) -> None:
    got = rows(out)
    assert len(got) == 16 and 0 < len(bad) < 16
    for (x, y), row in got.items():
        if Tile(x, y, 18) in bad:
            assert row["status"] == "error", row
            assert "non-finite scores" in row["error"] and row["mean"] == "" == row["rest"]
        else:
            assert row["status"] == "ok", row
            assert math.isfinite(float(row["mean"])) and math.isfinite(float(row["rest"]))


def test_nan_scores_in_process_are_error_rows_and_a_resume_redoes_them(
    aerial: Path, models: tuple[Path, Path], split: tuple[float, set[Tile]], tmp_path: Path
) -> None:
    nan, fixed = models
    run = ["run", "--source", str(aerial), "--zoom", "18", "--out", str(tmp_path), "--no-preview"]
    chipscale(*run, "--model", str(nan))
    check_rows(tmp_path, split[1])
    chipscale(*run, "--model", str(fixed))  # resume: only the error rows are run again
    assert {r["status"] for r in rows(tmp_path).values()} == {"ok"}


def test_nan_scores_through_torchserve_are_error_rows(
    aerial: Path, models: tuple[Path, Path], split: tuple[float, set[Tile]], tmp_path: Path
) -> None:
    from chipscale.models.serving import ServingConfig, package_model

    mar = package_model(models[0], tmp_path / "mar", config=ServingConfig(max_batch_delay_ms=5))
    server = start_torchserve(mar, tmp_path / "ts")
    try:
        # The handler's answer is strict JSON: no NaN literal, the refused rows named.
        batch = np.stack([read_tile(aerial, t).data for t in sorted(cover(18, source=str(aerial)))])
        body = _npy(batch)
        answer = urllib3.PoolManager().request(
            "POST",
            server.predictions_url,
            body=body,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert answer.status == 200
        assert b"NaN" not in answer.data and b"Infinity" not in answer.data
        document = json.loads(answer.data, parse_constant=_refuse)
        assert sum(row is None for row in document["scores"]) == len(split[1])

        out = tmp_path / "out"
        chipscale(
            "run",
            "--source",
            str(aerial),
            "--zoom",
            "18",
            "--out",
            str(out),
            "--no-preview",
            "--model",
            server.predictions_url,
        )
        check_rows(out, split[1])
    finally:
        server.stop()


def test_the_client_refuses_nan_scores_from_any_server() -> None:
    """An older handler (or another server) answering NaN literals: those rows refused."""

    def answer(batch: np.ndarray) -> Any:
        status, body = scores_of(batch)
        body["scores"][1] = [math.nan, 1.0]
        return status, body

    server = ScriptedServer(answer)
    try:
        with TorchServePredictor(server.url) as predictor, pytest.raises(PartialPrediction) as info:
            predictor.predict(tiles(3))
    finally:
        server.stop()
    assert list(info.value.failed) == [1] and "non-finite" in info.value.failed[1]
    assert info.value.scores[2].tolist() == [2.0, -2.0]


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _refuse(constant: str) -> None:
    raise AssertionError(f"non-JSON constant {constant} in the handler's answer")
