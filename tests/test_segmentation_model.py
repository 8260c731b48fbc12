"""Segmentation models through the metadata, the runtime, TorchServe and the Predictor port
(issue 18): ``task``/``margin``/``background`` in ``chipscale.json``, ``(N, bands, S+2m,
S+2m)`` in and ``(N, S, S)`` uint8 class indices out, the same in process and through a real
TorchServe (masks answered as one zstd frame), bad output shapes as ``error`` rows."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import urllib3
from conftest import start_torchserve
from mercantile import Tile

from chipscale.errors import ChipscaleError, ModelFormatError, PartialPrediction
from chipscale.models.mask_answer import MASK_ENCODINGS_HEADER, NO_CLASS, decode_masks
from chipscale.models.model_info import model_info
from chipscale.models.predictors import InProcessPredictor
from chipscale.models.request_body import npy, zstd
from chipscale.models.serving import ServingConfig, package_model
from chipscale.models.torchserve_client import TorchServePredictor
from chipscale.pipeline.messages import PackMessage
from chipscale.pipeline.process import predict_pack
from chipscale.sources import read_tiles
from chipscale.sources.footprint import cover
from model_server import chipscale_runtime as rt
from model_server.chipscale_metadata import KNOWN_FIELDS, ModelMetadata

SIZE = 32
MARGIN = 3
CLASSES = ("water", "field", "forest")
#: Integer weights of the 1x1 head: class scores are exact integers in float32, so the argmax
#: is the same on every path (ties go to the first class in torch and numpy alike).
HEAD = ((1, -1, 0), (-1, 2, -1), (0, -1, 1))
#: A tile whose first band starts with these values (a corner pixel of its margin) makes the
#: NaN model answer NaN for it.
MARKER = (7, 77, 177)


class NeighbourSeg(torch.nn.Module):
    """Per-pixel classes from 3x3 neighbourhood sums (exact integer arithmetic): a pixel's
    class depends on its neighbours, so the crop's border depends on the margin."""

    def __init__(self, nan_marker: bool = False) -> None:
        super().__init__()
        self.pool = torch.nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False)
        self.head = torch.nn.Conv2d(3, len(HEAD), 1, bias=False)
        with torch.no_grad():
            self.pool.weight.fill_(1.0)
            self.head.weight.copy_(torch.tensor(HEAD, dtype=torch.float32)[:, :, None, None])
        self.nan_marker = nan_marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.pool(x))
        if self.nan_marker:
            corner = x[:, :, 0, 0]
            marked = (corner[:, 0] == 7.0) & (corner[:, 1] == 77.0) & (corner[:, 2] == 177.0)
            nan = torch.full_like(out, float("nan"))
            out = torch.where(marked[:, None, None, None], nan, out)
        return out


def metadata(**changes: object) -> ModelMetadata:
    fields: dict[str, object] = {
        "name": "seg",
        "version": "1",
        "classes": CLASSES,
        "bands": 3,
        "tile_size": SIZE,
        "task": "segmentation",
        "margin": MARGIN,
        "background": "water",
    }
    fields.update(changes)
    return ModelMetadata(**fields)  # type: ignore[arg-type]


def expected_masks(batch: np.ndarray, margin: int = MARGIN) -> np.ndarray:
    """The reference: 3x3 sums (zero outside the input), the head, the argmax of the crop."""
    x = batch.astype(np.float64)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, w = x.shape[2:]
    sums = sum(padded[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3))
    scores = np.einsum("cb,nbhw->nchw", np.array(HEAD, dtype=np.float64), sums)
    crop = scores[:, :, margin : h - margin, margin : w - margin]
    return crop.argmax(axis=1).astype(np.uint8)


def random_batch(n: int, seed: int = 3) -> np.ndarray:
    side = SIZE + 2 * MARGIN
    return np.random.default_rng(seed).integers(0, 256, (n, 3, side, side), dtype=np.uint8)


