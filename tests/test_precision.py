"""Inference settings declared in the model file (issue 17, item 1): precision under autocast,
channels_last, TorchScript freezing, applied by the one runtime in process and in TorchServe,
and `chipscale model package --precision` refusing a precision whose scores drift."""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import start_torchserve
from torch import nn

from chipscale.cli import cli
from chipscale.models.predictors import InProcessPredictor
from chipscale.models.serving import ServingConfig, package_model
from chipscale.models.torchserve_client import TorchServePredictor
from model_server import chipscale_runtime as rt

warnings.filterwarnings("ignore", message=".*TorchScript.*deprecated", category=DeprecationWarning)

IMAGE = Path(__file__).resolve().parents[1] / "examples" / "rasterio_cogeo.tif"
SIZE = 32


class ConvNet(nn.Module):
    """A small convolutional classifier (3 bands, 32x32 -> 3 classes), fixed weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(17)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


class LayoutProbe(nn.Module):
    """Scores [1, 0] when its input arrives channels_last, [0, 1] otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flag = 1.0 if x.is_contiguous(memory_format=torch.channels_last) else 0.0
        one = torch.ones(x.shape[0], 1, dtype=torch.float32)
        return torch.cat([one * flag, one * (1.0 - flag)], dim=1)


def metadata(**inference: Any) -> rt.ModelMetadata:
    return rt.ModelMetadata(
        name="convnet",
        version="1",
        classes=("a", "b", "c"),
        bands=3,
        tile_size=SIZE,
        scaling=rt.Scaling.divided_by(255),
        output="logits",
        inference=rt.InferenceSettings(**inference),
    )


def tiles(n: int = 24) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (n, 3, SIZE, SIZE), dtype=np.uint8)


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return rt.save_torchscript(ConvNet(), tmp_path_factory.mktemp("m") / "fp32.pt", metadata())


@pytest.fixture(scope="module")
def bf16_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("m") / "bf16.pt"
    return rt.save_torchscript(
        ConvNet(), path, metadata(precision="bf16", channels_last=True, freeze=True)
    )


def test_metadata_without_settings_is_unchanged_and_settings_round_trip() -> None:
    assert "inference" not in metadata().to_dict()  # old files read and write as before
    declared = metadata(precision="bf16", channels_last=True)
    again = rt.ModelMetadata.from_json(declared.to_json())
    assert again.inference == rt.InferenceSettings(precision="bf16", channels_last=True)
    with pytest.raises(rt.MetadataError, match=r"precision' must be one of"):
        metadata(precision="int4")
    with pytest.raises(rt.MetadataError, match="unknown fields: tf64"):
        rt.ModelMetadata.from_dict(metadata().to_dict() | {"inference": {"tf64": True}})


def test_bf16_on_cpu_scores_within_tolerance_and_the_runtime_reports_it(
    fp32_file: Path, bf16_file: Path
) -> None:
    batch = tiles()
    with InProcessPredictor(fp32_file) as fp32, InProcessPredictor(bf16_file) as bf16:
        expected, got = fp32.predict(batch), bf16.predict(batch)
        settings = bf16.runtime.settings()
    assert settings["precision"] == "bf16" and settings["channels_last"] and settings["frozen"]
    assert settings["device"] == "cpu"
    assert got.dtype == np.float32
    drift = float(np.abs(got - expected).max())
    assert 0 < drift < 0.01  # bf16 really ran (scores moved), and stayed close to fp32


def test_channels_last_reaches_the_model(tmp_path: Path) -> None:
    probe = metadata().to_dict() | {"classes": ["nhwc", "nchw"], "output": "scores"}
    plain = rt.save_torchscript(LayoutProbe(), tmp_path / "plain.pt", probe)
    nhwc = rt.save_torchscript(
        LayoutProbe(), tmp_path / "nhwc.pt", probe | {"inference": {"channels_last": True}}
    )
    assert rt.load_model(plain).predict(tiles(2))[:, 0].tolist() == [0.0, 0.0]
    assert rt.load_model(nhwc).predict(tiles(2))[:, 0].tolist() == [1.0, 1.0]


