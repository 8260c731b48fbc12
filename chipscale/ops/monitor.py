"""What a deployed stack is doing, in one :class:`Snapshot`: GPUs, queue, worker Lambdas.

chip-n-scale's operator SSHed into every GPU box to read ``nvidia-smi`` and guessed which
situation the run was in. Here every figure the diagnosis (:mod:`chipscale.ops.diagnosis`) and
the tuning (:mod:`chipscale.ops.tune`) need is read from the AWS APIs, for a window (the last 15
minutes by default, in 1-minute periods):

=========================  ==================================================================
figure                     read from
=========================  ==================================================================
GPU utilisation, memory    CloudWatch agent on the hosts, namespace ``chipscale/gpu``, one
                           series per (``InstanceId``, ``index``): several a multi-GPU host;
                           TorchServe's Prometheus gauges as a fallback (:mod:`.prometheus`)
instances, types, states   Auto Scaling (lifecycle, health), EC2 (type, state, private IP,
                           GPUs per type), the target group's health (as the fleet controller)
queue, dead letters        SQS GetQueueAttributes (now); AWS/SQS in CloudWatch (oldest message
                           age, received and deleted messages, dead-letter depth over time)
tiles/s, tiles/message     the worker's EMF metrics (TilesOk + TilesEmpty + TilesError; one
                           TilesOk sample a pack), stage seconds (read, predict, write)
Lambda                     AWS/Lambda by FunctionName (concurrency, invocations, errors,
                           throttles, duration mean, p50, p95); the event source mapping, the
                           function's timeout and reserved concurrency; the per-GPU parameter
=========================  ==================================================================

CloudWatch is read with GetMetricData, every series of the window in one call (500 queries a
call; a fleet of more than about 120 GPUs takes more). The duration percentiles go in a second
call of their own: a backend that cannot compute percentiles (moto, which the tests run
against) then loses only those, with a warning, not the whole snapshot.

Nothing in this module's import pulls in boto3: :mod:`chipscale.ops.diagnosis` imports the
snapshot types and stays a module of pure functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from chipscale import names
from chipscale.errors import ChipscaleError, one_line
from chipscale.extras import missing_message
from chipscale.ops.prometheus import TorchServeMetrics

if TYPE_CHECKING:
    from chipscale.ops.stack_outputs import StackOutputs

#: The window a snapshot covers unless told otherwise, and its period.
DEFAULT_WINDOW = timedelta(minutes=15)
PERIOD_S = 60
#: GetMetricData's limit of queries per call.
MAX_QUERIES_PER_CALL = 500
#: Series of a plot: at most this many points each (the period grows with the hours asked).
MAX_PLOT_POINTS = 1440


class MonitorError(ChipscaleError):
    """The stack's state could not be read."""


# ----------------------------------------------------------------------------- the snapshot


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
class Instance:
    """One GPU instance of the group (or one that left it within the window)."""

    instance_id: str
    instance_type: str | None
    gpus: int
    #: Auto Scaling's LifecycleState (None: no longer in the group).
    lifecycle_state: str | None
    health: str | None
    #: EC2's state (running, shutting-down, terminated ...), None if EC2 did not say.
    ec2_state: str | None
    private_ip: str | None
    #: Routed to by the load balancer: as :func:`chipscale.ops.fleet.count_in_service` counts.
    in_service: bool


@dataclass(frozen=True, slots=True)
class Fleet:
    """The GPU Auto Scaling group."""

    asg_name: str | None
    min_size: int | None = None
    max_size: int | None = None
    desired: int | None = None
    instances: tuple[Instance, ...] = ()
    #: False when the group could not be read: no GPU count, rather than zero GPUs.
    known: bool = True

    @property
    def instances_in_service(self) -> int:
        return sum(1 for i in self.instances if i.in_service)

    @property
    def gpus_in_service(self) -> int:
        """GPUs of the instances in service: what the fleet controller multiplies by."""
        return sum(i.gpus for i in self.instances if i.in_service)

    @property
    def pending(self) -> int:
        """Instances booting (Pending, or held in Pending:Wait until TorchServe is READY)."""
        return sum(1 for i in self.instances if (i.lifecycle_state or "").startswith("Pending"))


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
class Worker:
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
    worker: Worker
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


