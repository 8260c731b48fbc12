"""``--stack NAME`` resolution against a CloudFormation stack deployed into moto.

The template is a small stand-in for the CDK stack with the same output keys (from
chipscale.names): SQS queue + DLQ with a redrive policy, a GPU Auto Scaling group from a
launch template, the per-GPU concurrency parameter, a worker Lambda and its SQS event source
mapping. moto's CloudFormation creates every one of them for real (in moto), so resolving
the stack and checking its resources go through the same API calls as in AWS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import boto3
import pytest

from chipscale import names
from chipscale.ops.stack_outputs import (
    NoCredentials,
    NoRegion,
    StackNotFound,
    StackOutputMissing,
    aws_session,
    resolve_stack,
)

ROOT = Path(__file__).resolve().parents[1]


def chipscale_template(
    *,
    omit: Iterable[str] = (),
    max_instances: int = 2,
    instance_type: str = "g5.xlarge",
    per_gpu: int = 4,
    mapping_enabled: bool = False,
    worker_timeout: int = 60,
    extra_outputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A CloudFormation template with the chipscale stack's queue, fleet and worker shapes and
    its outputs, minus the output keys in ``omit``. The mapping is disabled by default, as
    the fleet controller keeps it while no GPU is in service (the group starts at zero)."""
    resources: dict[str, Any] = {
        "Dlq": {"Type": "AWS::SQS::Queue"},
        "Queue": {
            "Type": "AWS::SQS::Queue",
            "Properties": {
                "VisibilityTimeout": 721,
                "RedrivePolicy": {
                    "deadLetterTargetArn": {"Fn::GetAtt": ["Dlq", "Arn"]},
                    "maxReceiveCount": 3,
                },
            },
        },
        "Vpc": {"Type": "AWS::EC2::VPC", "Properties": {"CidrBlock": "10.0.0.0/16"}},
        "Subnet": {
            "Type": "AWS::EC2::Subnet",
            "Properties": {
                "VpcId": {"Ref": "Vpc"},
                "CidrBlock": "10.0.1.0/24",
                "AvailabilityZone": "us-east-1a",
            },
        },
        "LaunchTemplate": {
            "Type": "AWS::EC2::LaunchTemplate",
            "Properties": {
                "LaunchTemplateData": {"InstanceType": instance_type, "ImageId": "ami-12c6146b"}
            },
        },
        "Fleet": {
            "Type": "AWS::AutoScaling::AutoScalingGroup",
            "Properties": {
                "MinSize": "0",
                "MaxSize": str(max_instances),
                "DesiredCapacity": "0",
                "VPCZoneIdentifier": [{"Ref": "Subnet"}],
                "LaunchTemplate": {
                    "LaunchTemplateId": {"Ref": "LaunchTemplate"},
                    "Version": {"Fn::GetAtt": ["LaunchTemplate", "LatestVersionNumber"]},
                },
            },
        },
        "PerGpu": {
            "Type": "AWS::SSM::Parameter",
            "Properties": {
                "Name": {"Fn::Sub": "/chipscale/${AWS::StackName}/per-gpu-concurrency"},
                "Type": "String",
                "Value": str(per_gpu),
            },
        },
        "Role": {
            "Type": "AWS::IAM::Role",
            "Properties": {
                "AssumeRolePolicyDocument": {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Service": "lambda.amazonaws.com"},
                            "Action": "sts:AssumeRole",
                        }
                    ],
                }
            },
        },
        "Worker": _function(worker_timeout),
        "Operations": _function(),
        "Mapping": {
            "Type": "AWS::Lambda::EventSourceMapping",
            "Properties": {
                "FunctionName": {"Ref": "Worker"},
                "EventSourceArn": {"Fn::GetAtt": ["Queue", "Arn"]},
                "BatchSize": 4,
                "Enabled": mapping_enabled,
                "FunctionResponseTypes": ["ReportBatchItemFailures"],
                "ScalingConfig": {"MaximumConcurrency": 2},
            },
        },
    }
    outputs = {
        names.OUTPUT_QUEUE_URL: {"Ref": "Queue"},
        names.OUTPUT_DLQ_URL: {"Ref": "Dlq"},
        names.OUTPUT_ASG_NAME: {"Ref": "Fleet"},
        names.OUTPUT_PER_GPU_PARAMETER: {"Ref": "PerGpu"},
        names.OUTPUT_WORKER_FUNCTION: {"Ref": "Worker"},
        names.OUTPUT_OPERATIONS_FUNCTION: {"Ref": "Operations"},
        names.OUTPUT_EVENT_SOURCE_MAPPING: {"Ref": "Mapping"},
        names.OUTPUT_RESULTS_BUCKET: "chipscale-results-example",
        names.OUTPUT_ENDPOINT_URL: "http://internal-model.example:8080/predictions/demo",
        **(extra_outputs or {}),
    }
    return {
        "Resources": resources,
        "Outputs": {k: {"Value": v} for k, v in outputs.items() if k not in set(omit)},
    }


def _function(timeout: int = 60) -> dict[str, Any]:
    return {
        "Type": "AWS::Lambda::Function",
        "Properties": {
            "Runtime": "python3.12",
            "Timeout": timeout,
            "Handler": "index.handler",
            "Role": {"Fn::GetAtt": ["Role", "Arn"]},
            "Code": {"ZipFile": "def handler(event, context):\n    return []\n"},
        },
    }


