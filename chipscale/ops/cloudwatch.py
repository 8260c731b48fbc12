"""The monitor's CloudWatch reads: the GetMetricData queries of a snapshot or a plot (GPU
agent, the worker's EMF metrics, AWS/Lambda, AWS/SQS), their answers as time series, and
those series cut into the window's periods.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from chipscale import names
from chipscale.ops.aws import Instance, aws_reason, queue_name
from chipscale.ops.snapshot import Minute, Window

if TYPE_CHECKING:
    from chipscale.ops.stack_outputs import StackOutputs


#: GetMetricData's limit of queries per call.
MAX_QUERIES_PER_CALL = 500


def metric_query(
    query_id: str,
    namespace: str,
    metric: str,
    dimensions: Mapping[str, str],
    stat: str,
    period_s: int,
) -> dict[str, Any]:
    """One GetMetricData ``MetricStat`` query."""
    return {
        "Id": query_id,
        "MetricStat": {
            "Metric": {
                "Namespace": namespace,
                "MetricName": metric,
                "Dimensions": [{"Name": k, "Value": v} for k, v in dimensions.items()],
            },
            "Period": period_s,
            "Stat": stat,
        },
        "ReturnData": True,
    }


#: The worker's EMF metrics a snapshot reads: query key -> (metric, statistic).
WORKER_METRICS: Mapping[str, tuple[str, str]] = {
    "ok": (names.METRIC_TILES_OK, "Sum"),
    "empty": (names.METRIC_TILES_EMPTY, "Sum"),
    "error": (names.METRIC_TILES_ERROR, "Sum"),
    # The worker adds one TilesOk value a pack (0 included), so its sample count is packs.
    "packs": (names.METRIC_TILES_OK, "SampleCount"),
    "read": (names.METRIC_READ_SECONDS, "Sum"),
    "predict": (names.METRIC_PREDICT_SECONDS, "Sum"),
    "write": (names.METRIC_WRITE_SECONDS, "Sum"),
}


#: The worker's metrics with the function's dimension (per stack) and without (per account).
WORKER_SCOPES = ("fn", "svc")


GPU_METRICS: Mapping[str, str] = {
    "u": names.GPU_METRIC_UTILIZATION,
    "m": names.GPU_METRIC_MEMORY_UTILIZATION,
    "mu": names.GPU_METRIC_MEMORY_USED,
    "mt": names.GPU_METRIC_MEMORY_TOTAL,
}


def worker_dimensions(scope: str, function: str | None) -> dict[str, str]:
    dims = {"service": names.WORKER_SERVICE}
    if scope == "fn":
        dims[names.WORKER_FUNCTION_DIMENSION] = function or ""
    return dims


def build_queries(
    outputs: StackOutputs,
    gpu_slots: Sequence[tuple[Instance, int]],
    period_s: int,
    *,
    gpu_kinds: Iterable[str] = tuple(GPU_METRICS),
    worker_keys: Iterable[str] = tuple(WORKER_METRICS),
    aws: bool = True,
) -> list[dict[str, Any]]:
    """Every per-period query of a snapshot (or, narrowed, of a plot). Ids encode what they
    read: ``gpu{n}_{kind}`` (n: position in ``gpu_slots``), ``w_{scope}_{key}``, ``lam_*``,
    ``q_*``, ``dlq_*``."""
    queries = []
    for n, (instance, index) in enumerate(gpu_slots):
        dims = {
            names.GPU_DIMENSION_INSTANCE: instance.instance_id,
            names.GPU_DIMENSION_INDEX: str(index),
        }
        for kind in gpu_kinds:
            stat = "Average" if kind in ("u", "m") else "Maximum"
            queries.append(
                metric_query(
                    f"gpu{n}_{kind}",
                    names.GPU_METRICS_NAMESPACE,
                    GPU_METRICS[kind],
                    dims,
                    stat,
                    period_s,
                )
            )
    for scope in WORKER_SCOPES:
        dims = worker_dimensions(scope, outputs.worker_function)
        if scope == "fn" and not outputs.worker_function:
            continue
        for key in worker_keys:
            metric, stat = WORKER_METRICS[key]
            queries.append(
                metric_query(
                    f"w_{scope}_{key}", names.METRICS_NAMESPACE, metric, dims, stat, period_s
                )
            )
    if not aws:
        return queries
    if outputs.worker_function:
        dims = {"FunctionName": outputs.worker_function}
        for query_id, metric, stat in (
            ("lam_conc", "ConcurrentExecutions", "Maximum"),
            ("lam_inv", "Invocations", "Sum"),
            ("lam_err", "Errors", "Sum"),
            ("lam_thr", "Throttles", "Sum"),
            ("lam_dur", "Duration", "Average"),
        ):
            queries.append(metric_query(query_id, "AWS/Lambda", metric, dims, stat, period_s))
    queue = {"QueueName": queue_name(outputs.queue_url)}
    dlq = {"QueueName": queue_name(outputs.dlq_url)}
    for query_id, metric, dims, stat in (
        ("q_age", "ApproximateAgeOfOldestMessage", queue, "Maximum"),
        ("q_rcv", "NumberOfMessagesReceived", queue, "Sum"),
        ("q_del", "NumberOfMessagesDeleted", queue, "Sum"),
        ("dlq_vis", "ApproximateNumberOfMessagesVisible", dlq, "Maximum"),
    ):
        queries.append(metric_query(query_id, "AWS/SQS", metric, dims, stat, period_s))
    return queries


Series = list[tuple[datetime, float]]


def get_metric_data(
    cloudwatch: Any, queries: Sequence[Mapping[str, Any]], window: Window
) -> dict[str, Series]:
    """Query id -> [(period start, value)] ascending, over ``window``: one call per 500
    queries, following NextToken."""
    series: dict[str, Series] = {}
    for first in range(0, len(queries), MAX_QUERIES_PER_CALL):
        chunk = list(queries[first : first + MAX_QUERIES_PER_CALL])
        token: str | None = None
        while True:
            request: dict[str, Any] = {
                "MetricDataQueries": chunk,
                "StartTime": window.start,
                "EndTime": window.end,
                "ScanBy": "TimestampAscending",
            }
            if token:
                request["NextToken"] = token
            answer = cloudwatch.get_metric_data(**request)
            for result in answer.get("MetricDataResults", []):
                points = series.setdefault(str(result["Id"]), [])
                for stamp, value in zip(result["Timestamps"], result["Values"], strict=False):
                    if value is not None and math.isfinite(value):
                        points.append((_utc(stamp), float(value)))
            token = answer.get("NextToken")
            if not token:
                break
    for points in series.values():
        points.sort(key=lambda p: p[0])
    return series


def _utc(stamp: datetime) -> datetime:
    return stamp.astimezone(UTC) if stamp.tzinfo else stamp.replace(tzinfo=UTC)


#: The duration percentiles asked over the whole window (a percentile of per-minute
#: percentiles would be no percentile at all).
PERCENTILES = ("p50", "p95")


def percentile_queries(function: str, window: Window) -> list[dict[str, Any]]:
    """p50 and p95 of the worker's duration over the whole window, one period."""
    return [
        metric_query(
            f"lam_{stat}",
            "AWS/Lambda",
            "Duration",
            {"FunctionName": function},
            stat,
            int(window.seconds),
        )
        for stat in PERCENTILES
    ]


