"""The model contract: metadata inside the file, both file kinds, refusals, scaling,
sub-batching, the in-process predictor and the demo model on synthetic and real tiles."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port
from torch import nn

from chipscale.errors import ChipscaleError, ModelFormatError, PredictorUnavailable
from chipscale.models import demo_model
from chipscale.models.predictors import InProcessPredictor, Predictor, open_predictor
from chipscale.values import ModelInfo
from model_server import chipscale_runtime as rt

SIZE = 16


class BandMeans(nn.Module):
    """Returns each tile's per-band mean: shows exactly what the runtime fed the model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=[2, 3])


def means_metadata(**overrides: object) -> rt.ModelMetadata:
    fields: dict[str, object] = {
        "name": "means",
        "version": "7",
        "classes": ["b0", "b1", "b2"],
        "bands": 3,
        "tile_size": SIZE,
        "scaling": {"type": "divide", "value": 255},
        "description": "test model",
    }
    fields.update(overrides)
    return rt.ModelMetadata.from_dict(fields)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("models")
    meta = means_metadata()
    return {
        "torchscript": rt.save_torchscript(BandMeans(), tmp / "means.pt", meta),
        "exported": rt.save_exported(BandMeans(), tmp / "means.pt2", meta),
    }


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_model.build(tmp_path_factory.mktemp("demo") / "demo-model.pt")


@pytest.fixture(scope="module")
def demo(demo_file: Path) -> InProcessPredictor:
    return InProcessPredictor(demo_file, sub_batch=8, threads=1)


def tiles(n: int, bands: int = 3, value: int = 51, size: int = SIZE) -> np.ndarray:
    return np.full((n, bands, size, size), value, dtype=np.uint8)


# --- metadata -----------------------------------------------------------------------------


def test_metadata_roundtrips_through_dict_and_json() -> None:
    meta = means_metadata(
        band_counts=[3, 4],
        band_names=["red", "green", "blue", "nir"],
        scaling={"type": "normalize", "mean": [0.5], "std": [0.25], "divide": 255},
        output="logits",
    )
    assert rt.ModelMetadata.from_dict(meta.to_dict()) == meta
    assert rt.ModelMetadata.from_json(meta.to_json()) == meta
    assert meta.band_counts == (3, 4)


def test_metadata_lists_every_missing_field() -> None:
    with pytest.raises(rt.MetadataError, match="missing required fields: classes, bands"):
        rt.ModelMetadata.from_dict({"name": "x", "version": "1", "tile_size": 256})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"classes": ["a", "a"]}, "duplicates"),
        ({"band_counts": [4]}, "must include 'bands'"),
        ({"scaling": {"type": "divide", "value": 0}}, "non-zero"),
        ({"scaling": {"type": "normalize", "mean": [1, 2], "std": [1]}}, "same non-zero length"),
        ({"input_dtype": "uint8"}, "needs scaling 'none'"),
        ({"output": "probabilities"}, "'output' must be one of"),
        ({"colour": "red"}, "unknown fields: colour"),
    ],
)
def test_metadata_rejects_invalid_values(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(rt.MetadataError, match=message):
        means_metadata(**overrides)


@pytest.mark.parametrize("kind", ["torchscript", "exported"])
def test_metadata_is_stored_inside_the_file(files: dict[str, Path], kind: str) -> None:
    assert rt.read_metadata(files[kind]) == means_metadata()
    runtime = rt.load_model(files[kind])
    assert runtime.kind == kind
    assert runtime.metadata == means_metadata()


# --- loading and refusals -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["torchscript", "exported"])
def test_both_kinds_load_and_take_any_batch_size(files: dict[str, Path], kind: str) -> None:
    runtime = rt.load_model(files[kind], sub_batch=4)
    for n in (1, 3, 9):
        out = runtime.predict(tiles(n))
        assert out.shape == (n, 3)
        assert out.dtype == np.float32
    assert runtime.predict(tiles(0)).shape == (0, 3)


def test_state_dict_is_refused_with_how_to_export(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(nn.Conv2d(3, 4, 3).state_dict(), path)
    with pytest.raises(rt.ModelFileError, match="plain state_dict") as info:
        rt.load_model(path)
    assert "save_torchscript(module, path, metadata)" in str(info.value)
    assert "save_exported" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelFormatError, match="save_torchscript"):
        InProcessPredictor(path)


def test_pickled_module_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "module.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3)), path)
    with pytest.raises(rt.ModelFileError, match=r"pickled nn\.Module.*save_torchscript"):
        rt.load_model(path)


def test_torchscript_without_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bare.pt"
    torch.jit.save(torch.jit.script(BandMeans()), str(path))
    with pytest.raises(rt.ModelFileError, match=r"no chipscale metadata.*save_torchscript"):
        rt.load_model(path)


@pytest.mark.parametrize("content", [b"not a model at all\n", b"PK\x03\x04garbage"])
def test_non_model_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(rt.ModelFileError, match="not a PyTorch model file"):
        rt.load_model(path)
    with pytest.raises(ModelFormatError, match="not a PyTorch model file"):
        InProcessPredictor(path)


def test_missing_file_is_a_model_format_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match=r"Model file .*nowhere\.pt not found"):
        InProcessPredictor(tmp_path / "nowhere.pt")


