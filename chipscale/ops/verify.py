"""``chipscale verify``: a post-deploy smoke test, as a list of named checks.

Each check is a small function of plain inputs (a boto3 client, a URL) returning a
:class:`CheckResult`, so the same code runs against moto and local services in the tests,
from an operator's laptop, and inside the VPC. :func:`run_checks` runs a list of them; one
failing (or raising) never stops the others, and every failure is reported under its name.

Where each check runs, and why:

- queue, dead-letter queue, event source mapping, worker function, GPU fleet, quotas: AWS
  APIs, reachable from anywhere with credentials, so the CLI runs them itself;
- model endpoint and database schema: the load balancer and RDS Proxy live in private
  subnets, so with ``--stack`` the CLI invokes the stack's operations Lambda (inside the VPC)
  with ``{"action": "verify"}``; that Lambda answers :func:`verify_action`, which runs the very
  same two checks. ``--endpoint URL`` and ``--db URL`` run them directly instead (a tunnel,
  local runs).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Final

import numpy as np
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from chipscale.errors import ChipscaleError, one_line
from chipscale.ops.stack_outputs import StackOutputs, output_key
from chipscale.redaction import redact, scrub, secrets_of

# ----------------------------------------------------------------------------- names

CHECK_QUEUE: Final = "queue"
CHECK_DLQ: Final = "dead-letter queue"
CHECK_EVENT_SOURCE: Final = "event source mapping"
CHECK_WORKER: Final = "worker function"
CHECK_FLEET: Final = "GPU fleet"
CHECK_GPU_QUOTA: Final = "GPU vCPU quota"
CHECK_LAMBDA_QUOTA: Final = "Lambda concurrency quota"
CHECK_ENDPOINT: Final = "model endpoint"
CHECK_SCHEMA: Final = "database schema"

#: The results schema ``chipscale db-setup`` creates: table -> primary key columns, in order
#: (None: any key). The one place verify learns what "schema present" means. A copy of
#: ``chipscale.results.postgres.TABLES`` (a test holds them equal), so that importing this
#: module does not import psycopg.
RESULTS_SCHEMA: Final[Mapping[str, tuple[str, ...] | None]] = {
    "jobs": ("job",),
    "results": ("job", "z", "x", "y"),
    "rejects": ("message_id",),
    "schema_version": ("version",),
}

#: Service Quotas codes (service code, quota code, quota name as the console shows it).
GPU_QUOTA: Final = ("ec2", "L-DB2E81BA", "Running On-Demand G and VT instances")
LAMBDA_QUOTA: Final = ("lambda", "L-B99A9384", "Concurrent executions")
#: Lambda executions to keep free beyond the worker's ceiling: the stack's operations and
#: fleet-controller functions, and whatever else the account runs in the region.
LAMBDA_HEADROOM: Final = 10
#: AWS's rule for an SQS event source: queue visibility at least 6x the function timeout.
VISIBILITY_PER_TIMEOUT: Final = 6
#: Lambda refuses a reserved concurrency that leaves fewer than this many unreserved.
LAMBDA_UNRESERVED_MINIMUM: Final = 100

#: What the CLI sends the operations Lambda, and the action its handler dispatches on.
VERIFY_ACTION: Final = {"action": "verify"}

#: Endpoint check timeouts: a healthy endpoint in the VPC connects in milliseconds; a cold
#: model's first tile may take a few seconds.
ENDPOINT_CONNECT_TIMEOUT: Final = 3.0
ENDPOINT_READ_TIMEOUT: Final = 30.0
DB_CONNECT_TIMEOUT: Final = 5


class CheckFailed(ChipscaleError):
    """A check found a problem; its message is the check's detail."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One named check's outcome; ``detail`` says what was seen, and on failure what to do."""

    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}

    @classmethod
    def from_dict(cls, data: Any) -> CheckResult:
        """Parse one result of the operations Lambda's answer, refusing any other shape."""
        if not isinstance(data, Mapping) or not isinstance(data.get("name"), str):
            raise CheckFailed(f"not a check result: {json.dumps(data)[:200]}")
        return cls(str(data["name"]), data.get("ok") is True, str(data.get("detail", "")))


