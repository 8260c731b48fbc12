"""The model of the system that ``chipscale plan`` and ``chipscale tune`` share: rates in, a
steady-state tiles/s, per-stage utilisation, the bottleneck and the per-GPU concurrency out.

A closed queueing network solved by exact mean-value analysis (MVA): the customers are the
worker Lambdas (the event source's MaximumConcurrency), each taking one pack (an SQS message
of up to ``tiles_per_message`` tiles) round a cycle of

* a delay: its read of the pack (overlapped with the previous pack's predict when the worker
  reads ahead, which it does within an invocation's batch only), the client's share of the
  request, the write's round trip and the invocation's SQS receive / delete and start-up,
  spread over its packs;
* TorchServe on the GPUs: ``gpus`` servers (Seidmann's approximation of a multi-server
  queue), each serving at the GPU's tiles/s times how busy its workers keep it
  (:func:`chipscale.ops.feed.gpu_busy`); with ``shared_device`` False (CPU serving, the
  local bench) each worker is its own server instead, up to ``host_cores``. A Lambda's
  requests (``requests_in_flight`` of them) spread over several servers at once;
* PostgreSQL: one queue at the database's rows/s.

Pure arithmetic, no AWS, no numpy. The derivation and where it is wrong: docs/design.md 9.9.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from chipscale.errors import ChipscaleError
from chipscale.ops import feed
from chipscale.ops.fleet import desired_mapping

#: Seconds the worker keeps free before its Lambda timeout (it starts no pack within them).
TIMEOUT_MARGIN_S = 10.0


class ModelError(ChipscaleError):
    """The rates or the fleet given to the model are not usable (names the field)."""


@dataclass(frozen=True, slots=True)
class Rates:
    """Per-stage rates: what ``chipscale profile`` measures (every figure per tile unless
    named otherwise). ``gpu_tiles_per_s``: one GPU (or, with ``shared_device`` False, one
    TorchServe worker) computing without a pause."""

    gpu_tiles_per_s: float
    handler_cpu_s_per_request: float
    tiles_per_request: int
    predict_overhead_s: float
    read_s: float
    write_s: float
    db_rows_per_s: float
    cold_start_s: float
    invocation_overhead_s: float
    request_bytes_per_tile: float
    shared_device: bool = True

    def __post_init__(self) -> None:
        for name in ("gpu_tiles_per_s", "tiles_per_request", "db_rows_per_s"):
            if not getattr(self, name) > 0:
                raise ModelError(f"rate {name} must be positive, got {getattr(self, name)}")
        for name in (
            "handler_cpu_s_per_request",
            "predict_overhead_s",
            "read_s",
            "write_s",
            "cold_start_s",
            "invocation_overhead_s",
            "request_bytes_per_tile",
        ):
            if getattr(self, name) < 0:
                raise ModelError(f"rate {name} must be 0 or more, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class Fleet:
    """The deployment: GPUs, TorchServe workers, the worker Lambda and its event source."""

    instance_type: str
    instances: int
    gpus_per_instance: int
    per_gpu_concurrency: int
    workers_per_gpu: int = 2
    #: SQS messages an invocation takes (the event source's BatchSize).
    batch_size: int = 4
    tiles_per_message: int = 100
    lambda_memory_mb: int = 2048
    lambda_timeout_s: float = 120.0
    reserved_concurrency: int | None = None
    read_ahead: bool = True
    #: CPU cores of the serving host when ``Rates.shared_device`` is False (local bench).
    host_cores: int | None = None
    #: Lambdas at once when set (a local run's pollers); else the fleet controller's rule.
    lambdas: int | None = None
    #: Requests one Lambda keeps in flight (TorchServePredictor's concurrency): a pack's
    #: requests spread over up to this many servers.
    requests_in_flight: int = 4

    def __post_init__(self) -> None:
        for name in (
            "instances",
            "gpus_per_instance",
            "per_gpu_concurrency",
            "workers_per_gpu",
            "batch_size",
            "tiles_per_message",
            "lambda_memory_mb",
        ):
            if getattr(self, name) < 1:
                raise ModelError(f"fleet {name} must be 1 or more, got {getattr(self, name)}")

    @property
    def gpus(self) -> int:
        return self.instances * self.gpus_per_instance

    @property
    def concurrency(self) -> int:
        """Lambdas at once: the fleet controller's MaximumConcurrency for the whole fleet."""
        if self.lambdas is not None:
            return self.lambdas
        desired = desired_mapping(self.gpus, self.per_gpu_concurrency, self.reserved_concurrency)
        assert desired.maximum_concurrency is not None  # gpus >= 1
        return desired.maximum_concurrency


