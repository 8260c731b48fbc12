"""The fleet controller: Lambda concurrency follows the GPUs in service.

The rule is a pure function, checked on a table and with Hypothesis. ``sync`` runs against a
real moto server (Auto Scaling group from a launch template attached to an ELBv2 target group,
SQS queue, Lambda function and its event source mapping, SSM parameter). What moto reports for
target health: an instance of the group is registered and ``healthy`` at once, a deregistered
one ``unused`` (Target.NotRegistered); it never reports ``initial``. Three things moto cannot
show are pinned with recorded responses through botocore's Stubber: an instance held in
``Pending:Wait`` by the launch lifecycle hook (moto puts instances InService at once and does
not implement CompleteLifecycleAction), a target still ``initial`` after the hook let its
instance in (the load balancer answers 503 for it), and a mapping in a transition (moto's
mappings switch state instantly, so they never answer ``Updating`` or
``ResourceInUseException``). moto lacks GetAccountSettings: the fleet's Lambda client answers
it from a recorded response of an established account (1,000 unreserved), so the account's
ceiling never binds here (tests/test_account_concurrency.py tests it).
"""

from __future__ import annotations

import io
import json
import sys
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
from botocore.stub import ANY, Stubber
from conftest import ROOT
from hypothesis import example, given
from hypothesis import strategies as st
from lambda_account import RecordedAccount, recorded_account_settings

from chipscale import names
from chipscale.ops import aws_checks
from chipscale.ops import checks as verify_module
from chipscale.ops.fleet import (
    MAX_MAXIMUM_CONCURRENCY,
    MIN_MAXIMUM_CONCURRENCY,
    DesiredMapping,
    FleetConfigError,
    FleetNotFoundError,
    FleetSettings,
    count_in_service,
    desired_mapping,
    mapping_changes,
    sync,
)

# ------------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("gpus", "per_gpu", "expected"),
    [
        (0, 8, DesiredMapping(enabled=False, maximum_concurrency=None)),
        (0, 1000, DesiredMapping(enabled=False, maximum_concurrency=None)),
        (1, 8, DesiredMapping(enabled=True, maximum_concurrency=8)),
        (4, 8, DesiredMapping(enabled=True, maximum_concurrency=32)),
        (1, 1, DesiredMapping(enabled=True, maximum_concurrency=2)),  # AWS's floor
        (2, 1, DesiredMapping(enabled=True, maximum_concurrency=2)),
        (125, 8, DesiredMapping(enabled=True, maximum_concurrency=1000)),
        (126, 8, DesiredMapping(enabled=True, maximum_concurrency=1000)),  # AWS's ceiling
        (64, 64, DesiredMapping(enabled=True, maximum_concurrency=1000)),
    ],
)
def test_desired_mapping_table(gpus: int, per_gpu: int, expected: DesiredMapping) -> None:
    assert desired_mapping(gpus, per_gpu) == expected


@pytest.mark.parametrize(
    ("gpus", "per_gpu", "reserved", "expected"),
    [
        (0, 8, 20, DesiredMapping(enabled=False, maximum_concurrency=None)),
        (2, 8, 20, DesiredMapping(enabled=True, maximum_concurrency=16)),  # under the cap
        (4, 8, 20, DesiredMapping(enabled=True, maximum_concurrency=20)),  # capped
        (1, 1, 2, DesiredMapping(enabled=True, maximum_concurrency=2)),  # AWS's floor
        (200, 8, 5000, DesiredMapping(enabled=True, maximum_concurrency=1000)),  # AWS's ceiling
        (4, 8, None, DesiredMapping(enabled=True, maximum_concurrency=32)),  # none reserved
    ],
)
def test_desired_mapping_never_exceeds_reserved_concurrency(
    gpus: int, per_gpu: int, reserved: int | None, expected: DesiredMapping
) -> None:
    assert desired_mapping(gpus, per_gpu, reserved) == expected


@given(gpus=st.integers(1, 500), per_gpu=st.integers(1, 100), reserved=st.integers(2, 2000))
def test_enabled_concurrency_stays_within_the_reservation(
    gpus: int, per_gpu: int, reserved: int
) -> None:
    """An event source above the worker's reserved concurrency is throttled, and every
    throttled batch goes back to the queue with a receive spent: never ask for more."""
    concurrency = desired_mapping(gpus, per_gpu, reserved).maximum_concurrency
    assert concurrency is not None
    assert MIN_MAXIMUM_CONCURRENCY <= concurrency <= min(reserved, MAX_MAXIMUM_CONCURRENCY)