@dataclass(frozen=True, slots=True)
class Check:
    """A check to run: ``run`` returns its result (or, for a check that runs several at once
    elsewhere, their results); ``covers`` names what is reported failed if it raises."""

    name: str
    run: Callable[[], CheckResult | Sequence[CheckResult]]
    covers: tuple[str, ...] = ()


def run_checks(checks: Sequence[Check]) -> list[CheckResult]:
    """Run every check in order; an exception becomes a failed result under the check's name
    (or each name it covers), so one broken resource never hides the state of the others."""
    results: list[CheckResult] = []
    for check in checks:
        try:
            outcome = check.run()
        except ChipscaleError as exc:  # CheckFailed and chipscale's own: written for users
            detail = one_line(exc)
        except Exception as exc:  # a check must report, whatever broke inside it
            detail = f"{type(exc).__name__}: {one_line(exc)}"
        else:
            results.extend([outcome] if isinstance(outcome, CheckResult) else outcome)
            continue
        results.extend(CheckResult(name, False, detail) for name in check.covers or (check.name,))
    return results


def failures(results: Sequence[CheckResult]) -> list[str]:
    """Names of the failed checks, in order."""
    return [r.name for r in results if not r.ok]


# ----------------------------------------------------------------------------- queue checks


def check_queue(sqs: Any, queue_url: str, dlq_url: str) -> CheckResult:
    """The queue and its dead-letter queue answer, and the queue redrives into that DLQ."""
    queue = _queue_attributes(sqs, queue_url, "queue")
    dlq = _queue_attributes(sqs, dlq_url, "dead-letter queue")
    policy_text = queue.get("RedrivePolicy")
    if not policy_text:
        raise CheckFailed(
            f"{_queue_name(queue_url)} has no redrive policy: failed messages would be retried "
            "until they expire instead of moving to the dead-letter queue"
        )
    policy = json.loads(policy_text)
    target = policy.get("deadLetterTargetArn")
    if target != dlq.get("QueueArn"):
        raise CheckFailed(
            f"{_queue_name(queue_url)} redrives to {target}, not to the stack's dead-letter "
            f"queue {dlq.get('QueueArn')}"
        )
    return CheckResult(
        CHECK_QUEUE,
        True,
        f"{_queue_name(queue_url)}: {queue.get('ApproximateNumberOfMessages', '?')} visible, "
        f"{queue.get('ApproximateNumberOfMessagesNotVisible', '?')} in flight, visibility "
        f"{queue.get('VisibilityTimeout', '?')} s; to {_queue_name(dlq_url)} after "
        f"{policy.get('maxReceiveCount', '?')} receives",
    )


def check_dead_letter_queue(sqs: Any, dlq_url: str) -> CheckResult:
    """The dead-letter queue is empty: anything in it is a pack that failed every retry."""
    attributes = _queue_attributes(sqs, dlq_url, "dead-letter queue")
    waiting = int(attributes.get("ApproximateNumberOfMessages", 0))
    in_flight = int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0))
    if waiting or in_flight:
        raise CheckFailed(
            f"{_queue_name(dlq_url)} holds {waiting + in_flight} messages that failed every "
            "retry: read the worker's logs (or `chipscale redrive --peek 5`), fix the cause, "
            "then move them back with `chipscale redrive --stack NAME`"
        )
    return CheckResult(CHECK_DLQ, True, f"{_queue_name(dlq_url)}: empty")


def _queue_attributes(sqs: Any, url: str, what: str) -> dict[str, str]:
    try:
        return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    except ClientError as exc:
        raise CheckFailed(f"{what} {url}: {_aws_reason(exc)}") from exc


def _queue_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------- fleet


@dataclass(frozen=True, slots=True)
class Fleet:
    """The GPU Auto Scaling group as deployed: its size bounds and its instance type."""

    asg_name: str
    instance_type: str
    min_size: int
    max_size: int
    desired: int
    in_service: int
    vcpus_per_instance: int
    gpus_per_instance: int


