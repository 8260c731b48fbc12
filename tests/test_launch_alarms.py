"""Issue 16, item 5: GPU quota and launch failures reach someone.

One synth of the default config (no ``alarmEmail``): the group's refused launches and
abandoned boots publish to the alarm topic, EventBridge may use the topic's key, and synth
warns that no one subscribes. The two rules' patterns route recorded Auto Scaling events in
moto's EventBridge (put_events to rules whose targets are SQS queues; moto lacks
TestEventPattern).
``chipscale verify`` names the G and VT quota and the vCPUs to request.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from test_stack import flat, of_type, synth
from test_verify import stub_quota

from chipscale.ops import aws_checks
from chipscale.ops.aws import Fleet
from chipscale.ops.aws_checks import Capacity
from chipscale.ops.checks import CheckFailed
from stacks.launch_alarms import LAUNCH_UNSUCCESSFUL

ASG = "chipscale-gpu-fleet"


def synth_warnings(outdir: Path) -> list[str]:
    """Every ``aws:cdk:warning`` the synth wrote into the cloud assembly (what `cdk synth`
    prints): in the manifest, or in a stack's additional metadata file."""
    manifest = json.loads((outdir / "manifest.json").read_text())
    metadata = []
    for artifact in manifest["artifacts"].values():
        metadata.append(artifact.get("metadata", {}))
        extra = artifact.get("additionalMetadataFile")
        if extra:
            metadata.append(json.loads((outdir / extra).read_text()))
    return [
        str(entry["data"])
        for found in metadata
        for entries in found.values()
        for entry in entries
        if entry["type"] == "aws:cdk:warning"
    ]


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[str]]:
    outdir = tmp_path_factory.mktemp("cdk.out")
    template, _ = synth(outdir)  # cdk.json's defaults: alarmEmail ""
    return template, synth_warnings(outdir)


@pytest.fixture(scope="module")
def raw(synthesized: tuple[dict[str, Any], list[str]]) -> dict[str, Any]:
    return synthesized[0]


def launch_rules(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        key: rule["Properties"]
        for key, rule in of_type(raw, "AWS::Events::Rule").items()
        if LAUNCH_UNSUCCESSFUL in flat(rule["Properties"].get("EventPattern"))
    }


def test_refused_launches_and_abandoned_boots_publish_to_the_alarm_topic(
    raw: dict[str, Any],
) -> None:
    rules = launch_rules(raw)
    assert sorted(k.removeprefix("Monitoring")[:13] for k in rules) == [
        "BootAbandoned",
        "LaunchRefused",
    ]
    (topic,) = of_type(raw, "AWS::SNS::Topic")
    (group,) = of_type(raw, "AWS::AutoScaling::AutoScalingGroup")
    for key, rule in rules.items():
        pattern = rule["EventPattern"]
        assert pattern["source"] == ["aws.autoscaling"]
        assert pattern["detail-type"] == [LAUNCH_UNSUCCESSFUL]
        assert pattern["detail"]["AutoScalingGroupName"] == [{"Ref": group}]
        (target,) = rule["Targets"]
        assert target["Arn"] == {"Ref": topic}, key
        transformer = target["InputTransformer"]
        assert transformer["InputPathsMap"]["detail-StatusMessage"] == "$.detail.StatusMessage"
        assert "<detail-StatusMessage>" in transformer["InputTemplate"]
    (refused,) = [r for k, r in rules.items() if "LaunchRefused" in k]
    assert "G and VT vCPU quota" in refused["Targets"][0]["InputTransformer"]["InputTemplate"]


def test_eventbridge_may_use_the_topic_key_and_publish(raw: dict[str, Any]) -> None:
    """The topic is encrypted with a customer key: without the key policy statement SNS
    drops EventBridge's messages (the rule shows FailedInvocations, no one is told)."""
    (key,) = of_type(raw, "AWS::KMS::Key").values()
    for_events = [
        s
        for s in key["Properties"]["KeyPolicy"]["Statement"]
        if s.get("Principal") == {"Service": "events.amazonaws.com"}
    ]
    assert len(for_events) == 1
    assert set(for_events[0]["Action"]) == {"kms:Decrypt", "kms:GenerateDataKey*"}
    (policy,) = of_type(raw, "AWS::SNS::TopicPolicy").values()
    by_effect = {
        s["Effect"]: s
        for s in policy["Properties"]["PolicyDocument"]["Statement"]
        if s["Principal"] == {"Service": "events.amazonaws.com"}
    }
    assert by_effect["Allow"]["Action"] == "sns:Publish"
    # ... from this account's rules only.
    refused = by_effect["Deny"]["Condition"]["StringNotEquals"]["aws:SourceAccount"]
    assert refused == {"Ref": "AWS::AccountId"}