@pytest.mark.parametrize(
    ("gpus", "per_gpu", "reserved"),
    [(-1, 8, None), (1, 0, None), (1, -3, None), (1, 8, 1), (0, 8, 0)],
)
def test_desired_mapping_rejects_nonsense(gpus: int, per_gpu: int, reserved: int | None) -> None:
    with pytest.raises(FleetConfigError):
        desired_mapping(gpus, per_gpu, reserved)


@given(gpus=st.integers(1, 10_000), per_gpu=st.integers(1, 10_000))
@example(gpus=1, per_gpu=1)
@example(gpus=1000, per_gpu=1)
def test_enabled_concurrency_is_product_within_aws_range(gpus: int, per_gpu: int) -> None:
    desired = desired_mapping(gpus, per_gpu)
    assert desired.enabled
    assert desired.maximum_concurrency is not None
    assert MIN_MAXIMUM_CONCURRENCY <= desired.maximum_concurrency <= MAX_MAXIMUM_CONCURRENCY
    if MIN_MAXIMUM_CONCURRENCY <= gpus * per_gpu <= MAX_MAXIMUM_CONCURRENCY:
        assert desired.maximum_concurrency == gpus * per_gpu
    # One more GPU never lowers the concurrency.
    more = desired_mapping(gpus + 1, per_gpu).maximum_concurrency
    assert more is not None
    assert more >= desired.maximum_concurrency


STATES = ["Enabled", "Disabled", "Enabling", "Disabling", "Updating", "Creating"]


@given(
    state=st.sampled_from(STATES),
    current=st.none() | st.integers(2, 1000),
    gpus=st.integers(0, 300),
    per_gpu=st.integers(1, 50),
)
@example(state="Enabled", current=32, gpus=4, per_gpu=8)
def test_changes_converge_in_one_step(
    state: str, current: int | None, gpus: int, per_gpu: int
) -> None:
    """Applying the changes gives a mapping for which no further change is asked."""
    desired = desired_mapping(gpus, per_gpu)
    changes = mapping_changes(state, current, desired)
    if "Enabled" in changes:
        state = "Enabled" if changes["Enabled"] else "Disabled"
    if "ScalingConfig" in changes:
        current = changes["ScalingConfig"]["MaximumConcurrency"]
    assert mapping_changes(state, current, desired) == {}
    if not desired.enabled:
        assert "ScalingConfig" not in changes  # a disabled mapping's concurrency is kept


# ------------------------------------------------------------------------------- moto

GPUS_PER_INSTANCE = 4
PER_GPU_DEFAULT = 8


@dataclass
class Fleet:
    """An Auto Scaling group, a queue, a worker function and its mapping, in moto."""

    autoscaling: Any
    lambda_client: Any
    ssm: Any
    elbv2: Any
    asg_name: str
    mapping_uuid: str
    parameter: str
    target_group_arn: str
    updates: list[dict[str, Any]] = field(default_factory=list)
    #: What GetAccountSettings answers on ``lambda_client`` (moto does not implement it).
    account: RecordedAccount = field(default_factory=RecordedAccount)

    def sync(
        self,
        parameter: str | None = None,
        *,
        target_group: bool = True,
        reserved: int | None = None,
        **clients: Any,
    ) -> Any:
        """One controller run with this fleet's names and moto clients (or ``clients``),
        counting healthy targets of the group's target group unless ``target_group`` is off."""
        chosen = {"autoscaling": self.autoscaling, "lambda_client": self.lambda_client}
        chosen |= {"ssm": self.ssm, "elbv2": self.elbv2} | clients
        return sync(
            self.asg_name,
            self.mapping_uuid,
            GPUS_PER_INSTANCE,
            self.parameter if parameter is None else parameter,
            PER_GPU_DEFAULT,
            target_group_arn=self.target_group_arn if target_group else None,
            reserved_concurrency=reserved,
            **chosen,
        )

    def target_states(self) -> dict[str, str]:
        answer = self.elbv2.describe_target_health(TargetGroupArn=self.target_group_arn)
        return {
            d["Target"]["Id"]: d["TargetHealth"]["State"]
            for d in answer["TargetHealthDescriptions"]
        }

    def mapping(self) -> tuple[str, int | None]:
        answer = self.lambda_client.get_event_source_mapping(UUID=self.mapping_uuid)
        return answer["State"], (answer.get("ScalingConfig") or {}).get("MaximumConcurrency")

    def scale(self, instances: int) -> list[str]:
        self.autoscaling.set_desired_capacity(
            AutoScalingGroupName=self.asg_name, DesiredCapacity=instances
        )
        group = self.autoscaling.describe_auto_scaling_groups(
            AutoScalingGroupNames=[self.asg_name]
        )["AutoScalingGroups"][0]
        return [instance["InstanceId"] for instance in group["Instances"]]


