"""TorchServe's Prometheus metrics: the monitor's second source of GPU and inference figures.

Parses the text format TorchServe writes (``name{labels} value`` lines, comments, an optional
timestamp), sums what the monitor needs (:class:`TorchServeMetrics`), and reads the metrics
port directly, through a tunnel, or by the stack's operations Lambda (:func:`scrape_action`
runs inside the VPC, :func:`scrape_via_lambda` asks for it). Rationale: docs/design.md.
"""

from __future__ import annotations

import ipaddress
import math
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from chipscale.errors import ChipscaleError, one_line
from chipscale.names import METRICS_PORT
from chipscale.ops.operations_client import OperationError, invoke

#: TorchServe's Prometheus metric names (TorchServe 0.12, ``metrics_mode=prometheus``).
TS_GPU_UTILIZATION = "GPUUtilization"
TS_GPU_MEMORY_UTILIZATION = "GPUMemoryUtilization"
TS_GPU_MEMORY_USED = "GPUMemoryUsed"
TS_REQUESTS = "ts_inference_requests_total"
TS_INFERENCE_LATENCY = "ts_inference_latency_microseconds"
TS_QUEUE_LATENCY = "ts_queue_latency_microseconds"
TS_RESPONSES = {"2xx": "Requests2XX", "4xx": "Requests4XX", "5xx": "Requests5XX"}
#: The label TorchServe puts the GPU's index in.
TS_GPU_LABEL = "DeviceId"

#: The operations Lambda's action that reads the hosts' metrics port (:func:`scrape_action`).
SCRAPE_ACTION = "scrape-metrics"
#: Seconds to wait for one host's metrics: a live TorchServe answers in milliseconds, and a
#: monitor refreshing every few seconds must not hang on a host that is gone.
SCRAPE_TIMEOUT_S = 3.0

_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>.*)\})?"
    r"\s+(?P<value>\S+)(?:\s+(?P<timestamp>-?\d+))?\s*$"
)
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


class PrometheusError(ChipscaleError):
    """A metrics endpoint could not be read or did not answer Prometheus text."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One line of the Prometheus text format."""

    name: str
    labels: Mapping[str, str]
    value: float


def parse(text: str) -> list[Sample]:
    """The samples of a Prometheus text exposition; comments and blank lines skipped.

    >>> parse('GPUUtilization{DeviceId="0",Hostname="h",} 87.0')
    [Sample(name='GPUUtilization', labels={'DeviceId': '0', 'Hostname': 'h'}, value=87.0)]

    A line that is not a sample raises PrometheusError naming its number: an answer that is
    not Prometheus text (a proxy's HTML page) must not pass for "no metrics".
    """
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise PrometheusError(f"line {number} is not a Prometheus sample: {line[:80]!r}")
        try:
            value = float(match["value"])  # also "NaN", "+Inf", "-Inf"
        except ValueError:
            raise PrometheusError(f"line {number} has no numeric value: {line[:80]!r}") from None
        samples.append(Sample(match["name"], _labels(match["labels"] or ""), value))
    return samples