def read_fleet(
    autoscaling: Any,
    ec2: Any,
    asg_name: str,
    *,
    elbv2: Any = None,
    target_group_arn: str | None = None,
) -> Fleet:
    """The group's bounds, and its instance type's vCPUs and GPUs as EC2 describes them
    (the type comes from the group's launch template, or its mixed-instances override).

    Instances in service are counted as the fleet controller counts them
    (:func:`chipscale.ops.fleet.count_in_service`: InService and Healthy, and a healthy target of
    ``target_group_arn`` when the stack exposes it), so verify and the controller agree on
    when the event source should be enabled."""
    from chipscale.ops.fleet import FleetError, count_in_service

    groups = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[asg_name])
    if not groups["AutoScalingGroups"]:
        raise CheckFailed(f"Auto Scaling group {asg_name} does not exist")
    group = groups["AutoScalingGroups"][0]
    instance_type = _instance_type(ec2, group)
    described = ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"]
    if not described:
        raise CheckFailed(f"EC2 does not know instance type {instance_type} in this region")
    info = described[0]
    gpus = sum(int(g.get("Count", 0)) for g in info.get("GpuInfo", {}).get("Gpus", []))
    try:
        _, in_service = count_in_service(
            autoscaling, asg_name, elbv2=elbv2, target_group_arn=target_group_arn
        )
    except FleetError as exc:
        raise CheckFailed(str(exc)) from exc
    return Fleet(
        asg_name=asg_name,
        instance_type=instance_type,
        min_size=int(group["MinSize"]),
        max_size=int(group["MaxSize"]),
        desired=int(group["DesiredCapacity"]),
        in_service=in_service,
        vcpus_per_instance=int(info["VCpuInfo"]["DefaultVCpus"]),
        gpus_per_instance=gpus,
    )


def _instance_type(ec2: Any, group: Mapping[str, Any]) -> str:
    mixed = group.get("MixedInstancesPolicy", {}).get("LaunchTemplate", {})
    for override in mixed.get("Overrides", []):
        if override.get("InstanceType"):
            return str(override["InstanceType"])
    spec = group.get("LaunchTemplate") or mixed.get("LaunchTemplateSpecification")
    if not spec:
        raise CheckFailed(
            f"Auto Scaling group {group['AutoScalingGroupName']} has no launch template"
        )
    selector = (
        {"LaunchTemplateId": spec["LaunchTemplateId"]}
        if spec.get("LaunchTemplateId")
        else {"LaunchTemplateName": spec["LaunchTemplateName"]}
    )
    versions = ec2.describe_launch_template_versions(
        **selector, Versions=[str(spec.get("Version") or "$Default")]
    )["LaunchTemplateVersions"]
    instance_type = versions[0]["LaunchTemplateData"].get("InstanceType") if versions else None
    if not instance_type:
        raise CheckFailed(f"launch template {selector} names no instance type")
    return str(instance_type)


def check_fleet(fleet: Fleet) -> CheckResult:
    """The group exists and its instance type has GPUs (a CPU type would serve nothing)."""
    if fleet.gpus_per_instance < 1:
        raise CheckFailed(f"{fleet.asg_name}: {fleet.instance_type} has no GPU")
    return CheckResult(
        CHECK_FLEET,
        True,
        f"{fleet.asg_name}: {fleet.instance_type} ({fleet.gpus_per_instance} GPU, "
        f"{fleet.vcpus_per_instance} vCPUs), {fleet.min_size}-{fleet.max_size} instances, "
        f"{fleet.desired} desired, {fleet.in_service} in service",
    )