def worker_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("worker.py", "def handler(event, context):\n    return {}\n")
    return buffer.getvalue()


@pytest.fixture
def fleet(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Fleet:
    """A fresh fleet in moto, with unique names (the moto server is shared by the session):
    an empty Auto Scaling group from a g5 launch template, attached to a target group as the
    stack's group is to the model's, and an enabled event source mapping from an SQS queue to
    a worker function (creating a function in moto needs no Docker)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    suffix = uuid.uuid4().hex[:10]
    ec2 = boto3.client("ec2", endpoint_url=moto_server)
    autoscaling = boto3.client("autoscaling", endpoint_url=moto_server)
    lambda_client = boto3.client("lambda", endpoint_url=moto_server)
    sqs = boto3.client("sqs", endpoint_url=moto_server)
    iam = boto3.client("iam", endpoint_url=moto_server)
    ssm = boto3.client("ssm", endpoint_url=moto_server)
    elbv2 = boto3.client("elbv2", endpoint_url=moto_server)

    template = f"gpu-{suffix}"
    ec2.create_launch_template(  # moto does not check that the AMI exists
        LaunchTemplateName=template,
        LaunchTemplateData={"ImageId": "ami-0123456789abcdef0", "InstanceType": "g5.12xlarge"},
    )
    asg_name = f"chipscale-gpu-{suffix}"
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=asg_name,
        LaunchTemplate={"LaunchTemplateName": template, "Version": "$Latest"},
        MinSize=0,
        MaxSize=10,
        DesiredCapacity=0,
        AvailabilityZones=["us-east-1a"],
    )
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]
    target_group_arn = elbv2.create_target_group(
        Name=f"tg-{suffix}",
        Protocol="HTTP",
        Port=names.INFERENCE_PORT,
        VpcId=vpc["VpcId"],
        TargetType="instance",
        HealthCheckPath="/ping",
    )["TargetGroups"][0]["TargetGroupArn"]
    autoscaling.attach_load_balancer_target_groups(
        AutoScalingGroupName=asg_name, TargetGroupARNs=[target_group_arn]
    )
    role = iam.create_role(
        RoleName=f"worker-{suffix}",
        AssumeRolePolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "lambda.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                    }
                ],
            }
        ),
    )["Role"]["Arn"]
    function = f"chipscale-worker-{suffix}"
    lambda_client.create_function(
        FunctionName=function,
        Runtime="python3.12",
        Role=role,
        Handler="worker.handler",
        Code={"ZipFile": worker_zip()},
    )
    queue_url = sqs.create_queue(QueueName=f"tiles-{suffix}")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    mapping = lambda_client.create_event_source_mapping(
        EventSourceArn=queue_arn,
        FunctionName=function,
        BatchSize=10,
        ScalingConfig={"MaximumConcurrency": 5},
        FunctionResponseTypes=["ReportBatchItemFailures"],  # as the stack's
    )
    result = Fleet(
        autoscaling=autoscaling,
        lambda_client=lambda_client,
        ssm=ssm,
        elbv2=elbv2,
        asg_name=asg_name,
        mapping_uuid=mapping["UUID"],
        parameter=f"/chipscale-{suffix}/per-gpu-concurrency",
        target_group_arn=target_group_arn,
        account=RecordedAccount().install(lambda_client),
    )
    # Count the writes the controller makes, on the real client: "nothing changed" must mean
    # no UpdateEventSourceMapping call at all.
    lambda_client.meta.events.register(
        "provide-client-params.lambda.UpdateEventSourceMapping",
        lambda params, **_: result.updates.append(dict(params)),
    )
    return result


def test_no_gpu_in_service_disables_the_mapping(fleet: Fleet) -> None:
    assert fleet.mapping() == ("Enabled", 5)
    result = fleet.sync()
    assert (result.instances_in_service, result.gpus_in_service) == (0, 0)
    assert result.action == "updated"
    assert result.changes == {"Enabled": False}
    assert fleet.mapping() == ("Disabled", 5)  # concurrency left for re-enabling to set


def test_gpus_in_service_enable_the_mapping_at_per_gpu_times_gpus(fleet: Fleet) -> None:
    fleet.sync()
    fleet.scale(3)
    result = fleet.sync()
    assert result.instances_in_service == 3
    assert result.gpus_in_service == 3 * GPUS_PER_INSTANCE
    assert result.per_gpu_source == "default"
    assert result.desired == DesiredMapping(enabled=True, maximum_concurrency=96)
    assert fleet.mapping() == ("Enabled", 3 * GPUS_PER_INSTANCE * PER_GPU_DEFAULT)

    fleet.scale(0)
    assert fleet.sync().changes == {"Enabled": False}
    assert fleet.mapping() == ("Disabled", 96)


def test_ssm_parameter_sets_the_per_gpu_concurrency(fleet: Fleet) -> None:
    fleet.scale(2)
    fleet.ssm.put_parameter(Name=fleet.parameter, Value="3", Type="String")
    result = fleet.sync()
    assert (result.per_gpu_concurrency, result.per_gpu_source) == (3, "parameter")
    assert fleet.mapping() == ("Enabled", 3 * 2 * GPUS_PER_INSTANCE)

    # What `chipscale tune --apply` does: change the parameter; the next run follows it.
    fleet.ssm.put_parameter(Name=fleet.parameter, Value="5", Type="String", Overwrite=True)
    result = fleet.sync()
    assert result.changes == {"ScalingConfig": {"MaximumConcurrency": 40}}
    assert fleet.mapping() == ("Enabled", 40)


@pytest.mark.parametrize("value", [None, "lots", "0", "-2"])
def test_missing_or_invalid_parameter_falls_back_to_the_default(
    fleet: Fleet, value: str | None
) -> None:
    if value is not None:
        fleet.ssm.put_parameter(Name=fleet.parameter, Value=value, Type="String")
    fleet.scale(1)
    result = fleet.sync()
    assert (result.per_gpu_concurrency, result.per_gpu_source) == (PER_GPU_DEFAULT, "default")
    assert len(result.warnings) == 1
    assert fleet.parameter in result.warnings[0]
    assert fleet.mapping() == ("Enabled", GPUS_PER_INSTANCE * PER_GPU_DEFAULT)


def test_no_parameter_configured_uses_the_default_silently(fleet: Fleet) -> None:
    fleet.scale(1)
    result = fleet.sync(parameter="")
    assert result.per_gpu_source == "default"
    assert result.warnings == ()


def test_second_sync_with_nothing_changed_makes_no_update_call(fleet: Fleet) -> None:
    fleet.scale(2)
    first = fleet.sync()
    assert first.action == "updated"
    assert len(fleet.updates) == 1
    assert fleet.updates[0]["ScalingConfig"] == {"MaximumConcurrency": 64}
    second = fleet.sync()
    assert second.action == "none"
    assert second.changes == {}
    assert len(fleet.updates) == 1  # no write at all


def test_unhealthy_and_standby_instances_are_not_in_service(fleet: Fleet) -> None:
    unhealthy, standby, _healthy = fleet.scale(3)
    fleet.autoscaling.set_instance_health(InstanceId=unhealthy, HealthStatus="Unhealthy")
    fleet.autoscaling.enter_standby(
        AutoScalingGroupName=fleet.asg_name,
        InstanceIds=[standby],
        ShouldDecrementDesiredCapacity=True,
    )
    result = fleet.sync()
    assert (result.instances_total, result.instances_in_service) == (3, 1)
    assert fleet.mapping() == ("Enabled", GPUS_PER_INSTANCE * PER_GPU_DEFAULT)


def test_only_healthy_targets_are_in_service(fleet: Fleet) -> None:
    """An instance InService in Auto Scaling but not a healthy target (here deregistered:
    moto reports it ``unused``) gets no Lambdas: the load balancer would not route to it."""
    routed, dropped = fleet.scale(2)
    assert fleet.target_states() == {routed: "healthy", dropped: "healthy"}  # moto: at once
    fleet.elbv2.deregister_targets(TargetGroupArn=fleet.target_group_arn, Targets=[{"Id": dropped}])
    assert fleet.target_states() == {routed: "healthy"}
    result = fleet.sync()
    assert (result.instances_total, result.instances_in_service) == (2, 1)
    assert result.target_group_arn == fleet.target_group_arn
    assert fleet.mapping() == ("Enabled", GPUS_PER_INSTANCE * PER_GPU_DEFAULT)
    # Auto Scaling's state alone (no target group) would have counted both.
    assert fleet.sync(target_group=False).instances_in_service == 2


def test_reserved_concurrency_caps_the_mapping(fleet: Fleet) -> None:
    fleet.scale(3)  # 3 x 4 GPUs x 8 = 96 wanted
    result = fleet.sync(reserved=20)
    assert result.desired == DesiredMapping(enabled=True, maximum_concurrency=20)
    assert result.reserved_concurrency == 20
    assert fleet.mapping() == ("Enabled", 20)


def test_missing_target_group_is_a_clear_error(fleet: Fleet) -> None:
    fleet.scale(1)
    missing = fleet.target_group_arn.replace("tg-", "gone-")
    with pytest.raises(FleetNotFoundError, match=r"target group .* not found"):
        count_in_service(
            fleet.autoscaling, fleet.asg_name, elbv2=fleet.elbv2, target_group_arn=missing
        )
    with pytest.raises(FleetConfigError, match="elbv2 client"):
        count_in_service(fleet.autoscaling, fleet.asg_name, target_group_arn=missing)


def test_verify_counts_in_service_as_the_controller_does(fleet: Fleet) -> None:
    """``chipscale verify`` reads the fleet with the controller's own count: an instance that
    is not a healthy target is not "in service" there either, so a mapping the controller
    left disabled passes the event source check instead of failing with "Disabled while 1
    GPU instances are in service"."""
    (instance,) = fleet.scale(1)
    fleet.elbv2.deregister_targets(
        TargetGroupArn=fleet.target_group_arn, Targets=[{"Id": instance}]
    )
    fleet.sync()  # the controller: no GPU in service, mapping disabled
    assert fleet.mapping()[0] == "Disabled"
    ec2 = boto3.client("ec2")
    seen = aws_checks.read_deployed_fleet(
        fleet.autoscaling,
        ec2,
        fleet.asg_name,
        elbv2=fleet.elbv2,
        target_group_arn=fleet.target_group_arn,
    )
    assert seen.instances_in_service == 0
    queue_url = _mapping_queue_url(fleet)
    (result,) = verify_module.run_checks(
        [
            verify_module.Check(
                verify_module.CHECK_EVENT_SOURCE,
                lambda: aws_checks.check_event_source(
                    fleet.lambda_client, fleet.mapping_uuid, queue_url, seen
                ),
            )
        ]
    )
    assert result.ok, result.detail
    # Without the target group (an older stack), Auto Scaling's state alone counts it.
    seen = aws_checks.read_deployed_fleet(fleet.autoscaling, ec2, fleet.asg_name)
    assert seen.instances_in_service == 1


def _mapping_queue_url(fleet: Fleet) -> str:
    arn = fleet.lambda_client.get_event_source_mapping(UUID=fleet.mapping_uuid)["EventSourceArn"]
    return boto3.client("sqs").get_queue_url(QueueName=arn.rsplit(":", 1)[-1])["QueueUrl"]


def test_missing_group_or_mapping_is_a_clear_error(fleet: Fleet) -> None:
    with pytest.raises(FleetNotFoundError, match="Auto Scaling group 'no-such-group' not found"):
        sync(
            "no-such-group",
            fleet.mapping_uuid,
            1,
            None,
            1,
            autoscaling=fleet.autoscaling,
            lambda_client=fleet.lambda_client,
            ssm=fleet.ssm,
        )
    missing = str(uuid.uuid4())
    with pytest.raises(FleetNotFoundError, match=f"event source mapping '{missing}' not found"):
        sync(
            fleet.asg_name,
            missing,
            1,
            None,
            1,
            autoscaling=fleet.autoscaling,
            lambda_client=fleet.lambda_client,
            ssm=fleet.ssm,
        )


# ------------------------------------------------------------------------------- recorded
# Responses shaped as AWS returns them, for the states moto never produces.

RECORDED_GROUP_WITH_HOOK_WAIT = {
    "AutoScalingGroups": [
        {
            "AutoScalingGroupName": "chipscale-gpu",
            "AutoScalingGroupARN": (
                "arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:"
                "5e1b3c5a-0f1e-4c4b-9d4e-7f3b8e1c2a10:autoScalingGroupName/chipscale-gpu"
            ),
            "MinSize": 0,
            "MaxSize": 4,
            "DesiredCapacity": 3,
            "DefaultCooldown": 300,
            "AvailabilityZones": ["us-east-1a", "us-east-1b"],
            "HealthCheckType": "ELB",
            "HealthCheckGracePeriod": 300,
            "CreatedTime": "2026-11-20T09:12:44.120Z",
            "Instances": [
                {
                    # Booting: held by the launch hook until its workers are READY.
                    "InstanceId": "i-0a1b2c3d4e5f60001",
                    "InstanceType": "g5.12xlarge",
                    "AvailabilityZone": "us-east-1a",
                    "LifecycleState": "Pending:Wait",
                    "HealthStatus": "Healthy",
                    "ProtectedFromScaleIn": False,
                },
                {
                    "InstanceId": "i-0a1b2c3d4e5f60002",
                    "InstanceType": "g5.12xlarge",
                    "AvailabilityZone": "us-east-1b",
                    "LifecycleState": "InService",
                    "HealthStatus": "Healthy",
                    "ProtectedFromScaleIn": False,
                },
                {
                    "InstanceId": "i-0a1b2c3d4e5f60003",
                    "InstanceType": "g5.12xlarge",
                    "AvailabilityZone": "us-east-1a",
                    "LifecycleState": "Terminating:Wait",
                    "HealthStatus": "Unhealthy",
                    "ProtectedFromScaleIn": False,
                },
            ],
            "VPCZoneIdentifier": "subnet-0aa11bb22cc33dd44,subnet-0ee55ff66aa77bb88",
            "TerminationPolicies": ["Default"],
            "NewInstancesProtectedFromScaleIn": False,
            "ServiceLinkedRoleARN": (
                "arn:aws:iam::123456789012:role/aws-service-role/autoscaling.amazonaws.com/"
                "AWSServiceRoleForAutoScaling"
            ),
        }
    ]
}


#: DescribeTargetHealth as AWS answers it in the 30-40 s after the lifecycle hook let
#: i-...60002 in: registered, health checks not yet passed (the load balancer answers 503).
RECORDED_TARGET_HEALTH_INITIAL = {
    "TargetHealthDescriptions": [
        {
            "Target": {
                "Id": "i-0a1b2c3d4e5f60002",
                "Port": names.INFERENCE_PORT,
                "AvailabilityZone": "us-east-1b",
            },
            "HealthCheckPort": str(names.INFERENCE_PORT),
            "TargetHealth": {
                "State": "initial",
                "Reason": "Elb.RegistrationInProgress",
                "Description": "Target registration is in progress",
            },
        }
    ]
}


def recorded_mapping(state: str, concurrency: int) -> dict[str, Any]:
    """A GetEventSourceMapping answer for an SQS mapping in ``state``."""
    return {
        "UUID": "8f4e2c6a-1b3d-4e5f-9a7b-0c1d2e3f4a5b",
        "BatchSize": 10,
        "MaximumBatchingWindowInSeconds": 1,
        "EventSourceArn": "arn:aws:sqs:us-east-1:123456789012:chipscale-tiles",
        "FunctionArn": "arn:aws:lambda:us-east-1:123456789012:function:chipscale-worker",
        "LastModified": "2026-11-21T17:02:11.512000+00:00",
        "State": state,
        "StateTransitionReason": "USER_INITIATED",
        "FunctionResponseTypes": ["ReportBatchItemFailures"],
        "ScalingConfig": {"MaximumConcurrency": concurrency},
    }


def _stubbed(service: str) -> Iterator[Stubber]:
    """A client of ``service`` answering only recorded responses (what moto cannot produce)."""
    client = boto3.client(
        service, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    with Stubber(client) as stubber:
        yield stubber


@pytest.fixture
def stubbed_autoscaling() -> Iterator[Stubber]:
    yield from _stubbed("autoscaling")


@pytest.fixture
def stubbed_lambda() -> Iterator[Stubber]:
    yield from _stubbed("lambda")


def test_instance_in_pending_wait_is_not_in_service(
    fleet: Fleet, stubbed_autoscaling: Stubber
) -> None:
    """The lifecycle hook's Pending:Wait (and Terminating:Wait) never count: only the
    InService instance's GPUs get Lambdas. Group from a recorded answer, the rest in moto."""
    stubbed_autoscaling.add_response(
        "describe_auto_scaling_groups",
        RECORDED_GROUP_WITH_HOOK_WAIT,
        {"AutoScalingGroupNames": [fleet.asg_name]},
    )
    result = fleet.sync(autoscaling=stubbed_autoscaling.client, target_group=False)
    stubbed_autoscaling.assert_no_pending_responses()
    assert (result.instances_total, result.instances_in_service) == (3, 1)
    assert fleet.mapping() == ("Enabled", GPUS_PER_INSTANCE * PER_GPU_DEFAULT)


@pytest.fixture
def stubbed_elbv2() -> Iterator[Stubber]:
    yield from _stubbed("elbv2")


def test_target_still_initial_is_not_in_service(
    fleet: Fleet, stubbed_autoscaling: Stubber, stubbed_elbv2: Stubber
) -> None:
    """The one InService instance's target is still ``initial``: no GPU in service, the
    mapping stays disabled, and no receive is spent on the load balancer's 503s. Once the
    target is ``healthy``, the next run enables it."""
    for _ in range(2):
        stubbed_autoscaling.add_response(
            "describe_auto_scaling_groups",
            RECORDED_GROUP_WITH_HOOK_WAIT,
            {"AutoScalingGroupNames": [fleet.asg_name]},
        )
    arn = (
        "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/chipscale/0a1b2c3d4e5f6071"
    )
    stubbed_elbv2.add_response(
        "describe_target_health", RECORDED_TARGET_HEALTH_INITIAL, {"TargetGroupArn": arn}
    )
    healthy = json.loads(json.dumps(RECORDED_TARGET_HEALTH_INITIAL))
    healthy["TargetHealthDescriptions"][0]["TargetHealth"] = {"State": "healthy"}
    stubbed_elbv2.add_response("describe_target_health", healthy, {"TargetGroupArn": arn})
    clients = {"autoscaling": stubbed_autoscaling.client, "elbv2": stubbed_elbv2.client}
    fleet.target_group_arn = arn

    result = fleet.sync(**clients)
    assert (result.instances_total, result.instances_in_service) == (3, 0)
    assert fleet.mapping() == ("Disabled", 5)
    result = fleet.sync(**clients)
    assert result.instances_in_service == 1
    assert fleet.mapping() == ("Enabled", GPUS_PER_INSTANCE * PER_GPU_DEFAULT)
    stubbed_elbv2.assert_no_pending_responses()


def test_mapping_in_transition_is_left_for_the_next_run(
    fleet: Fleet, stubbed_autoscaling: Stubber, stubbed_lambda: Stubber
) -> None:
    """AWS refuses updates while a mapping is Updating (ResourceInUseException): the run
    reports ``busy`` instead of failing, and the next one (a minute later) converges."""
    stubbed_autoscaling.add_response(
        "describe_auto_scaling_groups", RECORDED_GROUP_WITH_HOOK_WAIT, None
    )
    stubbed_lambda.add_response("get_event_source_mapping", recorded_mapping("Updating", 16))
    stubbed_lambda.add_response("get_account_settings", recorded_account_settings(1000, 1000))
    stubbed_lambda.add_client_error(
        "update_event_source_mapping",
        service_error_code="ResourceInUseException",
        service_message="Cannot update the event source mapping because it is in use.",
        http_status_code=400,
        expected_params={
            "UUID": ANY,
            "Enabled": True,
            "ScalingConfig": {"MaximumConcurrency": GPUS_PER_INSTANCE * PER_GPU_DEFAULT},
        },
    )
    result = fleet.sync(
        autoscaling=stubbed_autoscaling.client,
        lambda_client=stubbed_lambda.client,
        target_group=False,
    )
    stubbed_lambda.assert_no_pending_responses()
    assert result.action == "busy"
    assert result.state_before == "Updating"


def test_mapping_already_enabling_needs_no_update(
    fleet: Fleet, stubbed_autoscaling: Stubber, stubbed_lambda: Stubber
) -> None:
    """``Enabling`` is on its way to enabled: with the right concurrency, nothing to write."""
    stubbed_autoscaling.add_response(
        "describe_auto_scaling_groups", RECORDED_GROUP_WITH_HOOK_WAIT, None
    )
    stubbed_lambda.add_response(
        "get_event_source_mapping",
        recorded_mapping("Enabling", GPUS_PER_INSTANCE * PER_GPU_DEFAULT),
    )
    stubbed_lambda.add_response("get_account_settings", recorded_account_settings(1000, 1000))
    result = fleet.sync(
        autoscaling=stubbed_autoscaling.client,
        lambda_client=stubbed_lambda.client,
        target_group=False,
    )
    stubbed_lambda.assert_no_pending_responses()  # and no update_event_source_mapping stubbed
    assert (result.action, result.changes) == ("none", {})


# ------------------------------------------------------------------------------- settings


def controller_env(fleet: Fleet) -> dict[str, str]:
    """The environment the stack gives the controller (stacks/fleet_controller_function.py)."""
    return {
        names.ENV_ASG_NAME: fleet.asg_name,
        names.ENV_TARGET_GROUP_ARN: fleet.target_group_arn,
        names.ENV_EVENT_SOURCE_MAPPING: fleet.mapping_uuid,
        names.ENV_GPUS_PER_INSTANCE: str(GPUS_PER_INSTANCE),
        names.ENV_PER_GPU_PARAMETER: fleet.parameter,
        names.ENV_PER_GPU_DEFAULT: str(PER_GPU_DEFAULT),
        names.ENV_RESERVED_CONCURRENCY: "0",
    }


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (names.ENV_ASG_NAME, "", f"{names.ENV_ASG_NAME} is not set"),
        (names.ENV_EVENT_SOURCE_MAPPING, " ", f"{names.ENV_EVENT_SOURCE_MAPPING} is not set"),
        (names.ENV_GPUS_PER_INSTANCE, "four", f"{names.ENV_GPUS_PER_INSTANCE} must be"),
        (names.ENV_PER_GPU_DEFAULT, "0", f"{names.ENV_PER_GPU_DEFAULT} must be"),
    ],
)
def test_settings_name_the_bad_variable(name: str, value: str, message: str) -> None:
    env = {
        names.ENV_ASG_NAME: "g",
        names.ENV_EVENT_SOURCE_MAPPING: "m",
        names.ENV_GPUS_PER_INSTANCE: "1",
        names.ENV_PER_GPU_DEFAULT: "8",
    } | {name: value}
    with pytest.raises(FleetConfigError, match=message):
        FleetSettings.from_env(env)