def _labels(text: str) -> dict[str, str]:
    labels = {}
    position = 0
    while position < len(text):
        match = _LABEL.match(text, position)
        if match is None:
            if text[position:].strip(" ,"):
                raise PrometheusError(f"malformed labels: {text[:80]!r}")
            break
        value = re.sub(r"\\[\\\"n]", lambda m: _ESCAPES[m.group(0)], match.group(2))
        labels[match.group(1)] = value
        position = match.end()
    return labels


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One GPU as TorchServe sees it at the moment of the scrape."""

    utilization: float | None = None
    memory_utilization: float | None = None
    memory_used_mb: float | None = None


@dataclass(frozen=True, slots=True)
class TorchServeMetrics:
    """What one TorchServe's metrics endpoint said (or why it said nothing: ``error``).

    Counters are totals since TorchServe started; :meth:`since` turns two scrapes into the
    rates of the interval between them.
    """

    target: str
    instance_id: str | None = None
    error: str | None = None
    gpus: Mapping[int, GpuReading] = field(default_factory=dict)
    requests: float | None = None
    inference_latency_us: float | None = None
    queue_latency_us: float | None = None
    responses: Mapping[str, float] = field(default_factory=dict)

    @property
    def mean_inference_ms(self) -> float | None:
        """Mean time a request spent in the handler (model included), since the start."""
        return _per_request_ms(self.inference_latency_us, self.requests)

    @property
    def mean_queue_ms(self) -> float | None:
        """Mean time a request waited in TorchServe's queue for a worker, since the start."""
        return _per_request_ms(self.queue_latency_us, self.requests)

    def since(self, earlier: TorchServeMetrics) -> TorchServeMetrics:
        """The counters of the interval since ``earlier`` (the same server): what ``--watch``
        shows, so a long-running server's history does not hide what happens now. A counter
        that went down (TorchServe restarted) gives this scrape's totals."""
        if self.error or earlier.error or earlier.target != self.target:
            return self

        def delta(now: float | None, before: float | None) -> float | None:
            if now is None or before is None or now < before:
                return now
            return now - before

        return TorchServeMetrics(
            target=self.target,
            instance_id=self.instance_id,
            gpus=self.gpus,
            requests=delta(self.requests, earlier.requests),
            inference_latency_us=delta(self.inference_latency_us, earlier.inference_latency_us),
            queue_latency_us=delta(self.queue_latency_us, earlier.queue_latency_us),
            responses={
                k: delta(v, earlier.responses.get(k)) or 0.0 for k, v in self.responses.items()
            },
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the derived means (GPU indexes become string keys)."""
        data = asdict(self)
        data["gpus"] = {str(k): asdict(v) for k, v in self.gpus.items()}
        data["responses"] = dict(self.responses)
        data["mean_inference_ms"] = self.mean_inference_ms
        data["mean_queue_ms"] = self.mean_queue_ms
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TorchServeMetrics:
        """The inverse of :meth:`to_dict` (answers of the operations Lambda)."""
        return cls(
            target=str(data["target"]),
            instance_id=data.get("instance_id"),
            error=data.get("error"),
            gpus={int(k): GpuReading(**v) for k, v in (data.get("gpus") or {}).items()},
            requests=data.get("requests"),
            inference_latency_us=data.get("inference_latency_us"),
            queue_latency_us=data.get("queue_latency_us"),
            responses=dict(data.get("responses") or {}),
        )


def _per_request_ms(total_us: float | None, requests: float | None) -> float | None:
    if total_us is None or not requests:
        return None
    return total_us / requests / 1000.0


def summarize(
    samples: Iterable[Sample], target: str, instance_id: str | None = None
) -> TorchServeMetrics:
    """The figures the monitor uses, from the samples of one TorchServe.

    Counters are summed over models and versions (a host serves one model; a rollout may
    briefly show two). GPU gauges are keyed by ``DeviceId``; TorchServe without ``nvgpu``
    writes only their ``# HELP`` lines, so ``gpus`` is then empty.
    """
    gpus: dict[int, dict[str, float]] = {}
    totals: dict[str, float] = {}
    gauge_fields = {
        TS_GPU_UTILIZATION: "utilization",
        TS_GPU_MEMORY_UTILIZATION: "memory_utilization",
        TS_GPU_MEMORY_USED: "memory_used_mb",
    }
    counters = {TS_REQUESTS, TS_INFERENCE_LATENCY, TS_QUEUE_LATENCY, *TS_RESPONSES.values()}
    for sample in samples:
        if math.isnan(sample.value):
            continue
        if sample.name in gauge_fields:
            device = sample.labels.get(TS_GPU_LABEL)
            if device is None or not device.isdigit():
                continue
            gpus.setdefault(int(device), {})[gauge_fields[sample.name]] = sample.value
        elif sample.name in counters:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return TorchServeMetrics(
        target=target,
        instance_id=instance_id,
        gpus={index: GpuReading(**values) for index, values in sorted(gpus.items())},
        requests=totals.get(TS_REQUESTS),
        inference_latency_us=totals.get(TS_INFERENCE_LATENCY),
        queue_latency_us=totals.get(TS_QUEUE_LATENCY),
        responses={k: totals[v] for k, v in TS_RESPONSES.items() if v in totals},
    )


def metrics_url(host: str, port: int = METRICS_PORT) -> str:
    """``http://HOST:PORT/metrics`` (IPv6 addresses bracketed)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"


def fetch(url: str, timeout: float = SCRAPE_TIMEOUT_S) -> str:
    """The text of a metrics endpoint (``/metrics`` is appended to a bare ``http://host:port``)."""
    if not url.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.read().decode("utf-8", errors="replace")
    except (OSError, urllib.error.URLError, ValueError) as exc:
        raise PrometheusError(f"{url}: {one_line(exc)}") from exc


def scrape(
    url: str, instance_id: str | None = None, timeout: float = SCRAPE_TIMEOUT_S
) -> TorchServeMetrics:
    """One TorchServe's metrics; a failure is recorded in ``error``, never raised, so one
    unreachable host costs the monitor a row, not the whole view."""
    try:
        return summarize(parse(fetch(url, timeout)), url, instance_id)
    except PrometheusError as exc:
        return TorchServeMetrics(target=url, instance_id=instance_id, error=str(exc))


# ----------------------------------------------------------------------------- in the VPC


def scrape_action(event: Mapping[str, Any], env: Any = None) -> dict[str, Any]:
    """The operations Lambda's ``scrape-metrics`` action: read TorchServe's metrics port of
    ``event["hosts"]`` (``{"instance id": "private IP"}``) from inside the VPC, where the hosts'
    security group admits this Lambda on :data:`METRICS_PORT`.

    Only private IP addresses are read, on the metrics port only: the action must not become
    a way to make the Lambda fetch arbitrary URLs. Answers ``{"metrics": [TorchServeMetrics
    as dicts]}`` (parsed here: a few hundred bytes a host rather than the whole text).
    """
    hosts = event.get("hosts")
    if not isinstance(hosts, Mapping):
        raise ValueError('scrape-metrics needs "hosts": {"instance id": "private IP", ...}')
    answers = []
    for instance_id, host in hosts.items():
        try:
            address = ipaddress.ip_address(str(host))
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address") from None
        if not address.is_private:
            raise ValueError(f"{host} is not a private address: only the VPC's hosts are read")
        answers.append(scrape(metrics_url(str(address)), str(instance_id)).to_dict())
    return {"metrics": answers}


def scrape_via_lambda(
    lambda_client: Any, function_name: str, hosts: Mapping[str, str]
) -> list[TorchServeMetrics]:
    """The hosts' metrics read by the stack's operations Lambda (:func:`scrape_action`).

    A failed invocation (an operations Lambda deployed before the action existed answers
    "unknown action") is one row with the reason, not an exception: the monitor goes on with
    CloudWatch's figures.
    """
    if not hosts:
        return []
    try:
        answer = invoke(lambda_client, function_name, SCRAPE_ACTION, hosts=dict(hosts))
        return [TorchServeMetrics.from_dict(m) for m in answer["metrics"]]
    except (OperationError, KeyError, TypeError, ValueError) as exc:
        return [TorchServeMetrics(target=f"operations Lambda {function_name}", error=one_line(exc))]