def check_event_source(
    lambda_client: Any, mapping_id: str, queue_url: str, fleet: Fleet | None
) -> CheckResult:
    """The worker's SQS mapping reads the stack's queue, reports partial batch failures, and is
    enabled exactly when a GPU is in service (the fleet controller's rule: enabled with no GPU
    burns messages into the dead-letter queue; disabled with GPUs leaves them idle)."""
    try:
        mapping = lambda_client.get_event_source_mapping(UUID=mapping_id)
    except ClientError as exc:
        raise CheckFailed(f"mapping {mapping_id}: {_aws_reason(exc)}") from exc
    source = str(mapping.get("EventSourceArn", ""))
    if source.rsplit(":", 1)[-1] != _queue_name(queue_url):
        raise CheckFailed(f"mapping {mapping_id} reads {source}, not {_queue_name(queue_url)}")
    if "ReportBatchItemFailures" not in (mapping.get("FunctionResponseTypes") or []):
        raise CheckFailed(
            f"mapping {mapping_id} lacks ReportBatchItemFailures: one bad pack would send its "
            "whole batch back to the queue"
        )
    state = str(mapping.get("State"))
    limit = mapping.get("ScalingConfig", {}).get("MaximumConcurrency", "none")
    detail = f"{state}, MaximumConcurrency {limit}, batch {mapping.get('BatchSize')}"
    if state not in ("Enabled", "Disabled"):
        raise CheckFailed(f"mapping {mapping_id} is {state}, expected Enabled or Disabled")
    if fleet is not None:
        if state == "Enabled" and fleet.in_service == 0:
            raise CheckFailed(
                f"{detail} with no GPU in service: messages will fail into the dead-letter "
                "queue (is the fleet controller running?)"
            )
        if state == "Disabled" and fleet.in_service > 0:
            raise CheckFailed(
                f"{detail} while {fleet.in_service} GPU instances are in service: they sit "
                "idle (is the fleet controller running?)"
            )
        detail += f"; {fleet.in_service} GPU instances in service"
    return CheckResult(CHECK_EVENT_SOURCE, True, detail)


def check_worker(lambda_client: Any, sqs: Any, function_name: str, queue_url: str) -> CheckResult:
    """The worker function is Active (its last deploy succeeded) and the queue's visibility
    timeout is at least 6x its timeout, so a slow batch is not delivered again while it runs."""
    try:
        config = lambda_client.get_function_configuration(FunctionName=function_name)
    except ClientError as exc:
        raise CheckFailed(f"{function_name}: {_aws_reason(exc)}") from exc
    state = str(config.get("State") or "Active")
    if state != "Active" or config.get("LastUpdateStatus") == "Failed":
        reason = config.get("StateReason") or config.get("LastUpdateStatusReason") or ""
        raise CheckFailed(
            f"{function_name} is {state} (last update {config.get('LastUpdateStatus')}): {reason}"
        )
    timeout = int(config["Timeout"])
    detail = (
        f"{function_name}: {config.get('Runtime', '?')}, {config.get('MemorySize', '?')} MB, "
        f"timeout {timeout} s"
    )
    try:
        visibility = int(_queue_attributes(sqs, queue_url, "queue")["VisibilityTimeout"])
    except CheckFailed:  # the queue check reports it; this one is about the function
        return CheckResult(CHECK_WORKER, True, f"{detail}; queue unreadable (see {CHECK_QUEUE})")
    detail += f"; queue visibility {visibility} s"
    if visibility < VISIBILITY_PER_TIMEOUT * timeout:
        raise CheckFailed(
            f"{detail}, under {VISIBILITY_PER_TIMEOUT}x the timeout: a slow batch would be "
            "delivered again while it still runs"
        )
    return CheckResult(CHECK_WORKER, True, detail)


# ----------------------------------------------------------------------------- quotas


@dataclass(frozen=True, slots=True)
class Quota:
    """A Service Quotas value; ``applied`` False means the AWS default (none applied)."""

    name: str
    value: float
    applied: bool

    def describe(self) -> str:
        source = "applied" if self.applied else "AWS default: no quota applied to this account"
        return f"quota {self.value:g} ({source})"


