"""What the operator tools read from AWS in common: error text, queue names, quick clients,
and the GPU fleet (one :class:`Fleet`, one :func:`read_fleet`).

"In service" is the fleet controller's definition, shared by ``monitor`` and ``verify``:
InService and Healthy in Auto Scaling and, when the model's target group is known, a
``healthy`` target in it. Clients are handed in; boto3 is imported only by what calls AWS.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from chipscale.errors import ChipscaleError, one_line

#: The most characters of AWS's words in a one-line error.
MAX_REASON_CHARS = 200


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ClientError ('' when it has none, or for other errors)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return ""
    return str(response.get("Error", {}).get("Code", ""))


def aws_reason(exc: BaseException) -> str:
    """AWS's error code and message on one line of at most 200 characters; an endpoint's HTML
    error page (a proxy's, or moto's answer to an action it lacks) becomes its HTTP status."""
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping) and "Error" in response:
        error = response.get("Error", {})
        code = str(error.get("Code", "")) or "error"
        message = " ".join(str(error.get("Message", "")).split())
        if message.startswith("<") or "<html" in message.lower():
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            text = f"{code}: HTTP {status} from the endpoint (an HTML error page)"
        else:
            text = f"{code}: {message}" if message and message != code else code
    else:
        text = one_line(exc)
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def queue_name(url_or_arn: str) -> str:
    """The queue's name (CloudWatch's ``QueueName`` dimension), the last part of its URL or ARN.

    >>> queue_name("https://sqs.us-east-1.amazonaws.com/123456789012/chipscale-dlq")
    'chipscale-dlq'
    >>> queue_name("arn:aws:sqs:us-east-1:123456789012:chipscale-dlq")
    'chipscale-dlq'
    """
    return url_or_arn.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]


def quick_client(session: Any, service: str, *, read_timeout: float = 30.0) -> Any:
    """A boto3 client with few retries and short timeouts: a smoke test or a monitor
    refreshing every few seconds reports a failing call in seconds, not after the SDK's
    backoff."""
    from botocore.config import Config

    config = Config(
        connect_timeout=5,
        read_timeout=read_timeout,
        retries={"max_attempts": 2, "mode": "standard"},
    )
    return session.client(service, config=config)


class FleetError(ChipscaleError):
    """The GPU fleet cannot be read or used: a resource is missing or misconfigured."""


class FleetNotFoundError(FleetError, LookupError):
    """The Auto Scaling group or the event source mapping named does not exist."""


class FleetConfigError(FleetError, ValueError):
    """A setting of the fleet controller (GPUs per instance, per-GPU concurrency) is invalid."""


class Elbv2Client(Protocol):
    """The one Elastic Load Balancing call a fleet read makes (a boto3 ``elbv2`` client)."""

    exceptions: Any

    def describe_target_health(self, **kwargs: Any) -> dict[str, Any]: ...


class AutoScalingClient(Protocol):
    """The one Auto Scaling call a fleet read makes (a boto3 ``autoscaling`` client)."""

    def describe_auto_scaling_groups(self, **kwargs: Any) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Instance:
    """One GPU instance of the group (or one that left it within the window)."""

    instance_id: str
    instance_type: str | None
    #: GPUs of its type as EC2 describes it (0 when EC2 was not read).
    gpus: int
    #: Auto Scaling's LifecycleState (None: no longer in the group).
    lifecycle_state: str | None
    health: str | None
    #: EC2's state (running, shutting-down, terminated ...), None if EC2 did not say.
    ec2_state: str | None
    private_ip: str | None
    #: Routed to by the load balancer (see the module docstring).
    in_service: bool


@dataclass(frozen=True, slots=True)
class Fleet:
    """The GPU Auto Scaling group: its bounds, its instances and, when read, the instance
    type of its launch template with that type's vCPUs and GPUs."""

    asg_name: str | None
    min_size: int | None = None
    max_size: int | None = None
    desired: int | None = None
    instances: tuple[Instance, ...] = ()
    #: False when the group could not be read: no GPU count, rather than zero GPUs.
    known: bool = True
    instance_type: str | None = None
    vcpus_per_instance: int | None = None
    gpus_per_instance: int | None = None

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


def healthy_targets(elbv2: Elbv2Client, target_group_arn: str) -> frozenset[str]:
    """Ids of the targets of ``target_group_arn`` whose state is ``healthy``: the ones the load
    balancer routes to (``initial``, ``unhealthy``, ``draining``, ``unused`` ... are not)."""
    try:
        answer = elbv2.describe_target_health(TargetGroupArn=target_group_arn)
    except elbv2.exceptions.TargetGroupNotFoundException:
        raise FleetNotFoundError(f"target group {target_group_arn!r} not found") from None
    return frozenset(
        str(description["Target"]["Id"])
        for description in answer.get("TargetHealthDescriptions", [])
        if description.get("TargetHealth", {}).get("State") == "healthy"
    )