# ----------------------------------------------------------------------------- clients


@dataclass(frozen=True)
class Clients:
    """The boto3 clients a snapshot reads with (tests hand in stubbed ones)."""

    cloudwatch: Any
    sqs: Any
    autoscaling: Any
    ec2: Any
    lambda_client: Any
    ssm: Any
    elbv2: Any

    @classmethod
    def from_session(cls, session: Any) -> Clients:
        """Clients with few retries and short timeouts: a monitor refreshing every few
        seconds should show a failing call as a warning, not wait out the SDK's backoff."""
        from botocore.config import Config

        config = Config(
            connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"}
        )
        services = {
            "cloudwatch": "cloudwatch",
            "sqs": "sqs",
            "autoscaling": "autoscaling",
            "ec2": "ec2",
            "lambda_client": "lambda",
            "ssm": "ssm",
            "elbv2": "elbv2",
        }
        return cls(**{k: session.client(s, config=config) for k, s in services.items()})


#: Reads TorchServe's metrics of the instances in service (see chipscale.cli's --scrape).
Scraper = Callable[[Sequence[Instance]], Sequence[TorchServeMetrics]]


# ----------------------------------------------------------------------------- collect


def collect(
    outputs: StackOutputs,
    clients: Clients,
    *,
    since: timedelta = DEFAULT_WINDOW,
    now: datetime | None = None,
    remaining_tiles: float | None = None,
    scraper: Scraper | None = None,
) -> Snapshot:
    """A snapshot of stack ``outputs`` over the ``since`` before ``now``.

    ``remaining_tiles``: the job's tiles not yet done, when known (``monitor --job``); else
    the ETA counts the queue's messages x tiles per message. ``scraper`` reads TorchServe's
    Prometheus endpoint of the instances in service; its GPU figures fill in for GPUs the
    CloudWatch agent says nothing about.
    """
    window = Window.ending(now or datetime.now(UTC), since)
    warnings: list[str] = []
    fleet = _guard(warnings, "the GPU fleet", lambda: read_fleet(clients, outputs), None)
    fleet = fleet or Fleet(outputs.asg_name, known=False)
    queue_now = read_queues(clients.sqs, outputs, warnings)
    worker = read_worker(clients, outputs, warnings)
    gpu_slots = [(i, index) for i in fleet.instances for index in range(i.gpus)]
    queries = build_queries(outputs, gpu_slots, window.period_s)
    series = _guard(
        warnings,
        "CloudWatch metrics",
        lambda: get_metric_data(clients.cloudwatch, queries, window),
        {},
    )
    percentiles = read_percentiles(clients.cloudwatch, outputs, window, warnings)
    snapshot = assemble(
        outputs,
        window,
        fleet,
        gpu_slots,
        series,
        queue_now,
        worker,
        percentiles,
        remaining_tiles=remaining_tiles,
        warnings=warnings,
    )
    if scraper is not None:
        scraped = tuple(scraper([i for i in fleet.instances if i.in_service]))
        snapshot = with_torchserve(snapshot, scraped)
    return snapshot


def _guard(warnings: list[str], what: str, read: Callable[[], Any], default: Any) -> Any:
    """``read()``, or ``default`` with a warning when AWS refuses: one missing permission or
    resource costs its figures, not the view. A missing stack or credentials fail earlier,
    in :func:`chipscale.ops.stack_outputs.resolve_stack`."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return read()
    except (ClientError, BotoCoreError, MonitorError) as exc:
        warnings.append(f"cannot read {what}: {aws_reason(exc)}")
        return default


def aws_reason(exc: BaseException) -> str:
    """AWS's error code and message, on one line and short."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        message = str(error.get("Message", ""))
        if "<html" in message.lower():  # a proxy's (or a mock's) error page, not AWS's words
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            message = f"HTTP {status} with an HTML page"
        text = f"{error.get('Code', 'error')}: {message}".rstrip(": ")
    else:
        text = one_line(exc)
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:199] + "…"