def read_quota(quotas: Any, service_code: str, quota_code: str) -> Quota:
    """The account's applied quota, else AWS's default for it: GetServiceQuota answers
    NoSuchResourceException for an account that never had the quota applied."""
    try:
        quota = quotas.get_service_quota(ServiceCode=service_code, QuotaCode=quota_code)["Quota"]
        applied = True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "NoSuchResourceException":
            raise CheckFailed(f"{service_code} {quota_code}: {_aws_reason(exc)}") from exc
        try:
            quota = quotas.get_aws_default_service_quota(
                ServiceCode=service_code, QuotaCode=quota_code
            )["Quota"]
        except (ClientError, BotoCoreError) as inner:
            raise CheckFailed(
                f"{service_code} {quota_code}: none applied and no default: {_aws_reason(inner)}"
            ) from inner
        applied = False
    return Quota(str(quota.get("QuotaName", quota_code)), float(quota["Value"]), applied)


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the deployed config can use at most: the GPU fleet at full size and the worker
    Lambda concurrency the fleet controller then allows."""

    fleet: Fleet
    per_gpu_concurrency: int | None
    max_concurrency: int | None
    reserved_concurrency: int | None

    @property
    def gpu_vcpus(self) -> int:
        """vCPUs the "G and VT" quota must allow with every instance running."""
        return self.fleet.max_size * self.fleet.vcpus_per_instance

    @property
    def worker_concurrency(self) -> int:
        """Most worker Lambdas at once: reserved concurrency caps it; otherwise the controller
        raises MaximumConcurrency to per-GPU concurrency x GPUs at full fleet."""
        if self.reserved_concurrency:
            return self.reserved_concurrency
        gpus = self.fleet.max_size * self.fleet.gpus_per_instance
        return max((self.per_gpu_concurrency or 0) * gpus, self.max_concurrency or 0)

    @property
    def lambda_executions(self) -> int:
        """Concurrent executions the account needs: the worker's ceiling plus the headroom
        (Lambda itself keeps 100 unreserved once a function reserves concurrency)."""
        extra = LAMBDA_UNRESERVED_MINIMUM if self.reserved_concurrency else LAMBDA_HEADROOM
        return self.worker_concurrency + extra


def read_capacity(
    fleet: Fleet,
    *,
    lambda_client: Any,
    ssm: Any,
    outputs: StackOutputs,
) -> Capacity:
    """The deployed limits: the per-GPU concurrency parameter (SSM), the mapping's current
    MaximumConcurrency and the worker's reserved concurrency, each optional."""
    per_gpu = None
    if outputs.per_gpu_parameter:
        value = ssm.get_parameter(Name=outputs.per_gpu_parameter)["Parameter"]["Value"]
        per_gpu = int(value)
    max_concurrency = None
    if outputs.event_source_mapping_id:
        mapping = lambda_client.get_event_source_mapping(UUID=outputs.event_source_mapping_id)
        max_concurrency = mapping.get("ScalingConfig", {}).get("MaximumConcurrency")
    reserved = None
    if outputs.worker_function:
        answer = lambda_client.get_function_concurrency(FunctionName=outputs.worker_function)
        reserved = answer.get("ReservedConcurrentExecutions")
    return Capacity(fleet, per_gpu, max_concurrency, reserved)


def check_gpu_quota(quotas: Any, capacity: Capacity) -> CheckResult:
    """The region's "Running On-Demand G and VT instances" vCPU quota fits the full fleet
    (it counts every G instance of the account in the region, not only this stack's)."""
    service, code, _ = GPU_QUOTA
    quota = read_quota(quotas, service, code)
    fleet = capacity.fleet
    need = (
        f"need {capacity.gpu_vcpus} vCPUs ({fleet.max_size} x {fleet.instance_type}, "
        f"{fleet.vcpus_per_instance} each); {quota.describe()}"
    )
    if quota.value < capacity.gpu_vcpus:
        raise CheckFailed(f"{need}: request an increase of {service} {code} in Service Quotas")
    return CheckResult(CHECK_GPU_QUOTA, True, need)


