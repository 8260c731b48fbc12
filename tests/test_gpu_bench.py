"""bench/gpu_serving.py runs here as a smoke run on the CPU and says which figures need a GPU:
every section of issue 17's "The GPU bench must be able to tell" is in its JSON, the figures
only a GPU gives are null and listed in ``needs_gpu``, and the rest are measured."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = (
    "paths",
    "precision",
    "handler_stages",
    "torchserve",
    "feed",
    "network",
    "placement",
    "dtypes",
)

pytestmark = pytest.mark.slow


def at(result: dict[str, Any], dotted: str) -> Any:
    value: Any = result
    for key in dotted.split("."):
        value = value[int(key)] if isinstance(value, list) else value[key]
    return value


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu-bench") / "gpu_serving.json"
    done = subprocess.run(
        [sys.executable, "bench/gpu_serving.py", "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    assert json.loads(done.stdout) == result  # printed and written alike
    return result


def test_smoke_run_has_every_section_and_goal(smoke: dict[str, Any]) -> None:
    assert smoke["smoke"] is True  # automatic without CUDA
    for section in SECTIONS:
        assert section in smoke, section
    assert set(smoke["goals"]) == {
        "handler_over_raw_same_precision",
        "handler_over_raw_at_serving_precision",
        "gpu_busy_fraction_at_default_feed",
        "fp16_over_fp32_on_a10g_l4_class",
    }
    assert set(smoke["precision"]) >= {
        "fp32",
        "fp32_tf32_off",
        "fp16_channels_last",
        "fp16_channels_last_compiled",
    }
    stages = smoke["handler_stages"]["ms_per_call"]
    for stage in ("decode_handler", "concatenate", "copy_pageable", "copy_pinned", "forward"):
        assert stage in stages
    assert {"copy_back", "json"} <= set(stages)
    assert set(smoke["dtypes"]) >= {"uint8_rgb", "uint16_4band"}
    assert smoke["network"]["payloads"]["uint8_rgb"]["request_bytes_per_tile"] > 196608


def test_gpu_only_figures_are_null_and_listed(smoke: dict[str, Any]) -> None:
    needs = smoke["needs_gpu"]
    for path in needs:
        assert at(smoke, path) is None, path
    expected = [
        "precision.fp16_channels_last.tiles_per_s",
        "precision.fp32_tf32_off.tiles_per_s",
        "precision.fp16_channels_last_compiled.tiles_per_s",
        "handler_stages.ms_per_call.copy_pinned",
        "handler_stages.ms_per_call.copy_pageable",
        "handler_stages.kernel_time_over_wall",
    ]
    for prefix in expected:
        assert any(p.startswith(prefix) for p in needs), prefix
    assert smoke["goals"]["fp16_over_fp32_on_a10g_l4_class"]["measured"] is None
    assert smoke["goals"]["handler_over_raw_same_precision"]["measured"] > 0
    low = smoke["paths"]["at_serving_precision"]  # bf16 on a CPU, via the model metadata
    assert low["runtime_settings"]["precision"] == "bf16", low
    assert smoke["goals"]["handler_over_raw_at_serving_precision"]["measured"] > 0
    # What a CPU can measure is measured, not null.
    assert all(v > 0 for v in smoke["precision"]["fp32"]["tiles_per_s"].values())
    assert smoke["handler_stages"]["ms_per_call"]["forward"] > 0


def test_served_sections_measured_or_skipped_with_a_reason(smoke: dict[str, Any]) -> None:
    needs = smoke["needs_gpu"]
    if shutil.which("java") is None:
        assert "java" in smoke["torchserve"]["skipped"]
        return
    by_workers = smoke["torchserve"]["by_workers_per_gpu"]
    assert set(by_workers) == {"1", "2"}
    for run in by_workers.values():
        assert run["tiles_per_s"] > 0
        assert run["latency_ms"]["p99"] >= run["latency_ms"]["p50"] > 0
        assert run["batch_histogram"]["tiles_per_call"]
        assert set(run["cpu_ms_per_tile"]) == {"jvm", "worker", "client"}
    assert "torchserve.by_workers_per_gpu.1.gpu_busy_fraction" in needs
    feed = smoke["feed"]["by_workers_per_gpu"]
    default = smoke["feed"]["default_workers_per_gpu"]  # the stack's, by Little's law
    assert set(feed) == {"4", "8", "16", "32", str(default)}
    for level, run in feed.items():
        assert run["tiles_per_s"] > 0
        assert f"feed.by_workers_per_gpu.{level}.gpu_busy_fraction" in needs
    assert len(smoke["placement"]["workers"]) == 2
    devices = {w["device"] for w in smoke["placement"]["metadata_answer_workers"]}
    assert devices == {"cpu"}
    assert "placement.gpus" in needs
    assert "placement.workers.0.gpu_uuid" in needs
    rates = smoke["network"]["gbps_at_each_rate_uint8_rgb"]
    assert "torchserve_2_workers_per_gpu" in rates and "feed_4_per_gpu" in rates