def read_percentiles(
    cloudwatch: Any, outputs: StackOutputs, window: Window, warnings: list[str]
) -> dict[str, float]:
    """The worker's duration p50 and p95 (ms) over the window, from a call of their own."""
    from botocore.exceptions import BotoCoreError, ClientError

    if not outputs.worker_function:
        return {}
    try:
        series = get_metric_data(
            cloudwatch, percentile_queries(outputs.worker_function, window), window
        )
    except (ClientError, BotoCoreError) as exc:
        warnings.append(f"Lambda duration percentiles unavailable ({aws_reason(exc)})")
        return {}
    # One period covers the window; should CloudWatch split it, the first (aligned on the
    # window's start) is the one asked for.
    return {stat: points[0][1] for stat in PERCENTILES if (points := series.get(f"lam_{stat}"))}


def series_total(points: Series | None) -> float:
    return sum(v for _, v in points or [])


def by_period(points: Series | None, window: Window) -> dict[int, float]:
    out: dict[int, float] = {}
    for stamp, value in points or []:
        k = int((stamp - window.start).total_seconds() // window.period_s)
        if 0 <= k < window.periods:
            out[k] = out.get(k, 0.0) + value
    return out


def worker_series(
    series: Mapping[str, Series], outputs: StackOutputs, warnings: list[str] | None
) -> dict[str, Series]:
    """The worker's metrics of this stack (the function's dimension) when it has any; else
    the account-wide ones (``service`` alone), with a warning that they may add up stacks."""
    scoped = {k: series.get(f"w_fn_{k}", []) for k in WORKER_METRICS}
    if any(scoped.values()):
        return scoped
    shared = {k: series.get(f"w_svc_{k}", []) for k in WORKER_METRICS}
    if any(shared.values()) and warnings is not None:
        warnings.append(
            f"the worker's metrics carry no {names.WORKER_FUNCTION_DIMENSION} dimension: "
            "tiles/s is the account's and region's, every chipscale stack's together"
        )
    return shared


def minutes_of(
    window: Window,
    gpu_slots: Sequence[tuple[Instance, int]],
    series: Mapping[str, Series],
    work: Mapping[str, Series],
) -> tuple[Minute, ...]:
    """The window period by period: each GPU's utilisation, the tiles and stage seconds."""
    gpu = {
        f"{i.instance_id}/{index}": by_period(series.get(f"gpu{n}_u"), window)
        for n, (i, index) in enumerate(gpu_slots)
    }
    tiles = [by_period(work.get(k), window) for k in ("ok", "empty", "error")]
    other = {k: by_period(work.get(k), window) for k in ("packs", "read", "predict", "write")}
    invocations = by_period(series.get("lam_inv"), window)
    minutes = []
    for k, start in enumerate(window.period_starts()):
        minutes.append(
            Minute(
                start=start,
                gpu_utilization={key: by[k] for key, by in gpu.items() if k in by},
                tiles=sum(t.get(k, 0.0) for t in tiles),
                packs=other["packs"].get(k, 0.0),
                read_s=other["read"].get(k, 0.0),
                predict_s=other["predict"].get(k, 0.0),
                write_s=other["write"].get(k, 0.0),
                invocations=invocations.get(k, 0.0),
            )
        )
    return tuple(minutes)