def check_lambda_quota(quotas: Any, capacity: Capacity) -> CheckResult:
    """The region's Lambda concurrent executions fit the worker's ceiling plus headroom."""
    service, code, _ = LAMBDA_QUOTA
    quota = read_quota(quotas, service, code)
    if capacity.reserved_concurrency:
        why = f"{capacity.reserved_concurrency} reserved + {LAMBDA_UNRESERVED_MINIMUM} unreserved"
    else:
        why = f"worker up to {capacity.worker_concurrency} + {LAMBDA_HEADROOM} headroom"
    need = f"need {capacity.lambda_executions} ({why}); {quota.describe()}"
    if quota.value < capacity.lambda_executions:
        raise CheckFailed(f"{need}: request an increase of {service} {code} in Service Quotas")
    return CheckResult(CHECK_LAMBDA_QUOTA, True, need)


# ----------------------------------------------------------------------------- private checks


def check_endpoint(
    url: str,
    *,
    connect_timeout: float = ENDPOINT_CONNECT_TIMEOUT,
    read_timeout: float = ENDPOINT_READ_TIMEOUT,
) -> CheckResult:
    """The model endpoint answers its metadata, then scores one tile of the model's own band
    count and size: the whole path (request, decode, model, answer) with its timings. No
    retries: a smoke test reports the endpoint as it is now."""
    from chipscale.models.torchserve_client import TorchServePredictor

    start = time.perf_counter()
    with TorchServePredictor(
        url,
        concurrency=1,
        retries=0,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    ) as predictor:
        metadata_ms = (time.perf_counter() - start) * 1000
        info = predictor.info
        tile = probe_tile(info.bands, info.tile_size)
        start = time.perf_counter()
        scores = predictor.predict(tile[np.newaxis])
        predict_ms = (time.perf_counter() - start) * 1000
    row = scores[0]
    if row.shape != (len(info.classes),) or not all(math.isfinite(float(s)) for s in row):
        raise CheckFailed(f"{url} answered scores {row.tolist()} for {len(info.classes)} classes")
    top = int(np.argmax(row))
    return CheckResult(
        CHECK_ENDPOINT,
        True,
        f"{info.name} v{info.version}: metadata in {metadata_ms:.0f} ms; one "
        f"{info.bands}x{info.tile_size}x{info.tile_size} tile scored in {predict_ms:.0f} ms "
        f"(top {info.classes[top]!r} {float(row[top]):.2f})",
    )


def probe_tile(bands: int, size: int) -> np.ndarray:
    """A deterministic uint8 tile with structure (gradients per band), not a flat one, so
    the model runs its ordinary path; what is checked is the answer's shape, not the class."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    tile = np.empty((bands, size, size), dtype=np.uint8)
    for band in range(bands):
        tile[band] = ((ramp[:, None] * (band + 1) + ramp[None, :]) % 256).astype(np.uint8)
    return tile


def check_schema(db_url: str, *, schema: str | None = None) -> CheckResult:
    """The results tables exist in ``schema`` (default: the connection's current schema, so a
    ``search_path`` in the URL is honoured), with the results primary key of RESULTS_SCHEMA."""
    import psycopg

    from chipscale.results import is_postgres_url
    from chipscale.results.postgres import libpq_url

    if not is_postgres_url(db_url):
        raise CheckFailed(f"the schema check needs a postgresql:// URL, got {redact(db_url)}")
    where = redact(db_url)
    dsn = libpq_url(db_url)
    try:
        with psycopg.connect(dsn, connect_timeout=DB_CONNECT_TIMEOUT, autocommit=True) as conn:
            if schema is None:
                schema = str(conn.execute("SELECT current_schema()").fetchone()[0])  # type: ignore[index]
            problems = _schema_problems(conn, schema)
    except psycopg.Error as exc:
        raise CheckFailed(f"{where}: {scrub(one_line(exc), secrets_of(db_url))}") from None
    if problems:
        raise CheckFailed(
            f"{where} schema {schema}: {'; '.join(problems)}: the results schema is not set "
            "up or is out of date: run `chipscale db-setup --stack NAME` (or `--db URL`)"
        )
    tables = ", ".join(RESULTS_SCHEMA)
    return CheckResult(CHECK_SCHEMA, True, f"{where} schema {schema}: tables {tables} present")


def _schema_problems(conn: Any, schema: str) -> list[str]:
    """What is missing or different from RESULTS_SCHEMA, as short phrases."""
    found = {
        row[0]
        for row in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND c.relname = ANY(%s)",
            (schema, list(RESULTS_SCHEMA)),
        )
    }
    problems = []
    missing = [t for t in RESULTS_SCHEMA if t not in found]
    if missing:
        problems.append(f"missing table{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    for table, expected in RESULTS_SCHEMA.items():
        if expected is None or table not in found:
            continue
        key = tuple(
            row[0]
            for row in conn.execute(
                "SELECT a.attname FROM pg_index i "
                "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                "WHERE i.indrelid = format('%%I.%%I', %s::text, %s::text)::regclass "
                "AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
                (schema, table),
            )
        )
        if key != expected:
            shown = f"({', '.join(key)})" if key else "none"
            problems.append(f"{table} primary key is {shown}, expected ({', '.join(expected)})")
    return problems


def private_checks(endpoint_url: str | None, db_url: str | None) -> list[CheckResult]:
    """The two checks that need the VPC, run where the caller is (the operations Lambda, or
    the CLI with ``--endpoint``/``--db``); a missing input fails its check by name."""
    return run_checks(
        [
            Check(
                CHECK_ENDPOINT, lambda: check_endpoint(_given(endpoint_url, "model endpoint URL"))
            ),
            Check(CHECK_SCHEMA, lambda: check_schema(_given(db_url, "database URL"))),
        ]
    )


def verify_action(endpoint_url: str | None, db_url: str | None) -> list[dict[str, Any]]:
    """The operations Lambda's answer to ``{"action": "verify"}``: the private checks as JSON."""
    return [result.to_dict() for result in private_checks(endpoint_url, db_url)]