def read_fleet(clients: Clients, outputs: StackOutputs) -> Fleet:
    """The group, its instances (and those that left it but EC2 still lists, so the GPU
    series of the window are all found), their types' GPU counts, and which are in service.

    In service is the fleet controller's definition: InService and Healthy in Auto Scaling
    and, when the stack exposes the model's target group, a ``healthy`` target in it.
    """
    from chipscale.ops.fleet import FleetError, healthy_targets

    if not outputs.asg_name:
        raise MonitorError(f"stack has no {names.OUTPUT_ASG_NAME!r} output")
    groups = clients.autoscaling.describe_auto_scaling_groups(
        AutoScalingGroupNames=[outputs.asg_name]
    )["AutoScalingGroups"]
    if not groups:
        raise MonitorError(f"Auto Scaling group {outputs.asg_name} does not exist")
    group = groups[0]
    members = {str(i["InstanceId"]): i for i in group.get("Instances", [])}
    described: dict[str, Mapping[str, Any]] = {}
    paginator = clients.ec2.get_paginator("describe_instances")
    for page in paginator.paginate(
        Filters=[{"Name": "tag:aws:autoscaling:groupName", "Values": [outputs.asg_name]}]
    ):
        for reservation in page.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                described[str(instance["InstanceId"])] = instance
    types = {
        str(t)
        for t in [
            *(i.get("InstanceType") for i in members.values()),
            *(i.get("InstanceType") for i in described.values()),
        ]
        if t
    }
    gpus_of = gpu_counts(clients.ec2, types)
    routed: frozenset[str] | None = None
    target_group = outputs.raw.get(names.OUTPUT_TARGET_GROUP_ARN)
    if target_group:
        try:
            routed = healthy_targets(clients.elbv2, target_group)
        except FleetError as exc:
            raise MonitorError(str(exc)) from exc
    instances = []
    for instance_id in sorted(set(members) | set(described)):
        member = members.get(instance_id, {})
        ec2 = described.get(instance_id, {})
        kind = ec2.get("InstanceType") or member.get("InstanceType")
        in_service = (
            member.get("LifecycleState") == "InService"
            and member.get("HealthStatus") == "Healthy"
            and (routed is None or instance_id in routed)
        )
        instances.append(
            Instance(
                instance_id=instance_id,
                instance_type=kind,
                gpus=gpus_of.get(str(kind), 0),
                lifecycle_state=member.get("LifecycleState"),
                health=member.get("HealthStatus"),
                ec2_state=(ec2.get("State") or {}).get("Name"),
                private_ip=ec2.get("PrivateIpAddress"),
                in_service=in_service,
            )
        )
    return Fleet(
        asg_name=outputs.asg_name,
        min_size=group.get("MinSize"),
        max_size=group.get("MaxSize"),
        desired=group.get("DesiredCapacity"),
        instances=tuple(instances),
    )


def gpu_counts(ec2: Any, instance_types: Iterable[str]) -> dict[str, int]:
    """GPUs per instance type, as EC2 describes the types (0 for a type without GPUs)."""
    wanted = sorted(set(instance_types))
    if not wanted:
        return {}
    counts = {}
    for info in ec2.describe_instance_types(InstanceTypes=wanted)["InstanceTypes"]:
        gpus = info.get("GpuInfo", {}).get("Gpus", [])
        counts[str(info["InstanceType"])] = sum(int(g.get("Count", 0)) for g in gpus)
    return counts


