"""The segmentation branch of the pipeline on real imagery: a model's class masks become
per-class pixel fractions and 4-connected polygons that redraw the mask exactly (GDAL's
rasterize as the oracle), pixels outside the source have no class, bad masks become ``error``
rows, a redelivered pack replaces its polygons, classification rows are unchanged, and the
SQS worker Lambda stores the polygons in PostgreSQL."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import shapely
from affine import Affine
from rasterio.features import rasterize

from chipscale.grid.packs import pack_tiles
from chipscale.models.predictors import open_predictor
from chipscale.pipeline.messages import PackMessage
from chipscale.pipeline.process import process_pack, read_pack
from chipscale.pipeline.vectorize import NO_CLASS
from chipscale.results import PostgresStore, ResultStore, SQLiteStore
from chipscale.sources.footprint import cover
from chipscale.values import FeatureRow, ModelInfo, ResultRow

ZOOM = 19
SIZE = 100
MARGIN = 8
CLASSES = ("dark", "dim", "bright", "glare")
INFO = ModelInfo(
    "brightness", "1", CLASSES, 3, SIZE, task="segmentation", margin=MARGIN, background="dark"
)


def brightness_classes(batch: np.ndarray) -> np.ndarray:
    """A 4-class mask of real imagery: the brightness of each core pixel, in four bands."""
    core = batch[:, :, MARGIN : MARGIN + SIZE, MARGIN : MARGIN + SIZE].astype(np.float32)
    return np.digitize(core.mean(axis=1), [60.0, 110.0, 170.0]).astype(np.uint8)


class FakeSegmenter:
    """A Predictor of a segmentation model: the model's contract, a heuristic inside."""

    def __init__(self, answer: Callable[[np.ndarray], np.ndarray] = brightness_classes) -> None:
        self.info = INFO
        self.answer = answer
        self.batches: list[tuple[int, ...]] = []

    def predict(self, batch: np.ndarray, *, deadline: float | None = None) -> np.ndarray:
        self.batches.append(batch.shape)
        return self.answer(batch)

    def close(self) -> None:
        pass


def messages(
    job: str, source: Path | str, max_tiles: int = 16, zoom: int = ZOOM
) -> list[PackMessage]:
    tiles = list(cover(zoom, source=str(source)))
    return [PackMessage(job, str(source), pack) for pack in pack_tiles(tiles, max_tiles)]


def redraw(features: list[FeatureRow], size: int) -> np.ndarray:
    """The class mask the polygons draw (GDAL's rasterize), NO_CLASS where none is."""
    shapes = [(shapely.from_wkb(f.wkb), CLASSES.index(f.cls)) for f in features]
    if not shapes:
        return np.full((size, size), NO_CLASS, np.uint8)
    return rasterize(
        shapes, out_shape=(size, size), fill=NO_CLASS, transform=Affine.identity(), dtype="uint8"
    )


def by_tile(rows: list[FeatureRow]) -> dict[tuple[int, int], list[FeatureRow]]:
    tiles: dict[tuple[int, int], list[FeatureRow]] = {}
    for row in rows:
        tiles.setdefault((row.x, row.y), []).append(row)
    return tiles