def invoke_private_checks(
    lambda_client: Any, function_name: str, wanted: Sequence[str]
) -> list[CheckResult]:
    """Ask the operations Lambda to run the private checks inside the VPC; keep the ``wanted``
    ones, and fail by name any it did not report."""
    try:
        response = lambda_client.invoke(
            FunctionName=function_name, Payload=json.dumps(VERIFY_ACTION).encode()
        )
    except ClientError as exc:
        raise CheckFailed(f"operations Lambda {function_name}: {_aws_reason(exc)}") from exc
    payload = response["Payload"].read()
    if response.get("FunctionError"):
        raise CheckFailed(f"operations Lambda {function_name} failed: {_lambda_error(payload)}")
    try:
        answer = json.loads(payload)
    except ValueError as exc:
        raise CheckFailed(f"operations Lambda {function_name} answered {payload[:200]!r}") from exc
    if not isinstance(answer, list):
        raise CheckFailed(
            f"operations Lambda {function_name} answered {json.dumps(answer)[:200]}, not a list "
            "of check results"
        )
    by_name = {r.name: r for r in map(CheckResult.from_dict, answer)}
    return [
        by_name.get(name)
        or CheckResult(name, False, f"not reported by operations Lambda {function_name}")
        for name in wanted
    ]


def _lambda_error(payload: bytes) -> str:
    try:
        error = json.loads(payload)
    except ValueError:
        return payload[:200].decode(errors="replace")
    if isinstance(error, dict):
        return f"{error.get('errorType', 'error')}: {error.get('errorMessage', '')}"
    return str(error)[:200]


def _given(value: str | None, what: str) -> str:
    if not value:
        raise CheckFailed(f"no {what} configured")
    return value


# ----------------------------------------------------------------------------- plans


def make_client(session: Any, service: str, *, read_timeout: float = 30.0) -> Any:
    """A boto3 client for the checks: few retries and short timeouts, since a smoke test
    should report a dead service in seconds, not wait out the SDK's default backoff."""
    config = Config(
        connect_timeout=5,
        read_timeout=read_timeout,
        retries={"max_attempts": 2, "mode": "standard"},
    )
    return session.client(service, config=config)