def queue_name(url: str) -> str:
    """The queue's name (CloudWatch's ``QueueName`` dimension) from its URL."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def read_queues(sqs: Any, outputs: StackOutputs, warnings: list[str]) -> dict[str, int | None]:
    """Messages visible and in flight in the queue, visible in the dead-letter queue, now."""

    def attributes(url: str, keys: list[str]) -> dict[str, str]:
        return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=keys)["Attributes"]

    visible_key, flight_key = "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"
    queue = _guard(
        warnings, "the queue", lambda: attributes(outputs.queue_url, [visible_key, flight_key]), {}
    )
    dlq = _guard(
        warnings, "the dead-letter queue", lambda: attributes(outputs.dlq_url, [visible_key]), {}
    )

    def number(values: Mapping[str, str], key: str) -> int | None:
        return int(values[key]) if key in values else None

    return {
        "visible": number(queue, visible_key),
        "in_flight": number(queue, flight_key),
        "dlq_depth": number(dlq, visible_key),
    }


def read_worker(clients: Clients, outputs: StackOutputs, warnings: list[str]) -> Worker:
    """The worker's configuration: timeout, reserved concurrency, mapping, per-GPU value."""
    from chipscale.ops.fleet import FleetConfigError, parse_per_gpu

    lam = clients.lambda_client
    values: dict[str, Any] = {"function_name": outputs.worker_function}
    if outputs.worker_function:
        function = outputs.worker_function
        config = _guard(
            warnings,
            f"function {function}",
            lambda: lam.get_function_configuration(FunctionName=function),
            {},
        )
        values["timeout_s"] = config.get("Timeout")
        concurrency = _guard(
            warnings,
            f"the concurrency of {function}",
            lambda: lam.get_function_concurrency(FunctionName=function),
            {},
        )
        values["reserved_concurrency"] = concurrency.get("ReservedConcurrentExecutions")
    else:
        warnings.append(f"stack has no {names.OUTPUT_WORKER_FUNCTION!r} output: no Lambda view")
    if outputs.event_source_mapping_id:
        uuid = outputs.event_source_mapping_id
        mapping = _guard(
            warnings,
            f"event source mapping {uuid}",
            lambda: lam.get_event_source_mapping(UUID=uuid),
            {},
        )
        values["mapping_state"] = mapping.get("State")
        values["maximum_concurrency"] = (mapping.get("ScalingConfig") or {}).get(
            "MaximumConcurrency"
        )
        values["batch_size"] = mapping.get("BatchSize")
    if outputs.per_gpu_parameter:
        name = outputs.per_gpu_parameter
        parameter = _guard(
            warnings,
            f"SSM parameter {name}",
            lambda: clients.ssm.get_parameter(Name=name)["Parameter"],
            {},
        )
        if "Value" in parameter:
            try:
                values["per_gpu_concurrency"] = parse_per_gpu(str(parameter["Value"]))
            except FleetConfigError as exc:
                warnings.append(f"SSM parameter {name}: {exc}")
    return Worker(**values)


# ----------------------------------------------------------------------------- CloudWatch


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


# ----------------------------------------------------------------------------- assemble


def _total(points: Series | None) -> float:
    return sum(v for _, v in points or [])


def _by_period(points: Series | None, window: Window) -> dict[int, float]:
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
        f"{i.instance_id}/{index}": _by_period(series.get(f"gpu{n}_u"), window)
        for n, (i, index) in enumerate(gpu_slots)
    }
    tiles = [_by_period(work.get(k), window) for k in ("ok", "empty", "error")]
    other = {k: _by_period(work.get(k), window) for k in ("packs", "read", "predict", "write")}
    invocations = _by_period(series.get("lam_inv"), window)
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