def recorded_event(status_code: str, message: str, group: str = ASG) -> dict[str, Any]:
    """An "EC2 Instance Launch Unsuccessful" event as Auto Scaling sends it."""
    return {
        "version": "0",
        "id": "3e3c153a-8339-4e30-8c35-687ebef853fe",
        "detail-type": LAUNCH_UNSUCCESSFUL,
        "source": "aws.autoscaling",
        "account": "123456789012",
        "time": "2026-12-04T09:12:44Z",
        "region": "us-east-1",
        "resources": [
            f"arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:0:"
            f"autoScalingGroupName/{group}"
        ],
        "detail": {
            "StatusCode": status_code,
            "AutoScalingGroupName": group,
            "ActivityId": "1f35d79a-2e1c-4f3e-9a0b-5c7d8e9f0a1b",
            "Details": {"Availability Zone": "us-east-1a", "Subnet ID": "subnet-0abc"},
            "RequestId": "1f35d79a-2e1c-4f3e-9a0b-5c7d8e9f0a1b",
            "StatusMessage": message,
            "EndTime": "2026-12-04T09:12:44Z",
            "EC2InstanceId": "i-0a1b2c3d4e5f60001",
            "StartTime": "2026-12-04T09:12:40Z",
            "Cause": "At 2026-12-04T09:12:38Z an instance was started in response to a "
            "difference between desired and actual capacity, increasing the capacity from 0 "
            "to 1.",
        },
    }


QUOTA_REFUSED = recorded_event(
    "Failed",
    "You have requested more vCPU capacity than your current vCPU limit of 0 allows for the "
    "instance bucket that the specified instance type belongs to. Please visit "
    "http://aws.amazon.com/contact-us/ec2-request to request an adjustment to this limit. "
    "Launching EC2 instance failed.",
)
BOOT_ABANDONED = recorded_event(
    "Cancelled",
    "Instance failed to complete user's Lifecycle Action: Lifecycle Action with token "
    "0fc62a4b-153b-4dba-9bf4-9f233e72a697 was abandoned: Lifecycle Action Completed with "
    "ABANDON Result",
)
HOOK_TIMED_OUT = recorded_event(
    "Cancelled",
    "Instance failed to complete user's Lifecycle Action: Lifecycle Action with token "
    "95c60857-3c0a-4a67-8518-6dc18797e421 was abandoned: Heartbeat Timeout",
)


def test_each_failure_matches_exactly_its_own_rule(raw: dict[str, Any], moto_server: str) -> None:
    clients = {"endpoint_url": moto_server, "region_name": "us-east-1"}
    events = boto3.client("events", **clients)
    sqs = boto3.client("sqs", **clients)
    suffix = uuid.uuid4().hex[:8]
    queues = {}
    for key, rule in launch_rules(raw).items():
        name = "refused" if "LaunchRefused" in key else "abandoned"
        pattern = json.loads(json.dumps(rule["EventPattern"]))
        pattern["detail"]["AutoScalingGroupName"] = [ASG]  # the group's Ref, resolved
        queues[name] = sqs.create_queue(QueueName=f"{name}-{suffix}")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=queues[name], AttributeNames=["QueueArn"])
        events.put_rule(Name=f"{name}-{suffix}", EventPattern=json.dumps(pattern))
        events.put_targets(
            Rule=f"{name}-{suffix}",
            Targets=[{"Id": "alarm", "Arn": arn["Attributes"]["QueueArn"]}],
        )

    def matching(event: dict[str, Any]) -> set[str]:
        entry = {
            "Source": event["source"],
            "DetailType": event["detail-type"],
            "Resources": event["resources"],
            "Detail": json.dumps(event["detail"]),
        }
        assert events.put_events(Entries=[entry])["FailedEntryCount"] == 0
        routed = set()
        for name, url in queues.items():
            for message in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get(
                "Messages", []
            ):
                routed.add(name)
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        return routed

    assert matching(QUOTA_REFUSED) == {"refused"}
    assert matching(BOOT_ABANDONED) == {"abandoned"}
    assert matching(HOOK_TIMED_OUT) == {"abandoned"}
    assert matching(recorded_event("Failed", "Some error", group="another-group")) == set()


def test_synth_warns_when_no_one_subscribes(
    synthesized: tuple[dict[str, Any], list[str]],
) -> None:
    raw, warnings = synthesized
    assert not of_type(raw, "AWS::SNS::Subscription")
    (warning,) = [w for w in warnings if "alarmEmail is empty" in w]
    assert "-c alarmEmail=" in warning
    # The defaults' planned concurrency, 4 per GPU x 2 instances x 1 GPU = 8, fits 10.
    assert not [w for w in warnings if "concurrent executions" in w]


def test_verify_names_the_gpu_quota_and_the_vcpus_to_request() -> None:
    """A new account: no G and VT quota applied, AWS's default 0 (recorded answers)."""
    client = boto3.client(
        "service-quotas", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    stubber = Stubber(client)
    stub_quota(stubber, aws_checks.GPU_QUOTA, None, 0)
    fleet = Fleet(
        "asg", 0, 3, 0, instance_type="g5.xlarge", vcpus_per_instance=4, gpus_per_instance=1
    )
    capacity = Capacity(fleet, per_gpu_concurrency=4, max_concurrency=2, reserved_concurrency=None)
    with stubber, pytest.raises(CheckFailed) as failed:
        aws_checks.check_gpu_quota(client, capacity)
    message = str(failed.value)
    assert "'Running On-Demand G and VT instances' (ec2 L-DB2E81BA)" in message
    assert "of at least 12 vCPUs" in message
    assert "quota 0 (AWS default: no quota applied to this account)" in message