@pytest.mark.parametrize("source", ["aerial", "naip"])
def test_polygons_redraw_the_model_mask_exactly(
    source: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # naip: UTM with nodata, so tiles at its edges are partly without pixels (RGBN: the model
    # takes its first three bands)
    path, zoom = request.getfixturevalue(source), 15 if source == "naip" else ZOOM
    model = FakeSegmenter()
    with SQLiteStore(tmp_path / "r.db") as store:
        expected: dict[tuple[int, int], np.ndarray] = {}
        for message in messages("seg", path, zoom=zoom):
            read = read_pack(message, INFO)  # what process_pack reads: the oracle's input
            assert read.batch is not None and read.valid is not None
            for tile, mask, valid in zip(
                read.at_stake, model.answer(read.batch), read.valid, strict=True
            ):
                expected[(tile.x, tile.y)] = np.where(valid, mask, NO_CLASS)
            outcome = process_pack(message, predictor=model, store=store)
            assert outcome.error == 0
        assert {shape[1:] for shape in model.batches} == {(3, SIZE + 2 * MARGIN, SIZE + 2 * MARGIN)}
        rows = {(r.x, r.y): r for r in store.iter_results("seg")}
        features = by_tile(list(store.iter_features("seg", background=True)))

    partial = 0
    for key, mask in expected.items():
        drawn = redraw(features.get(key, []), SIZE)
        np.testing.assert_array_equal(drawn, mask, err_msg=f"tile {key}")
        valid = mask != NO_CLASS
        partial += int(not valid.all())
        counts = np.bincount(mask[valid], minlength=len(CLASSES))
        output = rows[key].output
        assert output is not None and list(output) == list(CLASSES)
        assert output == pytest.approx(
            {c: n / valid.sum() for c, n in zip(CLASSES, counts, strict=True)}, abs=1e-6
        )
        for f in features.get(key, []):
            polygon = shapely.from_wkb(f.wkb)
            assert polygon.is_valid and polygon.geom_type == "Polygon"
            coords = np.concatenate(
                [np.asarray(polygon.exterior.coords)]
                + [np.asarray(ring.coords) for ring in polygon.interiors]
            )
            assert (coords == np.round(coords)).all() and coords.min() >= 0 and coords.max() <= SIZE
            assert f.background == (f.cls == "dark") and f.size == SIZE
    assert (partial > 0) == (source == "naip")  # pixels without a class: no polygon
    assert len(expected) == sum(r.status == "ok" for r in rows.values())
    assert any(len(polygons) > 1 for polygons in features.values())
    # holes survive: some region of this imagery encloses another
    assert any(shapely.from_wkb(f.wkb).interiors for fs in features.values() for f in fs)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_redelivered_pack_replaces_its_polygons(
    kind: str, aerial: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store: ResultStore = (
        SQLiteStore(tmp_path / "r.db")
        if kind == "sqlite"
        else PostgresStore(request.getfixturevalue("results_db"))
    )
    with store:
        pack = messages("seg", aerial)[0]
        process_pack(pack, predictor=FakeSegmenter(), store=store)
        first = [
            (f.x, f.y, f.seq, f.cls, f.wkb) for f in store.iter_features("seg", background=True)
        ]
        assert first
        process_pack(pack, predictor=FakeSegmenter(), store=store)  # a redelivery
        again = [
            (f.x, f.y, f.seq, f.cls, f.wkb) for f in store.iter_features("seg", background=True)
        ]
        assert again == first
        assert {r.attempts for r in store.iter_results("seg")} == {2}
        # redelivered once more, the model now failing: error rows, no polygon left
        broken = FakeSegmenter(lambda batch: np.zeros((len(batch), 3, 3), np.uint8))
        process_pack(pack, predictor=broken, store=store)
        assert list(store.iter_features("seg", background=True)) == []
        assert {r.status for r in store.iter_results("seg")} == {"error"}


def test_a_mask_of_the_wrong_shape_gives_error_rows_naming_both(
    aerial: Path, tmp_path: Path
) -> None:
    uncropped = FakeSegmenter(lambda batch: np.zeros(batch.shape[:1] + batch.shape[2:], np.uint8))
    pack = messages("seg", aerial)[0]
    with SQLiteStore(tmp_path / "r.db") as store:
        outcome = process_pack(pack, predictor=uncropped, store=store)
        rows = list(store.iter_results("seg"))
        assert not store.has_features("seg")
    assert outcome.error == len(pack.tiles) - outcome.empty > 0
    errors = {r.error for r in rows if r.status == "error"}
    n = outcome.error
    assert errors == {
        f"segmentation model brightness answered shape ({n}, {SIZE + 16}, {SIZE + 16}), "
        f"expected ({n}, {SIZE}, {SIZE}) (tiles, {SIZE}, {SIZE}) class indices"
    }


def test_a_class_the_model_does_not_have_fails_its_tile_only(aerial: Path, tmp_path: Path) -> None:
    def one_bad(batch: np.ndarray) -> np.ndarray:
        masks = brightness_classes(batch)
        masks[1, 5, 5] = 7
        return masks

    pack = messages("seg", aerial)[0]
    with SQLiteStore(tmp_path / "r.db") as store:
        process_pack(pack, predictor=FakeSegmenter(one_bad), store=store)
        rows = list(store.iter_results("seg"))
        bad = [r for r in rows if r.status == "error"]
        assert len(bad) == 1 and "class index 7" in (bad[0].error or "")
        assert "4 classes" in (bad[0].error or "")
        tiles_with_features = {(f.x, f.y) for f in store.iter_features("seg", background=True)}
        assert (bad[0].x, bad[0].y) not in tiles_with_features
        assert len(tiles_with_features) == sum(r.status == "ok" for r in rows)


def test_classification_rows_are_unchanged(
    aerial: Path, tmp_path: Path, demo_model_file: Path
) -> None:
    predictor = open_predictor(str(demo_model_file))
    try:
        with SQLiteStore(tmp_path / "r.db") as store:
            for message in messages("cls", aerial):
                process_pack(message, predictor=predictor, store=store)
            rows = list(store.iter_results("cls"))
            assert not store.has_features("cls")
    finally:
        predictor.close()
    assert rows and {r.status for r in rows} <= {"ok", "empty"}
    for row in rows:
        assert row.assets == ()
        if row.status == "ok":
            assert row.output is not None and list(row.output) == list(predictor.info.classes)
            assert sum(row.output.values()) == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------- the Lambda


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def stored(db: str, job: str) -> tuple[list[ResultRow], list[FeatureRow]]:
    with PostgresStore(db) as store:
        return list(store.iter_results(job)), list(store.iter_features(job, background=True))


def test_the_worker_lambda_stores_polygons_in_postgres(
    stack_environment: dict[str, str],
    bucket: str,
    results_db: str,
    aerial: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from conftest import LambdaContext, import_lambda
    from sqs_events import lambda_event

    from chipscale import names
    from chipscale.models import demo_segmentation

    model = demo_segmentation.build(tmp_path / "demo-segmentation.pt")  # the real runtime
    monkeypatch.setenv(names.ENV_ALLOWED_SOURCES, f"s3://{bucket}/")
    monkeypatch.setenv(names.ENV_MAX_TILES_PER_MESSAGE, "100")
    monkeypatch.setenv(names.ENV_MODEL_URL, str(model))
    module = import_lambda("sqs_worker", monkeypatch)
    source = f"s3://{bucket}/aerial.tif"
    packs = messages("lambda-seg", source, max_tiles=8)[:2]
    records = [
        {"MessageId": f"m{i}", "ReceiptHandle": f"r{i}", "Body": body, "MD5OfBody": md5(body)}
        for i, body in enumerate(m.to_json() for m in packs)
    ]
    event = lambda_event(records, "arn:aws:sqs:us-east-1:123456789012:work")
    for _ in range(2):  # the second: every message redelivered
        response = module.handler(event, LambdaContext("chipscale-worker"))
        assert response["batchItemFailures"] == []
    assert module.worker().predictor.info.task == "segmentation"
    module.worker().close()

    rows, features = stored(results_db, "lambda-seg")
    assert len(rows) == sum(len(p.tiles) for p in packs)
    assert {r.attempts for r in rows} == {2}
    ok = {(r.x, r.y) for r in rows if r.status == "ok"}
    assert ok and {(f.x, f.y) for f in features} == ok
    keys = [(f.x, f.y, f.seq) for f in features]
    assert len(keys) == len(set(keys))  # no duplicate polygon after the redelivery
    # the same pixels through the local path give the same polygons
    predictor = open_predictor(str(model))
    try:
        with SQLiteStore(tmp_path / "r.db") as local:
            for message in messages("lambda-seg", aerial, max_tiles=8)[:2]:
                process_pack(message, predictor=predictor, store=local)
            local_features = list(local.iter_features("lambda-seg", background=True))
    finally:
        predictor.close()
    assert [(f.x, f.y, f.cls, f.wkb) for f in local_features] == [
        (f.x, f.y, f.cls, f.wkb) for f in features
    ]
