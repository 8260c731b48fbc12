"""``chipscale verify``'s checks of what AWS APIs show from anywhere: the queue and its
dead-letter queue, the worker and its event source mapping, the GPU fleet, and the account's
quotas against what the deployed stack can use at most.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from botocore.exceptions import BotoCoreError, ClientError

from chipscale.ops.aws import Fleet, FleetError, aws_reason, queue_name, read_fleet
from chipscale.ops.checks import (
    CHECK_DLQ,
    CHECK_EVENT_SOURCE,
    CHECK_FLEET,
    CHECK_GPU_QUOTA,
    CHECK_LAMBDA_QUOTA,
    CHECK_QUEUE,
    CHECK_WORKER,
    CheckFailed,
    CheckResult,
)

if TYPE_CHECKING:
    from chipscale.ops.stack_outputs import StackOutputs


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


def check_queue(sqs: Any, queue_url: str, dlq_url: str) -> CheckResult:
    """The queue and its dead-letter queue answer, and the queue redrives into that DLQ."""
    queue = _queue_attributes(sqs, queue_url, "queue")
    dlq = _queue_attributes(sqs, dlq_url, "dead-letter queue")
    policy_text = queue.get("RedrivePolicy")
    if not policy_text:
        raise CheckFailed(
            f"{queue_name(queue_url)} has no redrive policy: failed messages would be retried "
            "until they expire instead of moving to the dead-letter queue"
        )
    policy = json.loads(policy_text)
    target = policy.get("deadLetterTargetArn")
    if target != dlq.get("QueueArn"):
        raise CheckFailed(
            f"{queue_name(queue_url)} redrives to {target}, not to the stack's dead-letter "
            f"queue {dlq.get('QueueArn')}"
        )
    return CheckResult(
        CHECK_QUEUE,
        True,
        f"{queue_name(queue_url)}: {queue.get('ApproximateNumberOfMessages', '?')} visible, "
        f"{queue.get('ApproximateNumberOfMessagesNotVisible', '?')} in flight, visibility "
        f"{queue.get('VisibilityTimeout', '?')} s; to {queue_name(dlq_url)} after "
        f"{policy.get('maxReceiveCount', '?')} receives",
    )


def check_dead_letter_queue(sqs: Any, dlq_url: str) -> CheckResult:
    """The dead-letter queue is empty: anything in it is a pack that failed every retry."""
    attributes = _queue_attributes(sqs, dlq_url, "dead-letter queue")
    waiting = int(attributes.get("ApproximateNumberOfMessages", 0))
    in_flight = int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0))
    if waiting or in_flight:
        raise CheckFailed(
            f"{queue_name(dlq_url)} holds {waiting + in_flight} messages that failed every "
            "retry: read the worker's logs (or `chipscale redrive --peek 5`), fix the cause, "
            "then move them back with `chipscale redrive --stack NAME`"
        )
    return CheckResult(CHECK_DLQ, True, f"{queue_name(dlq_url)}: empty")


def _queue_attributes(sqs: Any, url: str, what: str) -> dict[str, str]:
    try:
        return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    except ClientError as exc:
        raise CheckFailed(f"{what} {url}: {aws_reason(exc)}") from exc


def read_deployed_fleet(
    autoscaling: Any,
    ec2: Any,
    asg_name: str,
    *,
    elbv2: Any = None,
    target_group_arn: str | None = None,
) -> Fleet:
    """The group's bounds, and its instance type's vCPUs and GPUs as EC2 describes them (the
    type comes from the group's launch template, or its mixed-instances override).

    Instances in service are counted as the fleet controller counts them (InService and
    Healthy, and a healthy target of ``target_group_arn`` when the stack exposes it), so
    verify and the controller agree on when the event source should be enabled."""
    try:
        return read_fleet(
            autoscaling,
            asg_name,
            elbv2=elbv2,
            target_group_arn=target_group_arn,
            ec2=ec2,
            launch_type=True,
        )
    except FleetError as exc:
        raise CheckFailed(str(exc)) from exc


def check_fleet(fleet: Fleet) -> CheckResult:
    """The group exists and its instance type has GPUs (a CPU type would serve nothing)."""
    if (fleet.gpus_per_instance or 0) < 1:
        raise CheckFailed(f"{fleet.asg_name}: {fleet.instance_type} has no GPU")
    return CheckResult(
        CHECK_FLEET,
        True,
        f"{fleet.asg_name}: {fleet.instance_type} ({fleet.gpus_per_instance} GPU, "
        f"{fleet.vcpus_per_instance} vCPUs), {fleet.min_size}-{fleet.max_size} instances, "
        f"{fleet.desired} desired, {fleet.instances_in_service} in service",
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
        raise CheckFailed(f"mapping {mapping_id}: {aws_reason(exc)}") from exc
    source = str(mapping.get("EventSourceArn", ""))
    if source.rsplit(":", 1)[-1] != queue_name(queue_url):
        raise CheckFailed(f"mapping {mapping_id} reads {source}, not {queue_name(queue_url)}")
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
        if state == "Enabled" and fleet.instances_in_service == 0:
            raise CheckFailed(
                f"{detail} with no GPU in service: messages will fail into the dead-letter "
                "queue (is the fleet controller running?)"
            )
        if state == "Disabled" and fleet.instances_in_service > 0:
            raise CheckFailed(
                f"{detail} while {fleet.instances_in_service} GPU instances are in service: "
                "they sit idle (is the fleet controller running?)"
            )
        detail += f"; {fleet.instances_in_service} GPU instances in service"
    return CheckResult(CHECK_EVENT_SOURCE, True, detail)


def check_worker(lambda_client: Any, sqs: Any, function_name: str, queue_url: str) -> CheckResult:
    """The worker function is Active (its last deploy succeeded) and the queue's visibility
    timeout is at least 6x its timeout, so a slow batch is not delivered again while it runs."""
    try:
        config = lambda_client.get_function_configuration(FunctionName=function_name)
    except ClientError as exc:
        raise CheckFailed(f"{function_name}: {aws_reason(exc)}") from exc
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
            raise CheckFailed(f"{service_code} {quota_code}: {aws_reason(exc)}") from exc
        try:
            quota = quotas.get_aws_default_service_quota(
                ServiceCode=service_code, QuotaCode=quota_code
            )["Quota"]
        except (ClientError, BotoCoreError) as inner:
            raise CheckFailed(
                f"{service_code} {quota_code}: none applied and no default: {aws_reason(inner)}"
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
        return (self.fleet.max_size or 0) * (self.fleet.vcpus_per_instance or 0)

    @property
    def worker_concurrency(self) -> int:
        """Most worker Lambdas at once: reserved concurrency caps it; otherwise the controller
        raises MaximumConcurrency to per-GPU concurrency x GPUs at full fleet."""
        if self.reserved_concurrency:
            return self.reserved_concurrency
        gpus = (self.fleet.max_size or 0) * (self.fleet.gpus_per_instance or 0)
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
    service, code, name = GPU_QUOTA
    quota = read_quota(quotas, service, code)
    fleet = capacity.fleet
    need = (
        f"need {capacity.gpu_vcpus} vCPUs ({fleet.max_size} x {fleet.instance_type}, "
        f"{fleet.vcpus_per_instance} each); {quota.describe()}"
    )
    if quota.value < capacity.gpu_vcpus:
        raise CheckFailed(
            f"{need}: no GPU host can launch beyond it; request {name!r} ({service} {code}) "
            f"of at least {capacity.gpu_vcpus} vCPUs in Service Quotas"
        )
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
