"""The feed model (chipscale.ops.feed): Little's law for the per-GPU concurrency, the rule for
TorchServe workers per GPU, and the stack's defaults computed from the measured figures."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chipscale.ops import feed
from stacks.config import REPO_ROOT, DeploymentConfig


def test_littles_law_with_read_ahead_counts_the_slower_stage() -> None:
    # 1,600 tiles/s; a Lambda reads 1.5 ms and waits 1.0 ms a tile, writes 0.03 ms
    assert feed.seconds_per_tile(0.0015, 0.001, 0.00003) == pytest.approx(0.00153)
    assert feed.lambdas_per_gpu(1600, 0.0015, 0.001, 0.00003) == pytest.approx(1600 * 0.00153 * 1.2)
    assert feed.per_gpu_concurrency(1600, 0.0015, 0.001, 0.00003) == 3  # 2.94 -> 3


def test_serial_workers_need_more_lambdas() -> None:
    ahead = feed.per_gpu_concurrency(1600, 0.0015, 0.001)
    serial = feed.per_gpu_concurrency(1600, 0.0015, 0.001, read_ahead=False)
    assert (ahead, serial) == (3, 5)  # 1600 x 0.0025 x 1.2 = 4.8 -> 5


def test_predict_never_counts_below_the_gpus_own_time() -> None:
    assert feed.lambdas_per_gpu(100, 0.0, 0.0) == pytest.approx(100 * 0.01 * 1.2)


@given(
    x=st.floats(1, 10_000),
    read=st.floats(0, 0.1),
    predict=st.floats(0, 0.1),
    more=st.floats(0.0001, 0.1),
)
def test_per_gpu_concurrency_grows_with_every_input(
    x: float, read: float, predict: float, more: float
) -> None:
    base = feed.per_gpu_concurrency(x, read, predict)
    assert base >= 1
    assert feed.per_gpu_concurrency(x, read + more, predict) >= base
    assert feed.per_gpu_concurrency(x, read, predict + more) >= base
    assert feed.per_gpu_concurrency(x * 2, read, predict) >= base


@pytest.mark.parametrize(
    ("cpu_ms", "gpu_ms", "workers"),
    [
        (0.0, 5.0, 1),
        (0.55, 5.0, 1),  # 11 % of the GPU time: 1 worker keeps it 90 % busy
        (0.6, 5.0, 2),
        (2.7, 5.0, 2),  # today's figures: 2.7 ms of handler CPU per 8-tile request
        (5.0, 5.0, 2),
        (10.0, 5.0, 3),
        (100.0, 5.0, feed.MAX_WORKERS_PER_GPU),
    ],
)
def test_workers_per_gpu_rule(cpu_ms: float, gpu_ms: float, workers: int) -> None:
    assert feed.workers_per_gpu(cpu_ms / 1000, gpu_ms / 1000) == workers
    n = feed.workers_per_gpu(cpu_ms / 1000, gpu_ms / 1000)
    if n < feed.MAX_WORKERS_PER_GPU:
        assert feed.gpu_busy(n, cpu_ms, gpu_ms) >= feed.BUSY_GOAL - 1e-9
    if n > 1:
        assert feed.gpu_busy(n - 1, cpu_ms, gpu_ms) < feed.BUSY_GOAL


def test_the_stack_defaults_follow_the_measured_figures() -> None:
    """Not a fixed 4 and 1: computed, and cdk.json (which overrides the dataclass) agrees."""
    per_gpu, workers = feed.MEASURED.per_gpu_concurrency(), feed.MEASURED.workers_per_gpu()
    assert (per_gpu, workers) == (3, 2)
    defaults = DeploymentConfig()
    assert (defaults.per_gpu_concurrency, defaults.workers_per_gpu) == (per_gpu, workers)
    context = json.loads((REPO_ROOT / "cdk.json").read_text())["context"]
    assert (context["perGpuConcurrency"], context["workersPerGpu"]) == (per_gpu, workers)