def read_fleet(
    autoscaling: AutoScalingClient,
    asg_name: str,
    *,
    elbv2: Elbv2Client | None = None,
    target_group_arn: str | None = None,
    ec2: Any = None,
    ec2_instances: bool = False,
    launch_type: bool = False,
) -> Fleet:
    """The group ``asg_name``, its members and which are in service (a ``healthy`` target of
    ``target_group_arn`` too, when given with an ``elbv2`` client; read only when some member
    is InService and Healthy).

    With ``ec2``: ``ec2_instances`` adds EC2's view (type, state, private IP, GPUs; and the
    instances that left the group but EC2 still lists); ``launch_type`` reads the instance
    type of the group's launch template, with its vCPUs and GPUs.
    """
    if target_group_arn and elbv2 is None:
        raise FleetConfigError("an elbv2 client is needed to read the target group's health")
    groups = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[asg_name])[
        "AutoScalingGroups"
    ]
    if not groups:
        raise FleetNotFoundError(f"Auto Scaling group {asg_name!r} not found")
    group = groups[0]
    members = {str(i["InstanceId"]): i for i in group.get("Instances", [])}
    candidates = {
        instance_id
        for instance_id, member in members.items()
        if member.get("LifecycleState") == "InService" and member.get("HealthStatus") == "Healthy"
    }
    if candidates and target_group_arn and elbv2 is not None:
        candidates &= healthy_targets(elbv2, target_group_arn)
    described: dict[str, Mapping[str, Any]] = {}
    gpus_of: dict[str, int] = {}
    if ec2_instances:
        described = _tagged_instances(ec2, asg_name)
        kinds = [*members.values(), *described.values()]
        gpus_of = gpu_counts(ec2, (str(i["InstanceType"]) for i in kinds if i.get("InstanceType")))
    instances = []
    for instance_id in sorted(set(members) | set(described)):
        member = members.get(instance_id, {})
        seen = described.get(instance_id, {})
        kind = seen.get("InstanceType") or member.get("InstanceType")
        instances.append(
            Instance(
                instance_id=instance_id,
                instance_type=kind,
                gpus=gpus_of.get(str(kind), 0),
                lifecycle_state=member.get("LifecycleState"),
                health=member.get("HealthStatus"),
                ec2_state=(seen.get("State") or {}).get("Name"),
                private_ip=seen.get("PrivateIpAddress"),
                in_service=instance_id in candidates,
            )
        )
    fleet = Fleet(
        asg_name=asg_name,
        min_size=group.get("MinSize"),
        max_size=group.get("MaxSize"),
        desired=group.get("DesiredCapacity"),
        instances=tuple(instances),
    )
    if launch_type:
        fleet = _with_launch_type(fleet, group, ec2)
    return fleet


def _tagged_instances(ec2: Any, asg_name: str) -> dict[str, Mapping[str, Any]]:
    """EC2's description of every instance tagged with the group, members or not."""
    described: dict[str, Mapping[str, Any]] = {}
    paginator = ec2.get_paginator("describe_instances")
    for page in paginator.paginate(
        Filters=[{"Name": "tag:aws:autoscaling:groupName", "Values": [asg_name]}]
    ):
        for reservation in page.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                described[str(instance["InstanceId"])] = instance
    return described


def gpu_counts(ec2: Any, instance_types: Iterable[str]) -> dict[str, int]:
    """GPUs per instance type, as EC2 describes the types (0 for a type without GPUs)."""
    wanted = sorted(set(instance_types))
    if not wanted:
        return {}
    counts = {}
    for info in ec2.describe_instance_types(InstanceTypes=wanted)["InstanceTypes"]:
        counts[str(info["InstanceType"])] = _gpus(info)
    return counts


def _gpus(info: Mapping[str, Any]) -> int:
    return sum(int(g.get("Count", 0)) for g in info.get("GpuInfo", {}).get("Gpus", []))


def _with_launch_type(fleet: Fleet, group: Mapping[str, Any], ec2: Any) -> Fleet:
    """``fleet`` with its launch template's instance type, and that type's vCPUs and GPUs."""
    from dataclasses import replace

    instance_type = _launch_instance_type(ec2, group)
    described = ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"]
    if not described:
        raise FleetError(f"EC2 does not know instance type {instance_type} in this region")
    info = described[0]
    return replace(
        fleet,
        min_size=int(group["MinSize"]),
        max_size=int(group["MaxSize"]),
        desired=int(group["DesiredCapacity"]),
        instance_type=instance_type,
        vcpus_per_instance=int(info["VCpuInfo"]["DefaultVCpus"]),
        gpus_per_instance=_gpus(info),
    )


def _launch_instance_type(ec2: Any, group: Mapping[str, Any]) -> str:
    """The group's instance type: its mixed-instances override, else its launch template's."""
    mixed = group.get("MixedInstancesPolicy", {}).get("LaunchTemplate", {})
    for override in mixed.get("Overrides", []):
        if override.get("InstanceType"):
            return str(override["InstanceType"])
    spec = group.get("LaunchTemplate") or mixed.get("LaunchTemplateSpecification")
    if not spec:
        raise FleetError(
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
        raise FleetError(f"launch template {selector} names no instance type")
    return str(instance_type)
