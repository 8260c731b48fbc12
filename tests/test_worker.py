"""process_pack(): read, predict, store, with the failure policy of chipscale.errors."""

from __future__ import annotations

import socket

import mercantile
import numpy as np
import pytest
from mercantile import Tile

from chipscale.errors import ModelFormatError, PredictorUnavailable, SourceUnavailable
from chipscale.models.predictors import open_predictor
from chipscale.pipeline.messages import PackMessage
from chipscale.pipeline.process import process_pack
from chipscale.results import open_store
from chipscale.sources.footprint import cover

FAR_AWAY = Tile(0, 0, 19)  # a valid tile that misses the image: empty, not an error


@pytest.fixture(scope="module")
def predictor():
    return open_predictor(None)


@pytest.fixture
def store(tmp_path):
    with open_store(f"sqlite:///{tmp_path}/results.db") as store:
        yield store


def test_pack_of_real_tiles_is_scored_and_stored_once(aerial, predictor, store) -> None:
    tiles = (*tuple(cover(19, source=str(aerial)))[:40], FAR_AWAY)
    message = PackMessage(job="j", source=str(aerial), tiles=tiles)
    outcome = process_pack(message, predictor=predictor, store=store)
    assert outcome.tiles == len(tiles)
    assert outcome.ok >= 30 and outcome.empty >= 1 and outcome.error == 0
    rows = {(r.x, r.y): r for r in store.iter_results("j")}
    assert rows[(FAR_AWAY.x, FAR_AWAY.y)].status == "empty"
    assert rows[(FAR_AWAY.x, FAR_AWAY.y)].output is None
    ok = [r for r in rows.values() if r.status == "ok"]
    assert all(set(r.output) == set(predictor.info.classes) for r in ok)
    assert all(abs(sum(r.output.values()) - 1) < 1e-3 for r in ok)
    assert {r.model_name for r in ok} == {predictor.info.name}

    again = process_pack(message, predictor=predictor, store=store)  # SQS delivered it twice
    assert (again.ok, again.empty) == (outcome.ok, outcome.empty)
    assert store.counts("j")["total"] == len(tiles)
    assert {r.attempts for r in store.iter_results("j")} == {2}


def test_unreadable_source_becomes_error_rows_with_the_reason(tmp_path, predictor, store) -> None:
    bad = tmp_path / "not-a-raster.tif"
    bad.write_text("hello")
    message = PackMessage(job="j", source=str(bad), tiles=(Tile(1, 1, 2), Tile(2, 1, 2)))
    outcome = process_pack(message, predictor=predictor, store=store)
    assert outcome.error == 2
    rows = list(store.iter_results("j"))
    assert {r.status for r in rows} == {"error"}
    assert all("not-a-raster.tif" in r.error for r in rows)


class FlakyPredictor:
    """The real demo model behind a link that is down for the first ``failures`` calls."""

    def __init__(self, inner, failures: int) -> None:
        self.inner, self.failures, self.calls = inner, failures, 0
        self.info = inner.info

    def predict(self, batch: np.ndarray, *, deadline: float | None = None) -> np.ndarray:
        self.calls += 1
        if self.calls <= self.failures:
            raise PredictorUnavailable("model server unreachable")
        return self.inner.predict(batch)

    def close(self) -> None:
        pass


def test_transient_model_failure_raises_and_writes_nothing(aerial, predictor, store) -> None:
    tiles = tuple(cover(18, source=str(aerial)))
    message = PackMessage(job="j", source=str(aerial), tiles=tiles)
    with pytest.raises(PredictorUnavailable):
        process_pack(message, predictor=FlakyPredictor(predictor, 1), store=store)
    assert store.counts("j")["total"] == 0


def test_four_band_source_reaches_a_model_that_takes_nir(naip, predictor, store) -> None:
    assert 4 in predictor.info.band_counts
    tiles = tuple(cover(14, source=str(naip)))
    message = PackMessage(job="n", source=str(naip), tiles=tiles)
    outcome = process_pack(message, predictor=predictor, store=store)
    assert outcome.ok >= 1 and outcome.error == 0


def test_bands_option_selects_source_bands(naip, predictor, store) -> None:
    tiles = tuple(cover(14, source=str(naip)))
    rgb = process_pack(
        PackMessage(job="rgb", source=str(naip), tiles=tiles),
        predictor=predictor,
        store=store,
        bands=(1, 2, 3),
    )
    assert rgb.ok >= 1
    one_band = process_pack(
        PackMessage(job="one", source=str(naip), tiles=tiles),
        predictor=predictor,
        store=store,
        bands=(1,),
    )
    assert one_band.error == len(tiles)
    assert "bands" in next(iter(store.iter_results("one"))).error


def test_tile_of_another_hemisphere_is_empty(aerial, predictor, store) -> None:
    tile = mercantile.tile(-100.0, -40.0, 17)
    outcome = process_pack(
        PackMessage(job="e", source=str(aerial), tiles=(tile,)), predictor=predictor, store=store
    )
    assert outcome.empty == 1


def test_unreachable_source_goes_back_to_the_queue(predictor, store) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    message = PackMessage(job="u", source=f"http://127.0.0.1:{port}/a.tif", tiles=(FAR_AWAY,))
    with pytest.raises(SourceUnavailable):
        process_pack(message, predictor=predictor, store=store)
    assert store.counts("u")["total"] == 0  # nothing recorded: SQS will deliver it again


class RefusingPredictor(FlakyPredictor):
    """A model that refuses its input for good (what a TorchServe 4xx will be)."""

    def predict(self, batch: np.ndarray, *, deadline: float | None = None) -> np.ndarray:
        raise ModelFormatError("model refuses tiles of this kind")


def test_permanent_model_refusal_marks_only_the_tiles_it_saw(aerial, predictor, store) -> None:
    tiles = (*tuple(cover(18, source=str(aerial)))[:3], FAR_AWAY)
    message = PackMessage(job="r", source=str(aerial), tiles=tiles)
    outcome = process_pack(message, predictor=RefusingPredictor(predictor, 0), store=store)
    assert (outcome.error, outcome.empty) == (3, 1)
    rows = {(r.x, r.y): r for r in store.iter_results("r")}
    assert rows[(FAR_AWAY.x, FAR_AWAY.y)].status == "empty"
    assert {r.error for r in rows.values() if r.status == "error"} == {
        "model refuses tiles of this kind"
    }


class GarbledRefusal(FlakyPredictor):
    """A model server whose refusal quotes bytes no store can keep."""

    def predict(self, batch: np.ndarray, *, deadline: float | None = None) -> np.ndarray:
        raise ModelFormatError("refused: \x00 in the header, \ud800 in the body")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_error_text_no_store_can_keep_is_stored_with_replacements(
    backend: str, aerial, predictor, tmp_path, request: pytest.FixtureRequest
) -> None:
    """A NUL or a lone surrogate in an error would make the pack's write fail on every
    delivery (PostgreSQL refuses NUL, UTF-8 has no surrogates): both become U+FFFD."""
    url = (
        request.getfixturevalue("results_db")
        if backend == "postgresql"
        else f"sqlite:///{tmp_path}/r.db"
    )
    message = PackMessage(job="g", source=str(aerial), tiles=tuple(cover(18, source=str(aerial))))
    with open_store(url) as store:
        outcome = process_pack(message, predictor=GarbledRefusal(predictor, 0), store=store)
        errors = {r.error for r in store.iter_results("g", status="error")}
    assert outcome.error == len(message.tiles)
    assert errors == {"refused: \ufffd in the header, \ufffd in the body"}