def test_wrong_output_shape_is_refused_when_saving(tmp_path: Path) -> None:
    with pytest.raises(rt.MetadataError, match=r"expected \(2, 2\)"):
        rt.save_torchscript(BandMeans(), tmp_path / "x.pt", means_metadata(classes=["a", "b"]))


# --- running ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, 4, SIZE, SIZE), "takes 3 bands, got 4"),
        ((2, 3, SIZE * 2, SIZE * 2), f"takes {SIZE}x{SIZE} tiles, got 32x32"),
        ((3, SIZE, SIZE), r"must be \(N, bands, size, size\)"),
    ],
)
def test_batch_shape_mismatch_is_refused(
    files: dict[str, Path], shape: tuple[int, ...], message: str
) -> None:
    runtime = rt.load_model(files["torchscript"])
    with pytest.raises(rt.BatchShapeError, match=message):
        runtime.predict(np.zeros(shape, dtype=np.uint8))
    with pytest.raises(ModelFormatError, match=message):
        InProcessPredictor(files["torchscript"]).predict(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize("kind", ["torchscript", "exported"])
def test_scaling_divide_is_applied_once(files: dict[str, Path], kind: str) -> None:
    out = rt.load_model(files[kind]).predict(tiles(2, value=51))
    np.testing.assert_allclose(out, 0.2, rtol=1e-6)


def test_scaling_normalize_per_band_and_uint16(tmp_path: Path) -> None:
    meta = means_metadata(
        scaling={"type": "normalize", "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.25],
                 "divide": 1000}
    )  # fmt: skip
    path = rt.save_torchscript(BandMeans(), tmp_path / "n.pt", meta)
    batch = np.full((1, 3, SIZE, SIZE), 500, dtype=np.uint16)
    out = rt.load_model(path).predict(batch)
    np.testing.assert_allclose(out[0], [(0.5 - 0.1) / 0.5, (0.5 - 0.2) / 0.5, (0.5 - 0.3) / 0.25],
                               rtol=1e-5)  # fmt: skip


def test_logits_output_gets_a_softmax(tmp_path: Path) -> None:
    path = rt.save_torchscript(BandMeans(), tmp_path / "l.pt", means_metadata(output="logits"))
    batch = tiles(1)
    batch[:, 0] = 255  # means 1.0, 0.2, 0.2
    out = rt.load_model(path).predict(batch)
    expected = torch.softmax(torch.tensor([1.0, 0.2, 0.2]), 0).numpy()
    np.testing.assert_allclose(out[0], expected, rtol=1e-5)


@pytest.mark.parametrize("kind", ["torchscript", "exported"])
def test_sub_batches_give_the_same_output_as_one_batch(files: dict[str, Path], kind: str) -> None:
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(11, 3, SIZE, SIZE), dtype=np.uint8)
    whole = rt.load_model(files[kind], sub_batch=64).predict(batch)
    pieces = rt.load_model(files[kind], sub_batch=3).predict(batch)
    np.testing.assert_allclose(pieces, whole, rtol=1e-6)
    np.testing.assert_allclose(whole, batch.mean(axis=(2, 3)) / 255, rtol=1e-5)