def test_freeze_inlines_the_weights_and_keeps_the_scores(fp32_file: Path) -> None:
    plain = rt.load_model(fp32_file)
    frozen = rt.load_model(fp32_file, inference=rt.InferenceSettings(freeze=True))
    assert frozen.settings()["frozen"] and not plain.settings()["frozen"]
    assert list(plain.module.parameters()) and not list(frozen.module.parameters())
    batch = tiles()
    np.testing.assert_allclose(frozen.predict(batch), plain.predict(batch), atol=1e-5)


def test_settings_the_file_kind_cannot_take_are_refused(fp32_file: Path, tmp_path: Path) -> None:
    with pytest.raises(rt.MetadataError, match=r"compile needs a torch\.export"):
        rt.load_model(fp32_file, inference=rt.InferenceSettings(compile=True))
    exported = rt.save_exported(ConvNet(), tmp_path / "m.pt2", metadata())
    with pytest.raises(rt.MetadataError, match="freeze needs a TorchScript"):
        rt.load_model(exported, inference=rt.InferenceSettings(freeze=True))
    # bf16 + channels_last on a .pt2: the same runtime path
    runtime = rt.load_model(exported, inference=rt.InferenceSettings(precision="bf16"))
    expected = rt.load_model(exported).predict(tiles())
    assert float(np.abs(runtime.predict(tiles()) - expected).max()) < 0.01


def test_package_refuses_a_precision_that_drifts_beyond_the_tolerance(
    fp32_file: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        cli,
        ["model", "package", str(fp32_file), "-o", str(tmp_path), "--precision", "bf16",
         "--tolerance", "0.000001", "--samples", "8"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "tolerance 1e-06: REFUSED" in result.stderr
    assert "not packaged: the scores drift" in result.stderr
    assert not list(tmp_path.glob("*.mar"))


def test_package_writes_an_accepted_precision_into_the_archived_model(
    fp32_file: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        cli,
        ["model", "package", str(fp32_file), "-o", str(tmp_path), "--precision", "bf16",
         "--channels-last", "--sample-source", str(IMAGE), "--samples", "8"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "on 8 tiles (" + str(IMAGE) in result.stderr
    assert "tolerance 0.01: accepted" in result.stderr
    with zipfile.ZipFile(tmp_path / "convnet.mar") as mar:
        packed = tmp_path / "packed.pt"
        packed.write_bytes(mar.read("convnet.pt"))
    assert rt.read_metadata(packed).inference == rt.InferenceSettings(
        precision="bf16", channels_last=True
    )
    assert rt.read_metadata(fp32_file).inference == rt.InferenceSettings()  # file untouched


def test_torchserve_runs_the_files_settings_like_the_in_process_predictor(
    bf16_file: Path, fp32_file: Path, tmp_path: Path
) -> None:
    mar = package_model(bf16_file, tmp_path / "mar", config=ServingConfig(max_batch_delay_ms=5))
    server = start_torchserve(mar, tmp_path / "ts")
    try:
        with TorchServePredictor(server.predictions_url) as served:
            worker = served.worker
            scores = served.predict(tiles())
    finally:
        server.stop()
    assert worker["device"] == "cpu" and worker["gpu_host"] is False
    assert worker["precision"] == "bf16" and worker["channels_last"] and worker["frozen"]
    assert json.loads(json.dumps(worker))["pid"] > 0
    with InProcessPredictor(bf16_file) as here, InProcessPredictor(fp32_file) as fp32:
        np.testing.assert_allclose(scores, here.predict(tiles()), atol=1e-6)
        assert float(np.abs(scores - fp32.predict(tiles())).max()) < 0.01