def assemble(
    outputs: StackOutputs,
    window: Window,
    fleet: Fleet,
    gpu_slots: Sequence[tuple[Instance, int]],
    series: Mapping[str, Series],
    queue_now: Mapping[str, int | None],
    worker: Worker,
    percentiles: Mapping[str, float],
    *,
    remaining_tiles: float | None = None,
    warnings: Sequence[str] = (),
) -> Snapshot:
    """The snapshot from what was read (pure: the tests feed it recorded answers too)."""
    warnings = list(warnings)
    gpus = []
    for n, (instance, index) in enumerate(gpu_slots):
        util = [v for _, v in series.get(f"gpu{n}_u", [])]
        memory = [v for _, v in series.get(f"gpu{n}_m", [])]
        used = series.get(f"gpu{n}_mu", [])
        total = series.get(f"gpu{n}_mt", [])
        if not util and not instance.in_service and instance.ec2_state != "running":
            continue  # gone before the window, or never reported: nothing to show
        gpus.append(
            Gpu(
                instance_id=instance.instance_id,
                index=index,
                instance_type=instance.instance_type,
                in_service=instance.in_service,
                state=instance.lifecycle_state or instance.ec2_state,
                utilization=sum(util) / len(util) if util else None,
                utilization_last=util[-1] if util else None,
                memory_utilization=sum(memory) / len(memory) if memory else None,
                memory_used_mb=used[-1][1] if used else None,
                memory_total_mb=total[-1][1] if total else None,
                source="cloudwatch" if util else None,
            )
        )
    work = worker_series(series, outputs, warnings)
    minutes = minutes_of(window, gpu_slots, series, work)
    queue = queue_figures(window, series, work, queue_now, remaining_tiles)
    worker = worker_figures(worker, series, percentiles)
    return Snapshot(
        stack=outputs.stack_name,
        region=outputs.region,
        window=window,
        fleet=fleet,
        gpus=tuple(gpus),
        queue=queue,
        worker=worker,
        minutes=minutes,
        warnings=tuple(warnings),
    )


def queue_figures(
    window: Window,
    series: Mapping[str, Series],
    work: Mapping[str, Series],
    queue_now: Mapping[str, int | None],
    remaining_tiles: float | None,
) -> Queue:
    """Queue, dead letters, tiles/s and the ETA.

    tiles/s is the tiles done over the minutes from the first to the last with any, both
    included: a run that started within the window is not diluted by the minutes before it,
    and the last minute or two, which CloudWatch has not received yet (EMF metrics arrive
    with the worker's logs), do not count as idle. The ETA divides the remaining tiles (the
    job's, when given; else the messages waiting or in flight x the mean tiles a message) by
    that rate.
    """
    tiles = sum(_total(work.get(k)) for k in ("ok", "empty", "error"))
    packs = _total(work.get("packs"))
    stamps = [t for k in ("ok", "empty", "error") for t, _ in work.get(k) or []]
    tiles_per_s = None
    if tiles > 0 and stamps:
        seconds = (max(stamps) - min(stamps)).total_seconds() + window.period_s
        tiles_per_s = tiles / seconds
    tiles_per_message = tiles / packs if packs > 0 else None
    visible, in_flight = queue_now.get("visible"), queue_now.get("in_flight")
    remaining, source = None, None
    if remaining_tiles is not None:
        remaining, source = float(remaining_tiles), "job"
    elif tiles_per_message is not None and (visible is not None or in_flight is not None):
        remaining, source = ((visible or 0) + (in_flight or 0)) * tiles_per_message, "queue"
    eta = remaining / tiles_per_s if remaining is not None and tiles_per_s else None
    dlq = series.get("dlq_vis") or []
    age = series.get("q_age") or []
    return Queue(
        visible=visible,
        in_flight=in_flight,
        oldest_age_s=age[-1][1] if age else None,
        dlq_depth=queue_now.get("dlq_depth"),
        dlq_growth=dlq[-1][1] - dlq[0][1] if len(dlq) >= 2 else None,
        received=_total(series["q_rcv"]) if series.get("q_rcv") else None,
        deleted=_total(series["q_del"]) if series.get("q_del") else None,
        tiles=tiles,
        packs=packs,
        tiles_per_s=tiles_per_s,
        tiles_per_message=tiles_per_message,
        remaining_tiles=remaining,
        remaining_source=source,
        eta_s=eta,
    )