def stack_checks(
    outputs: StackOutputs,
    session: Any,
    *,
    endpoint_url: str | None = None,
    db_url: str | None = None,
) -> list[Check]:
    """Every check of a deployed stack. The endpoint and schema checks run directly when
    ``endpoint_url``/``db_url`` are given, else inside the VPC through the operations Lambda."""
    sqs = make_client(session, "sqs")
    lambda_client = make_client(session, "lambda", read_timeout=120)

    @cache
    def fleet() -> Fleet:
        from chipscale import names

        asg = _output(outputs, "asg_name")
        # Older stacks have no target group output: Auto Scaling's state alone then.
        target_group = outputs.raw.get(names.OUTPUT_TARGET_GROUP_ARN)
        return read_fleet(
            make_client(session, "autoscaling"),
            make_client(session, "ec2"),
            asg,
            elbv2=make_client(session, "elbv2") if target_group else None,
            target_group_arn=target_group,
        )

    @cache
    def capacity() -> Capacity:
        ssm = make_client(session, "ssm")
        try:
            deployed = fleet()
        except CheckFailed as exc:
            raise CheckFailed(f"cannot size the need: {exc}") from exc
        return read_capacity(deployed, lambda_client=lambda_client, ssm=ssm, outputs=outputs)

    def fleet_if_known() -> Fleet | None:
        """The fleet for the mapping's cross-check; its own failure is the fleet check's."""
        try:
            return fleet() if outputs.asg_name else None
        except Exception:
            return None

    quotas = make_client(session, "service-quotas")
    checks = [
        Check(CHECK_QUEUE, lambda: check_queue(sqs, outputs.queue_url, outputs.dlq_url)),
        Check(CHECK_DLQ, lambda: check_dead_letter_queue(sqs, outputs.dlq_url)),
        Check(
            CHECK_EVENT_SOURCE,
            lambda: check_event_source(
                lambda_client,
                _output(outputs, "event_source_mapping_id"),
                outputs.queue_url,
                fleet_if_known(),
            ),
        ),
        Check(
            CHECK_WORKER,
            lambda: check_worker(
                lambda_client, sqs, _output(outputs, "worker_function"), outputs.queue_url
            ),
        ),
        Check(CHECK_FLEET, lambda: check_fleet(fleet())),
        Check(CHECK_GPU_QUOTA, lambda: check_gpu_quota(quotas, capacity())),
        Check(CHECK_LAMBDA_QUOTA, lambda: check_lambda_quota(quotas, capacity())),
    ]
    if endpoint_url:
        checks.append(Check(CHECK_ENDPOINT, lambda: check_endpoint(endpoint_url)))
    if db_url:
        checks.append(Check(CHECK_SCHEMA, lambda: check_schema(db_url)))
    remote = tuple(
        name
        for name, given in ((CHECK_ENDPOINT, endpoint_url), (CHECK_SCHEMA, db_url))
        if not given
    )
    if remote:
        checks.append(
            Check(
                "operations Lambda",
                lambda: invoke_private_checks(
                    lambda_client, _output(outputs, "operations_function"), remote
                ),
                covers=remote,
            )
        )
    return checks


def direct_checks(endpoint_url: str | None, db_url: str | None) -> list[Check]:
    """The private checks against URLs reachable from here (no stack)."""
    checks = []
    if endpoint_url:
        checks.append(Check(CHECK_ENDPOINT, lambda: check_endpoint(endpoint_url)))
    if db_url:
        checks.append(Check(CHECK_SCHEMA, lambda: check_schema(db_url)))
    return checks


def _output(outputs: StackOutputs, attribute: str) -> str:
    value = getattr(outputs, attribute)
    if not value:
        raise CheckFailed(
            f"stack {outputs.stack_name} has no output {output_key(attribute)!r} (a partial or "
            "older chipscale stack?)"
        )
    return str(value)


def _aws_reason(exc: ClientError | BotoCoreError) -> str:
    """AWS's error code and message, on one line and short (a proxy may answer a web page)."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        reason = f"{error.get('Code', 'error')}: {error.get('Message', '')}".rstrip(": ")
    else:
        reason = one_line(exc)
    reason = " ".join(reason.split())
    return reason if len(reason) <= 200 else reason[:199] + "…"