@pytest.fixture(scope="module")
def seg_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("seg") / "seg.pt"
    return rt.save_torchscript(NeighbourSeg(), path, metadata())


# ----------------------------------------------------------------------------- metadata


def test_metadata_round_trip_and_model_info() -> None:
    meta = metadata()
    document = meta.to_dict()
    assert (document["task"], document["margin"], document["background"]) == (
        "segmentation",
        MARGIN,
        "water",
    )
    again = ModelMetadata.from_json(meta.to_json())
    assert again == meta and again.input_size == SIZE + 2 * MARGIN
    info = model_info(document)
    assert (info.task, info.margin, info.background) == ("segmentation", MARGIN, "water")
    detection = metadata(task="detection", margin=0)  # known, its runtime comes later
    assert model_info(detection.to_dict()).task == "detection"


def test_defaults_are_not_written() -> None:
    """A classification file written before these keys existed stays byte-for-byte."""
    plain = metadata(task="classification", margin=0, background=None)
    document = plain.to_dict()
    assert not {"task", "margin", "background"} & set(document)
    explicit = ModelMetadata.from_dict({**document, "task": "classification", "margin": 0})
    assert explicit.to_json() == plain.to_json()
    info = model_info(document)
    assert (info.task, info.margin, info.background) == ("classification", 0, None)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"margin": -1}, "'margin' must be an integer >= 0, got -1"),
        ({"margin": 2.5}, "'margin' must be an integer >= 0"),
        ({"margin": True}, "'margin' must be an integer >= 0"),
        ({"background": "snow"}, "'background' 'snow' is not one of the classes"),
        ({"task": "classification"}, "'background' names a class never vectorized"),
        ({"task": "regression"}, "'task' must be one of"),
        (
            {"classes": [f"c{i}" for i in range(256)], "background": None},
            "at most 255 classes",
        ),
    ],
)
def test_refusals(changes: dict[str, object], message: str) -> None:
    with pytest.raises(rt.MetadataError, match=message.replace("(", r"\(")):
        ModelMetadata.from_dict({**metadata().to_dict(), **changes})


def test_255_classes_fit_and_classification_has_no_class_limit() -> None:
    assert len(metadata(classes=[f"c{i}" for i in range(255)], background=None).classes) == 255
    many = [f"c{i}" for i in range(300)]
    assert metadata(classes=many, task="classification", background=None).task == "classification"


def test_unknown_key_lists_the_known_keys() -> None:
    with pytest.raises(rt.MetadataError) as error:
        ModelMetadata.from_dict({**metadata().to_dict(), "halo": 4})
    text = str(error.value)
    assert "unknown fields: halo" in text
    assert all(key in text for key in KNOWN_FIELDS)
    assert {"task", "margin", "background"} <= set(KNOWN_FIELDS)


# ----------------------------------------------------------------------------- runtime


def test_in_process_masks_are_the_argmax_of_the_crop(seg_model: Path) -> None:
    batch = random_batch(5)
    with InProcessPredictor(seg_model, sub_batch=2) as predictor:  # 3 sub-batches
        assert predictor.info.task == "segmentation" and predictor.info.margin == MARGIN
        masks = predictor.predict(batch)
        assert masks.shape == (5, SIZE, SIZE) and masks.dtype == np.uint8
        assert np.array_equal(masks, expected_masks(batch))
        assert len(np.unique(masks)) == len(CLASSES)
        # The margin matters: the same core with another margin changes the crop's border.
        other = batch.copy()
        other[:, :, :MARGIN] = 0
        changed = predictor.predict(other)
        assert np.array_equal(changed, expected_masks(other))
        assert not np.array_equal(changed[:, 0], masks[:, 0])
        assert np.array_equal(changed[:, 2:-2, 2:-2], masks[:, 2:-2, 2:-2])
        # Tiles without the margin do not fit: the error names both sizes.
        with pytest.raises(ModelFormatError, match=f"takes {SIZE + 2 * MARGIN}x"):
            predictor.predict(batch[:, :, MARGIN:-MARGIN, MARGIN:-MARGIN])