def test_device_auto_and_missing_cuda() -> None:
    assert rt.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(rt.ModelRuntimeError, match="CUDA is not available"):
            rt.resolve_device("cuda")


# --- predictor port -----------------------------------------------------------------------


def test_in_process_predictor_follows_the_port(files: dict[str, Path]) -> None:
    with InProcessPredictor(files["exported"], sub_batch=2, threads=1) as predictor:
        assert isinstance(predictor, Predictor)
        assert predictor.info == ModelInfo("means", "7", ("b0", "b1", "b2"), 3, SIZE, (3,))
        assert predictor.predict(tiles(5)).shape == (5, 3)
    with pytest.raises(ChipscaleError, match="closed"):
        predictor.predict(tiles(1))


def test_predict_from_several_threads(demo: InProcessPredictor) -> None:
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (6, 3, 256, 256), dtype=np.uint8) for _ in range(6)]
    expected = [demo.predict(b) for b in batches]
    results: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        results[i] = demo.predict(batches[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(results[i], want)


def test_open_predictor_specs(files: dict[str, Path]) -> None:
    assert open_predictor(files["torchscript"]).info.name == "means"
    assert open_predictor(str(files["exported"]), sub_batch=4).info.version == "7"
    with pytest.raises(PredictorUnavailable, match="after 1 attempts"):  # nothing listens
        open_predictor(f"http://127.0.0.1:{free_port()}/predictions/demo", retries=0)
    with pytest.raises(ChipscaleError, match="local files"):
        open_predictor("s3://bucket/model.pt")


def test_open_predictor_none_builds_the_demo_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from chipscale.models import predictors

    target = tmp_path / "examples" / "demo-model.pt"
    monkeypatch.setattr(predictors, "DEMO_MODEL_PATH", target)
    predictor = open_predictor(None)
    assert target.is_file()
    assert predictor.info == ModelInfo(
        "demo-landcover", demo_model.VERSION, demo_model.CLASSES, 3, 256, (3, 4)
    )
    built = target.stat().st_mtime_ns
    assert open_predictor(None).info.name == "demo-landcover"
    assert target.stat().st_mtime_ns == built  # cached, not rebuilt


def test_open_predictor_none_falls_back_to_the_user_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from chipscale.models import predictors

    readonly = tmp_path / "readonly"
    readonly.mkdir()
    monkeypatch.setattr(predictors, "DEMO_MODEL_PATH", readonly / "demo-model.pt")
    monkeypatch.setattr(predictors, "_writable", lambda d: d != readonly)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    open_predictor(None)
    assert (tmp_path / "cache" / "chipscale" / "demo-model.pt").is_file()


# --- the demo model -----------------------------------------------------------------------


def synthetic(cover: str, bands: int = 3) -> np.ndarray:
    """A 256 px tile of one known cover, with texture where that cover has it."""
    rng = np.random.default_rng(42)
    size = 256
    if cover == "snow":
        rgb = np.array([242, 245, 250])[:, None, None] + rng.normal(0, 2, (3, size, size))
    elif cover == "forest":
        # dark green crowns with shadows between them at ~3 m
        crowns = rng.random((size // 6 + 1, size // 6 + 1)).repeat(6, 0).repeat(6, 1)
        crowns = crowns[:size, :size]
        rgb = np.stack([20 + 40 * crowns, 45 + 70 * crowns, 30 + 35 * crowns])
    elif cover == "bare_ground":
        rgb = np.array([165, 130, 95])[:, None, None] + rng.normal(0, 6, (3, size, size))
    elif cover == "road":
        rgb = np.empty((3, size, size))
        rgb[:] = np.array([240, 243, 248])[:, None, None]  # snow verges
        rgb[:, :, 48:208] = np.array([112, 114, 116])[:, None, None]  # a wide grey road
        rgb += rng.normal(0, 2, (3, size, size))
    else:
        raise ValueError(cover)
    tile = np.clip(rgb, 0, 255)
    if bands == 4:
        tile = np.concatenate([tile, np.full((1, size, size), 60.0)])
    return tile.astype(np.uint8)[None]


@pytest.mark.parametrize("cover", demo_model.CLASSES)
def test_demo_model_names_synthetic_cover(demo: InProcessPredictor, cover: str) -> None:
    scores = demo.predict(synthetic(cover))[0]
    assert scores.sum() == pytest.approx(1.0, abs=1e-5)
    assert demo.info.classes[int(scores.argmax())] == cover, dict(
        zip(demo.info.classes, scores, strict=True)
    )


def test_demo_model_uses_nir_when_given(demo: InProcessPredictor) -> None:
    # Olive-green cover: brownish in RGB (bare ground), plainly vegetation with a high NIR band.
    size = 256
    rgb = np.array([90, 110, 60], dtype=np.uint8)[None, :, None, None]
    rgb = np.broadcast_to(rgb, (1, 3, size, size))
    low_nir = np.concatenate([rgb, np.full((1, 1, size, size), 70, np.uint8)], axis=1)
    high_nir = np.concatenate([rgb, np.full((1, 1, size, size), 220, np.uint8)], axis=1)
    forest = demo.info.classes.index("forest")
    low, high = demo.predict(low_nir)[0], demo.predict(high_nir)[0]
    assert high[forest] > low[forest] + 0.3
    assert demo.info.classes[int(high.argmax())] == "forest"
    assert demo.info.classes[int(low.argmax())] != "forest"


def test_demo_model_build_is_reproducible(tmp_path: Path, demo_file: Path) -> None:
    again = demo_model.build(tmp_path / "again.pt")
    batch = np.concatenate([synthetic(c) for c in demo_model.CLASSES])
    np.testing.assert_array_equal(
        rt.load_model(again).predict(batch), rt.load_model(demo_file).predict(batch)
    )


def test_demo_model_on_the_real_image(demo: InProcessPredictor, aerial: Path) -> None:
    from rio_tiler.io import Reader

    expected = {
        (224758, 101420): "snow",  # snowy field crossed by the road
        (224759, 101421): "snow",
        (224757, 101423): "forest",  # dark conifers
        (224756, 101422): "forest",
        (224759, 101420): "bare_ground",  # ploughed fields beside the road
    }
    with Reader(aerial) as reader:
        batch = np.stack([reader.tile(x, y, 18).data for x, y in expected])
    scores = demo.predict(batch)
    named = [demo.info.classes[int(i)] for i in scores.argmax(axis=1)]
    assert named == list(expected.values())


def test_traced_torchscript_and_a_ready_exported_program(tmp_path: Path) -> None:
    meta = means_metadata()
    traced = rt.save_torchscript(BandMeans(), tmp_path / "t.pt", meta, method="trace")
    example = torch.zeros(2, 3, SIZE, SIZE)
    program = torch.export.export(
        BandMeans(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    exported = rt.save_exported(program, tmp_path / "p.pt2", meta)
    for path in (traced, exported):
        np.testing.assert_allclose(rt.load_model(path).predict(tiles(3)), 0.2, rtol=1e-6)