def worker_figures(
    worker: Worker, series: Mapping[str, Series], percentiles: Mapping[str, float]
) -> Worker:
    """The Lambda figures of the window onto the worker's configuration. The mean duration is
    weighted by each minute's invocations (a quiet minute's mean counts for little)."""
    concurrency = [v for _, v in series.get("lam_conc", [])]
    invocations = dict(series.get("lam_inv", []))
    durations = series.get("lam_dur", [])
    weights = [invocations.get(t, 0.0) for t, _ in durations]
    if durations and sum(weights) > 0:
        mean = sum(w * v for w, (_, v) in zip(weights, durations, strict=True)) / sum(weights)
    elif durations:
        mean = sum(v for _, v in durations) / len(durations)
    else:
        mean = None
    return replace(
        worker,
        concurrency_max=max(concurrency) if concurrency else None,
        concurrency_mean=sum(concurrency) / len(concurrency) if concurrency else None,
        invocations=_total(series.get("lam_inv")),
        errors=_total(series.get("lam_err")),
        throttles=_total(series.get("lam_thr")),
        duration_mean_ms=mean,
        duration_p50_ms=percentiles.get("p50"),
        duration_p95_ms=percentiles.get("p95"),
    )


def with_torchserve(snapshot: Snapshot, scraped: Sequence[TorchServeMetrics]) -> Snapshot:
    """The snapshot with TorchServe's scrapes attached, and their GPU gauges filling in for
    the GPUs CloudWatch said nothing about (``source`` then says ``torchserve``)."""
    readings = {
        (m.instance_id, index): reading
        for m in scraped
        if m.instance_id and not m.error
        for index, reading in m.gpus.items()
    }
    gpus = []
    for gpu in snapshot.gpus:
        reading = readings.get((gpu.instance_id, gpu.index))
        if gpu.utilization is None and reading is not None and reading.utilization is not None:
            gpu = replace(
                gpu,
                utilization=reading.utilization,
                utilization_last=reading.utilization,
                memory_utilization=reading.memory_utilization,
                memory_used_mb=reading.memory_used_mb,
                source="torchserve",
            )
        gpus.append(gpu)
    warnings = [f"TorchServe metrics of {m.target}: {m.error}" for m in scraped if m.error]
    return replace(
        snapshot,
        gpus=tuple(gpus),
        torchserve=tuple(scraped),
        warnings=(*snapshot.warnings, *warnings),
    )


# ----------------------------------------------------------------------------- TorchServe


def parse_metrics_target(text: str) -> tuple[str, str | None]:
    """``--metrics-url`` as (URL, instance id or None): ``i-0abc=http://localhost:18082`` ties
    a tunnel's figures to the instance it reaches; a bare URL stands alone.

    >>> parse_metrics_target("i-0abc=http://localhost:18082")
    ('http://localhost:18082', 'i-0abc')
    >>> parse_metrics_target("http://127.0.0.1:8082")
    ('http://127.0.0.1:8082', None)
    """
    head, sep, tail = text.partition("=")
    if sep and "://" not in head:
        return tail, head
    return text, None


def scraper_for(
    mode: str,
    urls: Sequence[str] = (),
    *,
    lambda_client: Any = None,
    operations_function: str | None = None,
) -> Scraper | None:
    """How to read TorchServe's metrics: ``direct`` (each instance in service at its private
    IP: from inside the VPC), ``lambda`` (the same, by the stack's operations Lambda, which the
    hosts admit on the metrics port), ``off``; plus the ``urls`` given (tunnels, a local
    serve). None when there is nothing to read."""
    from concurrent.futures import ThreadPoolExecutor

    from chipscale.ops import prometheus

    given = [parse_metrics_target(u) for u in urls]
    if mode == "off" and not given:
        return None
    if mode == "lambda" and not operations_function:
        raise MonitorError(
            f"--scrape lambda needs the stack's {names.OUTPUT_OPERATIONS_FUNCTION!r} output"
        )

    def scrape(instances: Sequence[Instance]) -> list[TorchServeMetrics]:
        targets = list(given)
        if mode == "direct":
            targets += [
                (prometheus.metrics_url(i.private_ip), i.instance_id)
                for i in instances
                if i.private_ip
            ]
        with ThreadPoolExecutor(max_workers=16) as pool:
            found = list(pool.map(lambda t: prometheus.scrape(t[0], t[1]), targets))
        if mode == "lambda":
            hosts = {i.instance_id: i.private_ip for i in instances if i.private_ip}
            found += prometheus.scrape_via_lambda(lambda_client, str(operations_function), hosts)
        return found

    return scrape


