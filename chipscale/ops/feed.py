"""The feed model: how many worker Lambdas keep a GPU busy, and how many TorchServe workers
a GPU needs, from measured stage times (the derivation and the figures: docs/design.md 9.7).

Pure arithmetic, imported by the stack's defaults (``stacks/config.py``) and by
``chipscale tune``; no AWS, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Extra Lambdas over the computed need: durations vary from pack to pack, and a GPU left
#: without a waiting request for a moment is throughput lost for good; 20 % more Lambdas
#: cost little next to a GPU.
HEADROOM = 0.20
#: The GPU-busy goal of issue 17: a worker count that leaves the GPU idle longer is too few.
BUSY_GOAL = 0.90
#: TorchServe workers share one GPU's memory: more than this is a configuration error.
MAX_WORKERS_PER_GPU = 4


def seconds_per_tile(
    read_s: float, predict_s: float, write_s: float = 0.0, *, read_ahead: bool = True
) -> float:
    """Seconds one worker Lambda spends per tile it delivers (``W`` of Little's law).

    With read-ahead the next pack is read while this one is predicted, so the slower of the
    two counts; the batch's one write comes after both. Serially every stage adds up.
    """
    if read_ahead:
        return max(read_s, predict_s) + write_s
    return read_s + predict_s + write_s


def lambdas_per_gpu(
    gpu_tiles_per_s: float,
    read_s: float,
    predict_s: float,
    write_s: float = 0.0,
    *,
    read_ahead: bool = True,
    headroom: float = HEADROOM,
) -> float:
    """Little's law: Lambdas a GPU needs = its tiles/s x seconds a Lambda spends per tile x
    (1 + headroom). ``predict_s`` is the Lambda's wait per tile with no queue in TorchServe,
    so never less than the GPU's own time per tile."""
    if gpu_tiles_per_s <= 0:
        raise ValueError(f"GPU tiles/s must be positive, got {gpu_tiles_per_s}")
    predict_s = max(predict_s, 1.0 / gpu_tiles_per_s)
    w = seconds_per_tile(read_s, predict_s, write_s, read_ahead=read_ahead)
    return gpu_tiles_per_s * w * (1 + headroom)


def per_gpu_concurrency(
    gpu_tiles_per_s: float,
    read_s: float,
    predict_s: float,
    write_s: float = 0.0,
    *,
    read_ahead: bool = True,
    headroom: float = HEADROOM,
) -> int:
    """:func:`lambdas_per_gpu` rounded up: the per-GPU concurrency (at least 1)."""
    lambdas = lambdas_per_gpu(
        gpu_tiles_per_s, read_s, predict_s, write_s, read_ahead=read_ahead, headroom=headroom
    )
    return max(1, math.ceil(lambdas - 1e-9))


def gpu_busy(workers: int, handler_cpu_s: float, gpu_s: float) -> float:
    """Fraction of time a GPU computes when each of ``workers`` TorchServe workers spends
    ``handler_cpu_s`` of serial CPU (decode, stack, copy, JSON) around ``gpu_s`` of GPU
    time per batch: one worker leaves the GPU idle during its CPU work, more overlap it."""
    return min(1.0, workers * gpu_s / (gpu_s + handler_cpu_s))


def workers_per_gpu(handler_cpu_s: float, gpu_s: float, *, busy_goal: float = BUSY_GOAL) -> int:
    """The fewest TorchServe workers per GPU that keep it busy ``busy_goal`` of the time:
    ceil(goal x (1 + CPU / GPU time per batch)), 1 to :data:`MAX_WORKERS_PER_GPU`.
    One worker suffices while the handler's CPU stays under (1/goal - 1) = 11 % of the GPU
    time."""
    if gpu_s <= 0:
        raise ValueError(f"GPU seconds per batch must be positive, got {gpu_s}")
    need = math.ceil(busy_goal * (gpu_s + handler_cpu_s) / gpu_s - 1e-9)
    return min(MAX_WORKERS_PER_GPU, max(1, need))


@dataclass(frozen=True, slots=True)
class FeedFigures:
    """The measured (or, where no GPU was lent, assumed) inputs of the stack's defaults."""

    #: One GPU's tiles/s at the serving precision: ASSUMED until bench/gpu_serving.py runs
    #: on a lent GPU (issue 17's estimate for a g5.xlarge, ResNet-50 class: 1,200-1,600;
    #: the upper end, since an idle GPU costs more than an extra Lambda).
    gpu_tiles_per_s: float
    #: A worker's read of a 100-tile pack, per tile (bench/pipeline.py, one worker: read
    #: only 647.6 tiles/s, bench/results/pipeline_workers1.json).
    read_s: float
    #: The client's wait per tile beyond the model's time: TorchServe at the default shape
    #: against in-process, 1/294.7 - 1/304.1 s (bench/results/request_shape.json).
    predict_overhead_s: float
    #: The batch's one write, per tile (bench/pipeline.py, one worker: store only 31,321
    #: tiles/s, SQLite).
    write_s: float
    #: The handler's serial CPU per request at the default request shape (FIELD-NOTES:
    #: about 2.7 ms of CPU per request, measured under TorchServe on the dev machine).
    handler_cpu_s_per_request: float
    tiles_per_request: int

    @property
    def predict_s(self) -> float:
        return 1.0 / self.gpu_tiles_per_s + self.predict_overhead_s

    def per_gpu_concurrency(self) -> int:
        return per_gpu_concurrency(self.gpu_tiles_per_s, self.read_s, self.predict_s, self.write_s)

    def workers_per_gpu(self) -> int:
        gpu_s = self.tiles_per_request / self.gpu_tiles_per_s
        return workers_per_gpu(self.handler_cpu_s_per_request, gpu_s)


#: The figures the stack's defaults are computed from (docs/design.md 9.7 says where each
#: comes from). Re-measure and update them with the GPU bench's figures on a lent GPU.
MEASURED = FeedFigures(
    gpu_tiles_per_s=1_600.0,
    read_s=0.0015,
    predict_overhead_s=0.0001,
    write_s=0.00003,
    handler_cpu_s_per_request=0.0027,
    tiles_per_request=8,
)