def deploy_stack(template: dict[str, Any], name: str | None = None, **client: Any) -> str:
    """Create the stack in moto (``client``: boto3 client kwargs) and wait for it; its name."""
    name = name or f"chipscale-{uuid.uuid4().hex[:10]}"
    cfn = boto3.client("cloudformation", **client)
    cfn.create_stack(StackName=name, TemplateBody=json.dumps(template))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stack = cfn.describe_stacks(StackName=name)["Stacks"][0]
        if not stack["StackStatus"].endswith("IN_PROGRESS"):
            assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
            return name
        time.sleep(0.2)
    raise AssertionError(f"stack {name} still in progress")


@pytest.fixture
def aws(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """boto3 pointed at moto through AWS_ENDPOINT_URL, as a user's environment would be."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    return moto_server


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any AWS setting, and no shared config files to fall back on
    (HOME's ~/.aws of the machine running the tests must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",  # no 1 s wait for an instance role
    )
    env.update(extra)
    return env


def test_resolves_every_output(aws: str) -> None:
    stack = deploy_stack(chipscale_template())
    outputs = resolve_stack(stack)
    assert outputs.stack_name == stack
    assert outputs.region == "us-east-1"
    sqs = boto3.client("sqs")
    queue = sqs.get_queue_attributes(QueueUrl=outputs.queue_url, AttributeNames=["All"])
    dlq = sqs.get_queue_attributes(QueueUrl=outputs.dlq_url, AttributeNames=["QueueArn"])
    redrive = json.loads(queue["Attributes"]["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"] == dlq["Attributes"]["QueueArn"]
    group = boto3.client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=[outputs.asg_name]
    )
    assert group["AutoScalingGroups"][0]["MaxSize"] == 2
    mapping = boto3.client("lambda").get_event_source_mapping(UUID=outputs.event_source_mapping_id)
    assert mapping["FunctionArn"].endswith(f":{outputs.worker_function}")
    assert outputs.per_gpu_parameter == f"/chipscale/{stack}/per-gpu-concurrency"
    assert outputs.operations_function
    assert outputs.results_bucket == "chipscale-results-example"
    assert outputs.endpoint_url == "http://internal-model.example:8080/predictions/demo"
    # outputs the template does not have are None, and require() names their key
    assert outputs.model_bucket is None
    assert outputs.db_secret_arn is None
    assert outputs.raw[names.OUTPUT_QUEUE_URL] == outputs.queue_url


def test_missing_optional_output_is_none_and_required_on_demand(aws: str) -> None:
    stack = deploy_stack(chipscale_template(omit=[names.OUTPUT_OPERATIONS_FUNCTION]))
    outputs = resolve_stack(stack)
    assert outputs.operations_function is None
    with pytest.raises(StackOutputMissing, match=names.OUTPUT_OPERATIONS_FUNCTION) as info:
        outputs.require("operations_function")
    assert stack in str(info.value)
    assert outputs.require("queue_url") == outputs.queue_url


@pytest.mark.parametrize("key", [names.OUTPUT_QUEUE_URL, names.OUTPUT_DLQ_URL])
def test_missing_required_output_names_it(aws: str, key: str) -> None:
    stack = deploy_stack(chipscale_template(omit=[key]))
    with pytest.raises(StackOutputMissing) as info:
        resolve_stack(stack)
    message = str(info.value)
    assert key in message and stack in message and "us-east-1" in message
    assert "deployed by chipscale" in message
    assert "\n" not in message


def test_missing_stack_names_stack_and_region(aws: str) -> None:
    with pytest.raises(StackNotFound) as info:
        resolve_stack("no-such-stack")
    assert "'no-such-stack'" in str(info.value) and "us-east-1" in str(info.value)


def test_aws_region_is_honoured_before_aws_default_region(
    aws: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = deploy_stack(chipscale_template())
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert aws_session().region_name == "eu-west-1"
    with pytest.raises(StackNotFound, match="eu-west-1"):  # moto keeps regions apart, as AWS
        resolve_stack(stack)
    monkeypatch.delenv("AWS_REGION")
    assert resolve_stack(stack).region == "us-east-1"


def test_no_region_says_how_to_set_it(aws: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    with pytest.raises(NoRegion, match="AWS_REGION"):
        resolve_stack("anything")


def test_no_credentials_says_how_to_configure(aws: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in clean_env(AWS_REGION="us-east-1", AWS_ENDPOINT_URL=aws).items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(NoCredentials) as info:
        resolve_stack("anything")
    assert "aws configure" in str(info.value) and "AWS_ACCESS_KEY_ID" in str(info.value)


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chipscale.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_without_credentials_is_one_clear_line(moto_server: str) -> None:
    env = clean_env(AWS_REGION="us-east-1", AWS_ENDPOINT_URL=moto_server)
    done = _cli(["verify", "--stack", "anything"], env)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr  # one line, no traceback
    assert done.stderr.startswith("Error: no usable AWS credentials")
    assert "aws configure" in done.stderr


def test_cli_missing_stack_is_one_clear_line(moto_server: str) -> None:
    env = clean_env(
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=moto_server,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
    )
    done = _cli(["verify", "--stack", "no-such-stack"], env)
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        "Error: no CloudFormation stack 'no-such-stack' in us-east-1: check "
        "the name (`aws cloudformation list-stacks`) and AWS_REGION\n"
    )


def test_failed_deployment_is_named_by_its_status() -> None:
    from chipscale.ops.stack_outputs import StackError, outputs_from_stack

    stack = {"StackName": "chipscale", "StackStatus": "ROLLBACK_COMPLETE", "Outputs": []}
    with pytest.raises(StackError, match="'chipscale' in us-east-1 is ROLLBACK_COMPLETE"):
        outputs_from_stack(stack, "us-east-1")