def test_logits_give_the_same_masks(tmp_path: Path) -> None:
    path = rt.save_torchscript(NeighbourSeg(), tmp_path / "logits.pt", metadata(output="logits"))
    batch = random_batch(3, seed=5)
    with InProcessPredictor(path) as predictor:
        assert np.array_equal(predictor.predict(batch), expected_masks(batch))


def test_inference_settings_and_warm_up(seg_model: Path) -> None:
    batch = random_batch(4, seed=11)
    frozen = rt.load_model(seg_model, sub_batch=3, inference=rt.InferenceSettings(freeze=True))
    assert frozen.frozen  # frozen models are warmed up with a full (S + 2m) sub-batch
    assert np.array_equal(frozen.predict(batch), expected_masks(batch))
    settings = rt.InferenceSettings(precision="bf16", channels_last=True)
    low = rt.load_model(seg_model, inference=settings).predict(batch)
    assert low.shape == (4, SIZE, SIZE)
    assert (low == expected_masks(batch)).mean() > 0.9  # bf16 moves near-ties only


def test_classification_with_a_margin_takes_the_larger_tile(tmp_path: Path) -> None:
    class Mean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.mean(dim=(1, 2, 3)).unsqueeze(1) / 255.0
            return torch.cat([m, 1.0 - m], dim=1)

    meta = ModelMetadata("mean", "1", ("a", "b"), bands=3, tile_size=SIZE, margin=2)
    path = rt.save_torchscript(Mean(), tmp_path / "mean.pt", meta)
    runtime = rt.load_model(path)
    side = SIZE + 4
    assert runtime.predict(np.zeros((2, 3, side, side), np.uint8)).shape == (2, 2)
    with pytest.raises(rt.BatchShapeError, match=f"{side}x{side} tiles \\({SIZE} \\+ 2 x margin"):
        runtime.check_batch(np.zeros((2, 3, SIZE, SIZE), np.uint8))


def test_save_checks_the_output_shape(tmp_path: Path) -> None:
    class Cropped(NeighbourSeg):  # crops itself: (N, C, S, S), not (N, C, S+2m, S+2m)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[:, :, 3:-3, 3:-3]

    side = SIZE + 2 * MARGIN
    with pytest.raises(rt.MetadataError) as error:
        rt.save_torchscript(Cropped(), tmp_path / "c.pt", metadata(), method="trace")
    text = str(error.value)
    assert f"(2, 3, {SIZE}, {SIZE})" in text and f"(2, 3, {side}, {side})" in text
    exported = rt.save_exported(NeighbourSeg(), tmp_path / "seg.pt2", metadata())
    batch = random_batch(3, seed=2)
    assert np.array_equal(rt.load_model(exported).predict(batch), expected_masks(batch))


def test_detection_is_known_but_not_yet_run(seg_model: Path, tmp_path: Path) -> None:
    with pytest.raises(rt.MetadataError, match="not yet supported"):
        rt.save_torchscript(NeighbourSeg(), tmp_path / "d.pt", metadata(task="detection"))
    detection = dataclasses.replace(rt.read_metadata(seg_model), task="detection")
    path = rt.rewrite_metadata(seg_model, tmp_path / "det.pt", detection)
    assert rt.read_metadata(path).task == "detection"
    with pytest.raises(ModelFormatError, match=r"detection models .* are not yet supported"):
        InProcessPredictor(path)


def test_non_finite_tiles_fail_alone(tmp_path: Path) -> None:
    path = rt.save_torchscript(NeighbourSeg(nan_marker=True), tmp_path / "nan.pt", metadata())
    batch = marked(random_batch(5, seed=7), rows=(1, 3))
    with (
        InProcessPredictor(path, sub_batch=2) as predictor,
        pytest.raises(PartialPrediction) as error,
    ):
        predictor.predict(batch)
    assert sorted(error.value.failed) == [1, 3]
    assert "non-finite values" in error.value.failed[1]
    masks, reference = error.value.scores, expected_masks(batch)
    assert (masks[[1, 3]] == NO_CLASS).all()
    assert np.array_equal(masks[[0, 2, 4]], reference[[0, 2, 4]])