def test_settings_parameter_is_optional() -> None:
    env = {
        names.ENV_ASG_NAME: "g",
        names.ENV_EVENT_SOURCE_MAPPING: "m",
        names.ENV_GPUS_PER_INSTANCE: "8",
        names.ENV_PER_GPU_DEFAULT: "6",
    }
    assert FleetSettings.from_env(env) == FleetSettings("g", "m", 8, None, 6)
    # What the stack sets with reservedConcurrency 0: none reserved.
    assert FleetSettings.from_env(env | {names.ENV_RESERVED_CONCURRENCY: "0"}) == (
        FleetSettings("g", "m", 8, None, 6)
    )


def test_settings_read_the_target_group_and_the_reservation() -> None:
    env = {
        names.ENV_ASG_NAME: "g",
        names.ENV_EVENT_SOURCE_MAPPING: "m",
        names.ENV_GPUS_PER_INSTANCE: "1",
        names.ENV_PER_GPU_DEFAULT: "4",
        names.ENV_TARGET_GROUP_ARN: "arn:tg",
        names.ENV_RESERVED_CONCURRENCY: "40",
    }
    settings = FleetSettings.from_env(env)
    assert (settings.target_group_arn, settings.reserved_concurrency) == ("arn:tg", 40)
    for bad in ("1", "-5", "lots"):
        with pytest.raises(FleetConfigError, match=f"{names.ENV_RESERVED_CONCURRENCY} must be"):
            FleetSettings.from_env(env | {names.ENV_RESERVED_CONCURRENCY: bad})


