"""The monitor's snapshot of a deployed stack over one window: its GPUs, queue, worker
Lambda and minutes (:class:`Snapshot`), as plain frozen values.

Pure types with no AWS import: :mod:`chipscale.ops.diagnosis` and :mod:`chipscale.ops.tune`
read them; :mod:`chipscale.ops.monitor` fills them in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from chipscale.ops.aws import Fleet
from chipscale.ops.prometheus import TorchServeMetrics

#: The window a snapshot covers unless told otherwise, and its period.
DEFAULT_WINDOW = timedelta(minutes=15)


PERIOD_S = 60


@dataclass(frozen=True, slots=True)
class Window:
    """``[start, end)``, whole minutes, read in periods of ``period_s``."""

    start: datetime
    end: datetime
    period_s: int = PERIOD_S

    @classmethod
    def ending(cls, now: datetime, length: timedelta, period_s: int = PERIOD_S) -> Window:
        """The window of ``length`` ending at the last whole minute before ``now``: the minute
        in progress has only part of its data yet."""
        end = now.astimezone(UTC).replace(second=0, microsecond=0)
        return cls(end - length, end, period_s)

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()

    @property
    def periods(self) -> int:
        return int(self.seconds // self.period_s)

    def period_starts(self) -> list[datetime]:
        return [self.start + timedelta(seconds=k * self.period_s) for k in range(self.periods)]


@dataclass(frozen=True, slots=True)
class Gpu:
    """One GPU over the window. Utilisation and memory are percentages; ``source`` says where
    they came from: ``cloudwatch`` (window means), ``torchserve`` (the moment of the scrape),
    or None (no figure at all)."""

    instance_id: str
    index: int
    instance_type: str | None
    in_service: bool
    state: str | None
    utilization: float | None = None
    utilization_last: float | None = None
    memory_utilization: float | None = None
    memory_used_mb: float | None = None
    memory_total_mb: float | None = None
    source: str | None = None

    @property
    def key(self) -> str:
        return f"{self.instance_id}/{self.index}"


@dataclass(frozen=True, slots=True)
class Queue:
    """The queue and its dead-letter queue; tiles from the worker's metrics."""

    visible: int | None = None
    in_flight: int | None = None
    oldest_age_s: float | None = None
    dlq_depth: int | None = None
    #: Dead letters added over the window (last minus first CloudWatch value; None: no data).
    dlq_growth: float | None = None
    received: float | None = None
    deleted: float | None = None
    tiles: float = 0.0
    packs: float = 0.0
    tiles_per_s: float | None = None
    tiles_per_message: float | None = None
    remaining_tiles: float | None = None
    #: ``job`` (the job's remaining count was given) or ``queue`` (messages x tiles/message).
    remaining_source: str | None = None
    eta_s: float | None = None

    @property
    def backlog(self) -> int | None:
        """Messages not yet done: visible plus in flight."""
        if self.visible is None and self.in_flight is None:
            return None
        return (self.visible or 0) + (self.in_flight or 0)


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """The worker Lambda, its event source mapping and its figures over the window."""

    function_name: str | None = None
    timeout_s: float | None = None
    reserved_concurrency: int | None = None
    mapping_state: str | None = None
    maximum_concurrency: int | None = None
    batch_size: int | None = None
    per_gpu_concurrency: int | None = None
    concurrency_max: float | None = None
    concurrency_mean: float | None = None
    invocations: float = 0.0
    errors: float = 0.0
    throttles: float = 0.0
    duration_mean_ms: float | None = None
    duration_p50_ms: float | None = None
    duration_p95_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Minute:
    """One period of the window: what :mod:`chipscale.ops.tune` and the plot work from."""

    start: datetime
    #: GPU key (``instance/index``) -> utilisation % in this period.
    gpu_utilization: Mapping[str, float] = field(default_factory=dict)
    tiles: float = 0.0
    packs: float = 0.0
    read_s: float = 0.0
    predict_s: float = 0.0
    write_s: float = 0.0
    invocations: float = 0.0

    @property
    def gpus_reporting(self) -> int:
        return len(self.gpu_utilization)

    @property
    def mean_gpu_utilization(self) -> float | None:
        values = list(self.gpu_utilization.values())
        return sum(values) / len(values) if values else None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the monitor knows about a stack over one window."""

    stack: str
    region: str
    window: Window
    fleet: Fleet
    gpus: tuple[Gpu, ...]
    queue: Queue
    worker: WorkerStatus
    minutes: tuple[Minute, ...] = ()
    torchserve: tuple[TorchServeMetrics, ...] = ()
    #: What could not be read, one line each (the rest of the snapshot still holds).
    warnings: tuple[str, ...] = ()

    @property
    def gpu_utilization(self) -> float | None:
        """Mean utilisation of the GPUs in service that reported one (None: none did)."""
        values = [g.utilization for g in self.gpus if g.in_service and g.utilization is not None]
        return sum(values) / len(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes in ISO 8601, derived figures included."""
        data = _jsonable(self)
        data["gpu_utilization"] = self.gpu_utilization
        data["fleet"].update(
            instances_in_service=self.fleet.instances_in_service,
            gpus_in_service=self.fleet.gpus_in_service,
            pending=self.fleet.pending,
        )
        for key in ("instance_type", "vcpus_per_instance", "gpus_per_instance"):
            if data["fleet"][key] is None:  # the launch type: verify's, never read here
                del data["fleet"][key]
        data["queue"]["backlog"] = self.queue.backlog
        data["torchserve"] = [m.to_dict() for m in self.torchserve]
        return data


def _jsonable(value: Any) -> Any:
    if isinstance(value, TorchServeMetrics):
        return value.to_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