def marked(batch: np.ndarray, rows: tuple[int, ...]) -> np.ndarray:
    batch = batch.copy()
    for row in rows:
        batch[row, :, 0, 0] = MARKER
    return batch


# ----------------------------------------------------------------------------- errors as rows


def test_wrong_output_shape_gives_error_rows_naming_both_shapes(
    seg_model: Path, aerial: Path, tmp_path: Path
) -> None:
    # A model file whose metadata says 4 classes while the model answers 3.
    meta = dataclasses.replace(rt.read_metadata(seg_model), classes=(*CLASSES, "road"))
    bad = rt.rewrite_metadata(seg_model, tmp_path / "bad.pt", meta)
    tiles = tuple(sorted(cover(18, source=str(aerial))))[:4]
    message = PackMessage(job="j", source=str(aerial), tiles=tiles)
    with InProcessPredictor(bad) as predictor:
        pack = predict_pack(message, predictor=predictor)
    side = SIZE + 2 * MARGIN
    assert len(pack.results) == len(tiles) and {r.status for r in pack.results} == {"error"}
    for row in pack.results:
        assert row.error is not None
        assert f"(4, 3, {side}, {side})" in row.error, row.error
        assert f"(4, 4, {side}, {side})" in row.error, row.error


def test_decode_masks_refuses_what_is_not_a_mask() -> None:
    info = model_info(metadata().to_dict())
    good = np.zeros((2, SIZE, SIZE), np.uint8)

    def answer(array: np.ndarray, **changes: object) -> dict[str, object]:
        data = zstd.compress(array.tobytes()) if zstd is not None else array.tobytes()
        return {
            "shape": list(array.shape),
            "dtype": "uint8",
            "encoding": "zstd" if zstd is not None else "identity",
            "data": base64.b64encode(data).decode(),
            **changes,
        }

    assert np.array_equal(decode_masks(answer(good), 2, info, "here"), good)
    with pytest.raises(ChipscaleError, match=r"\(3, 32, 32\) for 2 tiles, expected uint8 \(2,"):
        decode_masks(answer(good, shape=[3, SIZE, SIZE]), 2, info, "here")
    with pytest.raises(ChipscaleError, match="hold 2048 bytes, expected 3072"):
        decode_masks(answer(good, shape=[3, SIZE, SIZE]), 3, info, "here")
    stray = good.copy()
    stray[1, 5, 5] = 9
    with pytest.raises(ChipscaleError, match="class index 9"):
        decode_masks(answer(stray), 2, info, "here")
    with pytest.raises(ChipscaleError, match="unknown encoding 'png'"):
        decode_masks(answer(good, encoding="png"), 2, info, "here")
    with pytest.raises(ChipscaleError, match="not base64"):
        decode_masks(answer(good, data="%%%"), 2, info, "here")


# ----------------------------------------------------------------------------- TorchServe