# ------------------------------------------------------------------------------- the Lambda


@dataclass
class FakeContext:
    function_name: str = "chipscale-fleet-controller"
    memory_limit_in_mb: int = 128
    invoked_function_arn: str = (
        "arn:aws:lambda:us-east-1:123456789012:function:chipscale-fleet-controller"
    )
    aws_request_id: str = "5b1f3c2e-7d4a-4f8e-9c6b-1a2b3c4d5e6f"


def test_handler_syncs_against_moto_and_logs_json(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in controller_env(fleet).items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(ROOT / "lambdas"))
    monkeypatch.delitem(sys.modules, "fleet_controller", raising=False)
    import fleet_controller

    fleet_controller._clients.cache_clear()  # clients for this test's moto endpoint
    fleet.scale(2)
    event = {"source": "aws.autoscaling", "detail-type": "EC2 Instance Launch Successful"}
    result = fleet_controller.handler(event, FakeContext())
    assert result["action"] == "updated"
    assert result["gpus_in_service"] == 2 * GPUS_PER_INSTANCE
    assert fleet.mapping() == ("Enabled", 2 * GPUS_PER_INSTANCE * PER_GPU_DEFAULT)

    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    sync_logs = [r for r in records if r.get("message") == "fleet sync"]
    assert len(sync_logs) == 1
    assert sync_logs[0]["fleet"]["desired"] == {"enabled": True, "maximum_concurrency": 64}
    assert sync_logs[0]["trigger"] == "EC2 Instance Launch Successful"
    assert sync_logs[0]["fleet"]["target_group_arn"] == fleet.target_group_arn
    assert sync_logs[0]["function_name"] == FakeContext.function_name
    # The parameter does not exist here: the fallback is logged as a warning of its own.
    assert any(r.get("level") == "WARNING" and fleet.parameter in r["message"] for r in records)
    fleet_controller._clients.cache_clear()
