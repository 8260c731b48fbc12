"""What a deployed stack is doing, in one :class:`~chipscale.ops.snapshot.Snapshot`: GPUs,
queue, worker Lambdas, read from the AWS APIs over a window (15 minutes by default, 1-minute
periods) by :func:`collect`, with TorchServe's own metrics as a second source of GPU figures.
A read that AWS refuses costs its figures and a warning, not the snapshot. Rationale and the
table of sources: docs/design.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from chipscale import names
from chipscale.errors import ChipscaleError
from chipscale.ops import aws
from chipscale.ops.aws import (
    Fleet,
    FleetConfigError,
    FleetError,
    Instance,
    aws_reason,
    quick_client,
)
from chipscale.ops.cloudwatch import (
    Series,
    build_queries,
    get_metric_data,
    minutes_of,
    read_percentiles,
    series_total,
    worker_series,
)
from chipscale.ops.prometheus import TorchServeMetrics
from chipscale.ops.snapshot import (
    DEFAULT_WINDOW,
    Gpu,
    Queue,
    Snapshot,
    Window,
    WorkerStatus,
)

if TYPE_CHECKING:
    from chipscale.ops.stack_outputs import StackOutputs


class MonitorError(ChipscaleError):
    """The stack's state could not be read."""


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
        services = {
            "cloudwatch": "cloudwatch",
            "sqs": "sqs",
            "autoscaling": "autoscaling",
            "ec2": "ec2",
            "lambda_client": "lambda",
            "ssm": "ssm",
            "elbv2": "elbv2",
        }
        return cls(**{k: quick_client(session, s) for k, s in services.items()})


#: Reads TorchServe's metrics of the instances in service (see chipscale.cli's --scrape).
Scraper = Callable[[Sequence[Instance]], Sequence[TorchServeMetrics]]


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
    fleet = _guard(warnings, "the GPU fleet", lambda: _read_fleet(clients, outputs), None)
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


def _read_fleet(clients: Clients, outputs: StackOutputs) -> Fleet:
    """The group, its instances (and those that left it but EC2 still lists, so the GPU
    series of the window are all found), their GPUs, and which are in service."""
    if not outputs.asg_name:
        raise MonitorError(f"stack has no {names.OUTPUT_ASG_NAME!r} output")
    target_group = outputs.raw.get(names.OUTPUT_TARGET_GROUP_ARN)
    try:
        return aws.read_fleet(
            clients.autoscaling,
            outputs.asg_name,
            elbv2=clients.elbv2 if target_group else None,
            target_group_arn=target_group,
            ec2=clients.ec2,
            ec2_instances=True,
        )
    except FleetError as exc:
        raise MonitorError(str(exc)) from exc


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


def read_worker(clients: Clients, outputs: StackOutputs, warnings: list[str]) -> WorkerStatus:
    """The worker's configuration: timeout, reserved concurrency, mapping, per-GPU value."""
    from chipscale.ops.fleet import parse_per_gpu

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
    return WorkerStatus(**values)


def assemble(
    outputs: StackOutputs,
    window: Window,
    fleet: Fleet,
    gpu_slots: Sequence[tuple[Instance, int]],
    series: Mapping[str, Series],
    queue_now: Mapping[str, int | None],
    worker: WorkerStatus,
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
    tiles = sum(series_total(work.get(k)) for k in ("ok", "empty", "error"))
    packs = series_total(work.get("packs"))
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
        received=series_total(series["q_rcv"]) if series.get("q_rcv") else None,
        deleted=series_total(series["q_del"]) if series.get("q_del") else None,
        tiles=tiles,
        packs=packs,
        tiles_per_s=tiles_per_s,
        tiles_per_message=tiles_per_message,
        remaining_tiles=remaining,
        remaining_source=source,
        eta_s=eta,
    )


def worker_figures(
    worker: WorkerStatus, series: Mapping[str, Series], percentiles: Mapping[str, float]
) -> WorkerStatus:
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
        invocations=series_total(series.get("lam_inv")),
        errors=series_total(series.get("lam_err")),
        throttles=series_total(series.get("lam_thr")),
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