@pytest.fixture(scope="module")
def nan_seg_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The neighbour model that answers NaN for marked tiles (a segmentation model's partial
    failure), on real 256 px tiles."""
    path = tmp_path_factory.mktemp("nanseg") / "segnan.pt"
    meta = metadata(name="segnan", tile_size=256, margin=MARGIN)
    return rt.save_torchscript(NeighbourSeg(nan_marker=True), path, meta)


@pytest.fixture(scope="module")
def seg_server(nan_seg_model: Path, tmp_path_factory: pytest.TempPathFactory):
    mar = package_model(
        nan_seg_model,
        tmp_path_factory.mktemp("segmar"),
        config=ServingConfig(max_batch_delay_ms=5, sub_batch=4),
    )
    server = start_torchserve(mar, tmp_path_factory.mktemp("segts"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def aerial_batch(aerial: Path) -> np.ndarray:
    """Real tiles of the demo image with their margins (12 of its z18 tiles)."""
    tiles: list[Tile] = sorted(cover(18, source=str(aerial)))[:12]
    read = read_tiles(str(aerial), tiles, size=256, margin=MARGIN)
    return np.stack([image.data for _, image in read])


def test_torchserve_masks_equal_in_process(
    seg_server, nan_seg_model: Path, aerial_batch: np.ndarray
) -> None:
    batch = marked(aerial_batch, rows=(2, 9))
    with InProcessPredictor(nan_seg_model) as local:
        assert local.info.task == "segmentation"
        with pytest.raises(PartialPrediction) as in_process:
            local.predict(batch)
        clean = local.predict(aerial_batch)
    with TorchServePredictor(seg_server.predictions_url, tiles_per_request=5) as remote:
        assert (remote.info.task, remote.info.margin) == ("segmentation", MARGIN)
        assert np.array_equal(remote.predict(aerial_batch), clean)
        with pytest.raises(PartialPrediction) as served:
            remote.predict(batch)
    assert clean.shape == (12, 256, 256) and clean.dtype == np.uint8
    assert len(np.unique(clean)) > 1  # real imagery: more than one class
    assert np.array_equal(served.value.scores, in_process.value.scores)
    assert sorted(served.value.failed) == sorted(in_process.value.failed) == [2, 9]
    assert "non-finite values" in served.value.failed[9]


def test_torchserve_answers_masks_compactly(
    seg_server, nan_seg_model: Path, aerial_batch: np.ndarray
) -> None:
    """The answer: masks in one zstd frame, a few KB a 256 x 256 tile (64 KiB raw)."""
    batch = aerial_batch[:8]
    answer = urllib3.PoolManager().request(
        "POST",
        seg_server.predictions_url,
        body=npy(batch),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert answer.status == 200, answer.data[:300]
    document = json.loads(answer.data)
    assert "scores" not in document and document["masks"]["shape"] == [8, 256, 256]
    assert document["masks"]["encoding"] == ("zstd" if zstd is not None else "identity")
    per_tile = len(answer.data) / len(batch)
    print(f"segmentation answer: {per_tile:.0f} bytes per 256x256 tile (raw 65536)")
    assert per_tile < 65536 / 4
    # A client without zstd says so and gets the masks uncompressed: the same masks.
    plain = urllib3.PoolManager().request(
        "POST",
        seg_server.predictions_url,
        body=npy(batch),
        headers={"Content-Type": "application/octet-stream", MASK_ENCODINGS_HEADER: "identity"},
    )
    assert plain.status == 200
    masks = json.loads(plain.data)["masks"]
    assert masks["encoding"] == "identity"
    info = model_info(rt.read_metadata(nan_seg_model).to_dict())
    assert np.array_equal(
        decode_masks(masks, 8, info, "test"), decode_masks(document["masks"], 8, info, "test")
    )


def test_drift_check_counts_pixels_whose_class_moved(seg_model: Path) -> None:
    """``model package --precision``'s drift check on a segmentation model: sample tiles with
    the margin, and the drift is the share of a tile's pixels whose class changed."""
    from chipscale.models.drift import check_drift, sample_tiles

    tiles = sample_tiles(rt.read_metadata(seg_model).to_dict(), count=6)
    assert tiles.shape == (6, 3, SIZE + 2 * MARGIN, SIZE + 2 * MARGIN)
    same = check_drift(seg_model, rt.InferenceSettings(freeze=True), tiles, device="cpu")
    assert same.max_drift == 0.0 and same.ok
    low = check_drift(seg_model, rt.InferenceSettings(precision="bf16"), tiles, device="cpu")
    assert 0.0 <= low.mean_drift <= low.max_drift <= 1.0
