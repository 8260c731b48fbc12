"""``chipscale verify --preflight``: before ``cdk deploy``, the account conditions that would
make the deploy or its first run fail, one named check each.

No stack need exist: the plan comes from cdk.json's context and ``-c`` overrides, read as the
CDK app reads them (``stacks.config``), and the checks read the account: the G and VT vCPU
quota against the full fleet, the Lambda concurrency left against the planned concurrency, an
RDS proxy already holding the stack's proxy name, a model archive the hosts would not find,
and an AMI whose NVIDIA driver is older than the torch build needs. Clients are handed in.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Final

from botocore.exceptions import ClientError

from chipscale import names
from chipscale.ops.aws import Fleet, aws_reason, error_code
from chipscale.ops.aws_checks import GPU_QUOTA, LAMBDA_HEADROOM, Capacity, read_quota
from chipscale.ops.checks import CHECK_GPU_QUOTA, Check, CheckFailed, CheckResult
from chipscale.ops.wheelhouse import min_driver_for_torch

CHECK_LAMBDA_LIMIT: Final = "Lambda concurrency limit"
CHECK_PROXY_NAME: Final = "RDS proxy name"
CHECK_MODEL_ARCHIVE: Final = "model archive"
CHECK_AMI_DRIVER: Final = "AMI driver vs torch"
#: Where the hosts look for an archive the deploy does not upload (``modelArchive`` empty).
DEFAULT_ARCHIVE_KEY: Final = "models/{model_name}.mar"
_GROUP_TAG: Final = "aws:autoscaling:groupName"
#: How AMI names and descriptions state the driver ("NVIDIA driver version: 570.133.20",
#: "Nvidia Driver 580.65.06", "driver-570").
_DRIVER = re.compile(r"(?i)\bdriver(?:\s+version)?[\s:=-]*(\d{3}(?:\.\d+){0,2})\b")


@dataclass(frozen=True, slots=True)
class Plan:
    """What the stack would deploy, from its config."""

    stack_name: str
    region: str
    instance_type: str
    max_instances: int
    per_gpu_concurrency: int
    max_concurrency: int
    reserved_concurrency: int
    model_name: str
    #: The .mar the deploy uploads (None: the hosts read DEFAULT_ARCHIVE_KEY, uploaded by hand).
    model_archive: Path | None
    ami_parameter: str
    #: A pinned AMI id ("" when the parameter is read).
    ami_id: str
    torch_version: str

    @property
    def proxy_name(self) -> str:
        return names.db_proxy_name(self.stack_name)

    @property
    def asg_name(self) -> str:
        return f"{self.stack_name}-gpu-fleet"


def load_plan(cdk_json: Path, overrides: Mapping[str, str]) -> Plan:
    """The plan from ``cdk_json``'s context and ``-c key=value`` overrides, validated as the
    CDK app validates them (a bad value raises its ConfigError naming every key)."""
    root = str(cdk_json.resolve().parent)
    if root not in sys.path:  # stacks/ lives beside cdk.json, not in the installed package
        sys.path.insert(0, root)
    from stacks.config import DeploymentConfig, load_cdk_json_context

    context = load_cdk_json_context(cdk_json) | dict(overrides)
    config = DeploymentConfig.from_context(context.get)
    return Plan(
        stack_name=config.stack_name,
        region=config.region,
        instance_type=config.instance_type,
        max_instances=config.max_instances,
        per_gpu_concurrency=config.per_gpu_concurrency,
        max_concurrency=config.max_concurrency,
        reserved_concurrency=config.reserved_concurrency,
        model_name=config.model_name,
        model_archive=config.model_archive_path if config.model_archive else None,
        ami_parameter=config.ami_parameter,
        ami_id=config.ami_id,
        torch_version=config.torch_version,
    )


def preflight_checks(plan: Plan, session: Any) -> list[Check]:
    """Every preflight check, with clients of ``session`` (in the plan's region)."""
    client = cache(lambda service: session.client(service, region_name=plan.region))

    @cache
    def stack() -> Mapping[str, Any] | None:
        return existing_stack(client("cloudformation"), plan.stack_name)

    return [
        Check(
            CHECK_GPU_QUOTA,
            lambda: check_gpu_quota(client("ec2"), client("service-quotas"), plan),
        ),
        Check(
            CHECK_LAMBDA_LIMIT,
            lambda: check_lambda_limit(client("lambda"), client("ec2"), plan, stack()),
        ),
        Check(CHECK_PROXY_NAME, lambda: check_proxy_name(client("rds"), plan, stack())),
        Check(CHECK_MODEL_ARCHIVE, lambda: check_model_archive(client("s3"), plan, stack())),
        Check(CHECK_AMI_DRIVER, lambda: check_ami_driver(client("ssm"), client("ec2"), plan)),
    ]


def existing_stack(cloudformation: Any, name: str) -> Mapping[str, Any] | None:
    """The stack's description, or None before its first deploy."""
    try:
        return dict(cloudformation.describe_stacks(StackName=name)["Stacks"][0])
    except ClientError as exc:
        if error_code(exc) == "ValidationError" and "does not exist" in str(exc):
            return None
        raise CheckFailed(f"stack {name}: {aws_reason(exc)}") from exc


def _outputs(stack: Mapping[str, Any] | None) -> dict[str, str]:
    return {o["OutputKey"]: o["OutputValue"] for o in (stack or {}).get("Outputs", [])}


def planned_fleet(ec2: Any, plan: Plan) -> Fleet:
    """The fleet at full size, with EC2's vCPUs and GPUs of the instance type."""
    try:
        (info,) = ec2.describe_instance_types(InstanceTypes=[plan.instance_type])["InstanceTypes"]
    except (ClientError, ValueError) as exc:
        raise CheckFailed(f"{plan.instance_type} is not offered in {plan.region}") from exc
    gpus = sum(int(g.get("Count", 0)) for g in info.get("GpuInfo", {}).get("Gpus", []))
    return Fleet(
        asg_name=plan.asg_name,
        max_size=plan.max_instances,
        instance_type=plan.instance_type,
        vcpus_per_instance=int(info["VCpuInfo"]["DefaultVCpus"]),
        gpus_per_instance=gpus,
    )


def running_gpu_vcpus(ec2: Any, exclude_group: str) -> int:
    """vCPUs of the G and VT instances already running in the region, outside ``exclude_group``
    (the quota counts them all, by their types' vCPUs)."""
    types: list[str] = []
    paginator = ec2.get_paginator("describe_instances")
    states = [{"Name": "instance-state-name", "Values": ["pending", "running"]}]
    for page in paginator.paginate(Filters=states):
        for reservation in page.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                kind = str(instance.get("InstanceType", ""))
                if kind.startswith(("g", "vt")) and tags.get(_GROUP_TAG) != exclude_group:
                    types.append(kind)
    if not types:
        return 0
    described = ec2.describe_instance_types(InstanceTypes=sorted(set(types)))["InstanceTypes"]
    vcpus = {str(i["InstanceType"]): int(i["VCpuInfo"]["DefaultVCpus"]) for i in described}
    return sum(vcpus.get(kind, 0) for kind in types)


def check_gpu_quota(ec2: Any, quotas: Any, plan: Plan) -> CheckResult:
    """The "Running On-Demand G and VT instances" quota, less what already runs, fits
    maxInstances x the instance type's vCPUs."""
    fleet = planned_fleet(ec2, plan)
    need = Capacity(fleet, None, None, None).gpu_vcpus
    service, code, _ = GPU_QUOTA
    quota = read_quota(quotas, service, code)
    in_use = running_gpu_vcpus(ec2, plan.asg_name)
    detail = (
        f"need {need} vCPUs ({plan.max_instances} x {plan.instance_type}, "
        f"{fleet.vcpus_per_instance} each); {quota.describe()}, {in_use} in use elsewhere"
    )
    if quota.value - in_use < need:
        raise CheckFailed(
            f"{detail}: request {service} {code} ({GPU_QUOTA[2]}) of at least {need + in_use} "
            "in Service Quotas before deploying (new accounts often have 0), or lower "
            "maxInstances"
        )
    return CheckResult(CHECK_GPU_QUOTA, True, detail)


def check_lambda_limit(
    lambda_client: Any, ec2: Any, plan: Plan, stack: Mapping[str, Any] | None
) -> CheckResult:
    """GetAccountSettings' unreserved concurrency covers the worker's planned ceiling plus
    headroom (with a reservation: the reservation plus the 100 Lambda keeps unreserved)."""
    fleet = planned_fleet(ec2, plan)
    capacity = Capacity(
        fleet, plan.per_gpu_concurrency, plan.max_concurrency, plan.reserved_concurrency
    )
    try:
        limit = lambda_client.get_account_settings()["AccountLimit"]
    except ClientError as exc:
        raise CheckFailed(f"GetAccountSettings: {aws_reason(exc)}") from exc
    total = int(limit["ConcurrentExecutions"])
    unreserved = int(limit["UnreservedConcurrentExecutions"])
    own = _own_reservation(lambda_client, stack)  # a redeploy: the worker's own counts again
    available = unreserved + own
    if plan.reserved_concurrency:
        why = f"{plan.reserved_concurrency} reserved for the worker + 100 left unreserved"
    else:
        why = f"worker up to {capacity.worker_concurrency} + {LAMBDA_HEADROOM} headroom"
    detail = (
        f"need {capacity.lambda_executions} ({why}); account limit {total}, {available} unreserved"
    )
    if available < capacity.lambda_executions:
        raise CheckFailed(
            f"{detail}: request lambda L-B99A9384 (Concurrent executions) in Service Quotas "
            "(new accounts have 10), or lower perGpuConcurrency/maxInstances; until then the "
            "worker is throttled and its messages spend their receives"
        )
    return CheckResult(CHECK_LAMBDA_LIMIT, True, detail)


def _own_reservation(lambda_client: Any, stack: Mapping[str, Any] | None) -> int:
    worker = _outputs(stack).get(names.OUTPUT_WORKER_FUNCTION)
    if not worker:
        return 0
    try:
        answer = lambda_client.get_function_concurrency(FunctionName=worker)
    except ClientError:
        return 0
    return int(answer.get("ReservedConcurrentExecutions") or 0)


def check_proxy_name(rds: Any, plan: Plan, stack: Mapping[str, Any] | None) -> CheckResult:
    """No RDS proxy of another stack holds the name (proxy names are unique per account and
    region): CloudFormation would fail the create, and roll the whole stack back."""
    name = plan.proxy_name
    try:
        proxies = rds.describe_db_proxies(DBProxyName=name)["DBProxies"]
    except ClientError as exc:
        if error_code(exc) == "DBProxyNotFoundFault":
            return CheckResult(CHECK_PROXY_NAME, True, f"{name}: free")
        raise CheckFailed(f"{name}: {aws_reason(exc)}") from exc
    if not proxies:
        return CheckResult(CHECK_PROXY_NAME, True, f"{name}: free")
    endpoint = str(proxies[0].get("Endpoint", ""))
    if stack is not None and endpoint and endpoint in _outputs(stack).values():
        return CheckResult(CHECK_PROXY_NAME, True, f"{name}: this stack's own")
    raise CheckFailed(
        f"an RDS proxy named {name} already exists in {plan.region} and is not stack "
        f"{plan.stack_name}'s: deploy under another stackName (-c stackName=...) or delete it"
    )


def check_model_archive(s3: Any, plan: Plan, stack: Mapping[str, Any] | None) -> CheckResult:
    """The hosts will find an archive: the one the deploy uploads, or the one uploaded by hand
    to the key they read. Without either, every host boots, finds nothing and is replaced."""
    if plan.model_archive is not None:
        if not plan.model_archive.is_file():
            raise CheckFailed(f"modelArchive {plan.model_archive} does not exist")
        size = plan.model_archive.stat().st_size
        return CheckResult(
            CHECK_MODEL_ARCHIVE, True, f"{plan.model_archive.name} ({size:,} B), uploaded at deploy"
        )
    key = DEFAULT_ARCHIVE_KEY.format(model_name=plan.model_name)
    bucket = _outputs(stack).get(names.OUTPUT_MODEL_BUCKET)
    if not bucket:
        raise CheckFailed(
            f"modelArchive is empty and stack {plan.stack_name} does not exist yet: its model "
            f"bucket would be created empty and every GPU host would look for {key} in vain. "
            "Deploy with -c modelArchive=PATH.mar"
        )
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if error_code(exc) in {"404", "NoSuchKey", "NotFound"}:
            raise CheckFailed(
                f"s3://{bucket}/{key} does not exist: upload the archive there, or deploy with "
                "-c modelArchive=PATH.mar"
            ) from exc
        raise CheckFailed(f"s3://{bucket}/{key}: {aws_reason(exc)}") from exc
    return CheckResult(
        CHECK_MODEL_ARCHIVE, True, f"s3://{bucket}/{key} ({int(head['ContentLength']):,} B)"
    )


def ami_driver(image: Mapping[str, Any]) -> str:
    """The NVIDIA driver version an AMI's description or name states ("" when neither does).

    >>> ami_driver({"Description": "Supported EC2 instances: G5, G6. NVIDIA driver version: "
    ...             "570.133.20, CUDA 12.8", "Name": "Deep Learning Base AMI 20250523"})
    '570.133.20'
    """
    for text in (image.get("Description") or "", image.get("Name") or ""):
        match = _DRIVER.search(str(text))
        if match:
            return match[1]
    return ""


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def check_ami_driver(ssm: Any, ec2: Any, plan: Plan) -> CheckResult:
    """The AMI the hosts would boot has a driver at least the one PyPI's torch build needs."""
    ami = plan.ami_id
    if not ami:
        try:
            ami = ssm.get_parameter(Name=plan.ami_parameter)["Parameter"]["Value"]
        except ClientError as exc:
            raise CheckFailed(f"amiParameter {plan.ami_parameter}: {aws_reason(exc)}") from exc
    try:
        images = ec2.describe_images(ImageIds=[ami])["Images"]
    except ClientError as exc:
        raise CheckFailed(f"AMI {ami}: {aws_reason(exc)}") from exc
    if not images:
        raise CheckFailed(f"AMI {ami} is not visible in {plan.region}")
    image = images[0]
    described = f"{ami} ({image.get('Name', '?')})"
    need = min_driver_for_torch(plan.torch_version)
    driver = ami_driver(image)
    if not need:
        return CheckResult(
            CHECK_AMI_DRIVER, True, f"{described}; no known CUDA build of torch "
            f"{plan.torch_version}: the boot checks the driver"
        )  # fmt: skip
    if not driver:
        return CheckResult(
            CHECK_AMI_DRIVER, True, f"{described} names no driver version; torch "
            f"{plan.torch_version} needs >= {need}: the boot checks it before installing"
        )  # fmt: skip
    detail = f"{described}: driver {driver}; torch {plan.torch_version} needs >= {need}"
    if _version(driver) < _version(need):
        raise CheckFailed(
            f"{detail}: every boot would abandon. Pin a newer AMI (amiId / amiParameter) or "
            "deploy a torch built for the CUDA this driver runs"
        )
    return CheckResult(CHECK_AMI_DRIVER, True, detail)