@dataclass(frozen=True, slots=True)
class Station:
    name: str
    servers: int
    #: Seconds of service per pack at one server.
    demand_s: float
    utilization: float = 0.0
    wait_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Solution:
    """The steady state: throughput, where the time goes, and the bottleneck."""

    tiles_per_s: float
    concurrency: int
    #: Seconds one Lambda spends per pack, round the whole cycle.
    cycle_s: float
    delay_s: float
    read_s_per_pack: float
    stations: tuple[Station, ...]
    bottleneck: str
    #: tiles/s each stage could give alone (its bound): what the bottleneck is judged on.
    bounds: dict[str, float]
    gpu_tiles_per_s: float
    invocation_s: float
    timeout_risk: bool
    recommended_per_gpu: int
    max_per_gpu_without_timeout: int
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def effective_gpu_rate(rates: Rates, fleet: Fleet) -> tuple[int, float]:
    """(servers, tiles/s of one server) of the serving station."""
    if not rates.shared_device:
        cores = fleet.host_cores or fleet.workers_per_gpu
        return min(fleet.workers_per_gpu, cores) * fleet.gpus, rates.gpu_tiles_per_s
    gpu_s = rates.tiles_per_request / rates.gpu_tiles_per_s
    busy = feed.gpu_busy(fleet.workers_per_gpu, rates.handler_cpu_s_per_request, gpu_s)
    return fleet.gpus, rates.gpu_tiles_per_s * busy


def predict_s_per_tile(rates: Rates, fleet: Fleet) -> float:
    """A Lambda's wait per tile with no queue in TorchServe: the server's time plus the
    client's and the handler's overhead."""
    _, rate = effective_gpu_rate(rates, fleet)
    return 1.0 / rate + rates.predict_overhead_s


def lambdas_per_gpu(
    gpu_tiles_per_s: float,
    read_s: float,
    predict_s: float,
    write_s: float,
    *,
    read_ahead: bool = True,
    headroom: float = feed.HEADROOM,
) -> float:
    """Lambdas one GPU needs (Little's law, :func:`chipscale.ops.feed.lambdas_per_gpu`):
    what ``chipscale tune`` computes from a run's metrics and ``chipscale plan`` from a
    profile, so the two never disagree."""
    return feed.lambdas_per_gpu(
        gpu_tiles_per_s, read_s, predict_s, write_s, read_ahead=read_ahead, headroom=headroom
    )


def per_gpu(lambdas: float) -> int:
    """:func:`lambdas_per_gpu` rounded up: the per-GPU concurrency (at least 1)."""
    return max(1, math.ceil(lambdas - 1e-9))


def recommended_per_gpu(rates: Rates, fleet: Fleet, *, headroom: float = feed.HEADROOM) -> int:
    """The per-GPU concurrency that keeps a GPU busy at the model's rates."""
    servers, rate = effective_gpu_rate(rates, fleet)
    per_gpu_rate = rate * servers / fleet.gpus
    lambdas = lambdas_per_gpu(
        per_gpu_rate,
        rates.read_s,
        predict_s_per_tile(rates, fleet),
        rates.write_s,
        read_ahead=fleet.read_ahead,
        headroom=headroom,
    )
    return per_gpu(lambdas)


def mva(customers: int, delay_s: float, stations: list[Station]) -> tuple[float, list[float]]:
    """Exact MVA of a closed network: throughput (cycles/s) and each station's residence
    time per cycle, for ``customers`` customers with a delay of ``delay_s`` and single-server
    queues of the stations' demands (multi-server ones first turned into a queue of demand
    D/m and a delay of D(m-1)/m by the caller)."""
    queue = [0.0] * len(stations)
    x = 0.0
    residence = [s.demand_s for s in stations]
    for n in range(1, customers + 1):
        residence = [s.demand_s * (1 + q) for s, q in zip(stations, queue, strict=True)]
        x = n / (delay_s + sum(residence))
        queue = [x * r for r in residence]
    return x, residence