def since_previous(snapshot: Snapshot, previous: Snapshot | None) -> Snapshot:
    """TorchServe's counters over the interval since ``previous`` (``--watch``), rather than
    since each server started."""
    if previous is None or not snapshot.torchserve:
        return snapshot
    before = {m.target: m for m in previous.torchserve}
    return replace(
        snapshot,
        torchserve=tuple(
            m.since(before[m.target]) if m.target in before else m for m in snapshot.torchserve
        ),
    )


# ----------------------------------------------------------------------------- history


@dataclass(frozen=True, slots=True)
class History:
    """GPU utilisation per GPU and tiles/s over hours: what ``monitor --plot`` draws."""

    window: Window
    minutes: tuple[Minute, ...]

    def gpu_keys(self) -> list[str]:
        return sorted({k for m in self.minutes for k in m.gpu_utilization})


def plot_period(hours: float) -> int:
    """A period (a multiple of 60 s) giving at most :data:`MAX_PLOT_POINTS` points."""
    minutes = math.ceil(hours * 60 / MAX_PLOT_POINTS)
    return 60 * max(1, minutes)


def collect_history(
    outputs: StackOutputs,
    clients: Clients,
    fleet: Fleet,
    *,
    hours: float = 3.0,
    now: datetime | None = None,
) -> History:
    """GPU utilisation of every GPU of ``fleet`` (its instances, and those that left the group
    but EC2 still lists) and the worker's tiles over the last ``hours``."""
    window = Window.ending(
        now or datetime.now(UTC), timedelta(hours=hours), period_s=plot_period(hours)
    )
    slots = [(i, index) for i in fleet.instances for index in range(i.gpus)]
    queries = build_queries(
        outputs,
        slots,
        window.period_s,
        gpu_kinds=("u",),
        worker_keys=("ok", "empty", "error"),
        aws=False,
    )
    series = get_metric_data(clients.cloudwatch, queries, window)
    work = worker_series(series, outputs, None)
    return History(window, minutes_of(window, slots, series, work))


def plot(history: History, path: str, *, title: str = "") -> None:
    """A PNG: GPU utilisation per GPU (top) and tiles/s (bottom) against time.

    matplotlib is imported here (Agg, no display): the CLI and the Lambda bundle must not
    need it for anything else.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MonitorError(missing_message("matplotlib", "--plot")) from None
    period = history.window.period_s
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    try:
        for key in history.gpu_keys():
            points = [
                (m.start, m.gpu_utilization[key])
                for m in history.minutes
                if key in m.gpu_utilization
            ]
            if points:
                top.plot(*zip(*points, strict=True), label=key, linewidth=1.2)
        top.set_ylabel("GPU utilisation (%)")
        top.set_ylim(0, 105)
        if history.gpu_keys():
            top.legend(loc="upper left", fontsize="small", ncol=2)
        top.grid(alpha=0.3)
        stamps = [m.start for m in history.minutes]
        bottom.plot(stamps, [m.tiles / period for m in history.minutes], color="tab:green")
        bottom.set_ylabel("tiles/s")
        bottom.set_xlabel("UTC")
        bottom.grid(alpha=0.3)
        top.set_title(title or "chipscale")
        figure.autofmt_xdate()
        figure.tight_layout()
        from chipscale.atomic import atomic_write

        with atomic_write(path, "wb") as handle:
            figure.savefig(handle, format="png", dpi=100)
    finally:
        plt.close(figure)