def solve(rates: Rates, fleet: Fleet) -> Solution:
    """The steady state of ``fleet`` at ``rates`` (see the module's docstring)."""
    t = fleet.tiles_per_message
    servers, rate = effective_gpu_rate(rates, fleet)
    gpu_time = t / rate
    # One Lambda's requests run on up to k servers at once: alone, a pack takes D / k.
    spread = max(1, min(servers, fleet.requests_in_flight))
    read = t * rates.read_s
    predict_free = gpu_time / spread + t * rates.predict_overhead_s
    db_demand = t / rates.db_rows_per_s
    write_trip = max(0.0, t * rates.write_s - db_demand)
    per_invocation = rates.invocation_overhead_s / fleet.batch_size
    if fleet.read_ahead:
        # Read-ahead within an invocation: its first read and its last predict stand alone.
        b = fleet.batch_size
        overlapped = (read + predict_free + (b - 1) * max(read, predict_free)) / b
        delay = overlapped - gpu_time / spread
    else:
        delay = read + predict_free - gpu_time / spread
    delay += write_trip + per_invocation
    # Seidmann: m servers of demand D = one queue of D/m and a delay of D(m-1)/m; with a
    # Lambda's requests spread over k of them, the delay is D/k - D/m (a lone Lambda: D/k).
    gpu = Station("model", servers, gpu_time)
    db = Station("database", 1, db_demand)
    queues = [Station("model", 1, gpu_time / servers), Station("database", 1, db_demand)]
    delay_total = delay + gpu_time / spread - gpu_time / servers
    n = fleet.concurrency
    x, residence = mva(n, delay_total, queues)
    tiles_per_s = x * t
    one = gpu_time / servers
    stations = (
        Station(gpu.name, servers, gpu_time, x * one, residence[0] - one),
        Station(db.name, 1, db_demand, x * db_demand, residence[1] - db_demand),
    )
    bounds = {
        "lambdas": n * t / (delay + gpu_time / spread + db_demand),
        "model": servers * rate,
        "database": rates.db_rows_per_s,
    }
    cycle = n / x
    bottleneck = _bottleneck(bounds, read, predict_free)
    invocation = fleet.batch_size * cycle + rates.invocation_overhead_s
    notes: list[str] = []
    timeout_risk = invocation > fleet.lambda_timeout_s - TIMEOUT_MARGIN_S
    if timeout_risk:
        notes.append(
            f"an invocation of {fleet.batch_size} packs takes about {invocation:,.0f} s, near or "
            f"over the {fleet.lambda_timeout_s:g} s Lambda timeout: lower the per-GPU "
            "concurrency or the batch size"
        )
    return Solution(
        tiles_per_s=tiles_per_s,
        concurrency=n,
        cycle_s=cycle,
        delay_s=delay_total,
        read_s_per_pack=read,
        stations=stations,
        bottleneck=bottleneck,
        bounds=bounds,
        gpu_tiles_per_s=servers * rate,
        invocation_s=invocation,
        timeout_risk=timeout_risk,
        recommended_per_gpu=recommended_per_gpu(rates, fleet),
        max_per_gpu_without_timeout=max_per_gpu_without_timeout(rates, fleet),
        notes=tuple(notes),
    )


def max_per_gpu_without_timeout(rates: Rates, fleet: Fleet) -> int:
    """The most Lambdas per GPU before a saturated GPU's queue makes an invocation outlast
    the timeout: each waits its turn behind the others, so an invocation of b packs of t
    tiles takes about b x N x t / X (X the GPU's tiles/s, N Lambdas a GPU)."""
    servers, rate = effective_gpu_rate(rates, fleet)
    per_gpu_rate = rate * servers / fleet.gpus
    budget = fleet.lambda_timeout_s - TIMEOUT_MARGIN_S - rates.invocation_overhead_s
    packs = fleet.batch_size * fleet.tiles_per_message
    return max(1, math.floor(budget * per_gpu_rate / packs))


def _bottleneck(bounds: dict[str, float], read: float, predict_free: float) -> str:
    """The stage of the lowest bound; for the Lambdas' own time, their reads when a read
    takes longer than the predict, else the concurrency itself."""
    lowest = min(bounds, key=lambda k: bounds[k])
    if lowest != "lambdas":
        return lowest
    if read > predict_free:
        return "reads"
    return "lambda concurrency"
