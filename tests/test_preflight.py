"""``chipscale verify --preflight``: the account conditions a first deploy would fail on.

What runs against moto: EC2 (instance types, G instances already running, the AMI registered
with a Deep Learning AMI's name and description), RDS (a proxy another stack owns), S3 and
CloudFormation (a stack that exists, or not). What is recorded, because moto lacks it: Lambda's
GetAccountSettings, Service Quotas for ec2 (moto implements only ``vpc``), and the public SSM
parameter naming the Deep Learning AMI; botocore Stubbers play them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from click.testing import CliRunner
from conftest import ROOT

from chipscale.cli import cli
from chipscale.ops.checks import CHECK_GPU_QUOTA, run_checks
from chipscale.ops.preflight import (
    CHECK_AMI_DRIVER,
    CHECK_LAMBDA_LIMIT,
    CHECK_MODEL_ARCHIVE,
    CHECK_PROXY_NAME,
    Plan,
    ami_driver,
    load_plan,
    preflight_checks,
)

sys.path.insert(0, str(ROOT))
# A region no other test uses: the moto server is shared, and other tests run G instances
# in us-east-1 that the quota check would rightly count.
REGION = "ap-southeast-2"
AMI_PARAMETER = (
    "/aws/service/deeplearning/ami/x86_64/"
    "base-oss-nvidia-driver-gpu-amazon-linux-2023/latest/ami-id"
)
#: The shape of a Deep Learning Base AMI's name and description (the driver is what counts).
DLAMI_NAME = "Deep Learning Base OSS Nvidia Driver GPU AMI (Amazon Linux 2023) 20250523"
DLAMI_DESCRIPTION = (
    "Supported EC2 instances: G4dn, G5, G6, Gr6, G6e, P4d, P4de, P5, P5e, P5en. "
    "NVIDIA driver version: {driver}. CUDA versions available: cuda-12.4 cuda-12.6 "
    "cuda-12.8. Default CUDA version is 12.8"
)


def plan(**overrides: Any) -> Plan:
    values: dict[str, Any] = {
        "stack_name": "chipscale",
        "region": REGION,
        "instance_type": "g5.xlarge",
        "max_instances": 2,
        "per_gpu_concurrency": 4,
        "max_concurrency": 2,
        "reserved_concurrency": 0,
        "model_name": "chipscale",
        "model_archive": None,
        "ami_parameter": AMI_PARAMETER,
        "ami_id": "",
        "torch_version": "2.13.0",
    }
    return Plan(**(values | overrides))


class Account:
    """A boto3-session stand-in: moto for what moto has, recorded answers for the rest."""

    def __init__(self, moto_url: str) -> None:
        self.moto_url = moto_url
        self.stubbed: dict[str, Any] = {}
        self.stubbers: list[Stubber] = []

    def moto(self, service: str) -> Any:
        return boto3.client(service, region_name=REGION, endpoint_url=self.moto_url)

    def client(self, service: str, region_name: str | None = None, **_: Any) -> Any:
        return self.stubbed.get(service) or self.moto(service)

    def record(self, service: str) -> Stubber:
        client = boto3.client(
            service, region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"
        )
        stubber = Stubber(client)
        self.stubbed[service] = client
        self.stubbers.append(stubber)
        return stubber

    def recorded(self, *, quota: float, concurrency: int, unreserved: int, ami: str) -> None:
        quotas = self.record("service-quotas")
        quotas.add_response(
            "get_service_quota",
            {
                "Quota": {
                    "ServiceCode": "ec2",
                    "QuotaCode": "L-DB2E81BA",
                    "QuotaName": "Running On-Demand G and VT instances",
                    "Value": quota,
                }
            },
            {"ServiceCode": "ec2", "QuotaCode": "L-DB2E81BA"},
        )
        lambda_ = self.record("lambda")
        lambda_.add_response(
            "get_account_settings",
            {
                "AccountLimit": {
                    "TotalCodeSize": 80530636800,
                    "CodeSizeUnzipped": 262144000,
                    "CodeSizeZipped": 52428800,
                    "ConcurrentExecutions": concurrency,
                    "UnreservedConcurrentExecutions": unreserved,
                },
                "AccountUsage": {"TotalCodeSize": 0, "FunctionCount": 0},
            },
            {},
        )
        ssm = self.record("ssm")
        ssm.add_response(
            "get_parameter",
            {"Parameter": {"Name": AMI_PARAMETER, "Type": "String", "Value": ami}},
            {"Name": AMI_PARAMETER},
        )
        for stubber in self.stubbers:
            stubber.activate()

    def image(self, driver: str) -> str:
        answer = self.moto("ec2").register_image(
            Name=f"{DLAMI_NAME} {driver}",
            Description=DLAMI_DESCRIPTION.format(driver=driver),
            RootDeviceName="/dev/xvda",
            BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 100}}],
        )
        return str(answer["ImageId"])


@pytest.fixture
def account(moto_server: str) -> Iterator[Account]:
    yield Account(moto_server)


def by_name(results: list[Any]) -> dict[str, Any]:
    return {r.name: r for r in results}


def test_a_fresh_account_fails_each_condition_by_name(account: Account) -> None:
    """Quota 0, Lambda's 10, a proxy of the same name from elsewhere, no archive, and an AMI
    whose driver (570) is older than torch 2.13's CUDA 13 needs (580)."""
    taken = plan(stack_name="preflight-taken")
    _proxy(account, taken.proxy_name)
    account.recorded(quota=0, concurrency=10, unreserved=10, ami=account.image("570.133.20"))
    results = by_name(run_checks(preflight_checks(taken, account)))
    assert [n for n, r in results.items() if r.ok] == []
    assert "need 8 vCPUs (2 x g5.xlarge, 4 each); quota 0 (applied)" in (
        results[CHECK_GPU_QUOTA].detail
    )
    assert "request ec2 L-DB2E81BA" in results[CHECK_GPU_QUOTA].detail
    lambda_ = results[CHECK_LAMBDA_LIMIT].detail
    assert "need 18 (worker up to 8 + 10 headroom); account limit 10, 10 unreserved" in lambda_
    assert f"an RDS proxy named {taken.proxy_name} already exists" in (
        results[CHECK_PROXY_NAME].detail
    )
    assert "modelArchive is empty and stack preflight-taken does not exist yet" in (
        results[CHECK_MODEL_ARCHIVE].detail
    )
    assert "models/chipscale.mar" in results[CHECK_MODEL_ARCHIVE].detail
    driver = results[CHECK_AMI_DRIVER].detail
    assert "driver 570.133.20; torch 2.13.0 needs >= 580: every boot would abandon" in driver


def test_a_ready_account_passes(account: Account, tmp_path: Path) -> None:
    archive = tmp_path / "chipscale.mar"
    archive.write_bytes(b"PK\x05\x06" + bytes(18))
    account.recorded(quota=64, concurrency=1000, unreserved=1000, ami=account.image("580.65.06"))
    ready = plan(stack_name="preflight-ready", model_archive=archive)
    results = run_checks(preflight_checks(ready, account))
    assert all(r.ok for r in results), [r.to_dict() for r in results if not r.ok]
    assert by_name(results)[CHECK_PROXY_NAME].detail == "preflight-ready-proxy: free"
    assert (
        "driver 580.65.06; torch 2.13.0 needs >= 580" in by_name(results)[CHECK_AMI_DRIVER].detail
    )


def test_running_g_instances_count_against_the_quota(account: Account) -> None:
    ec2 = account.moto("ec2")
    image = account.image("580.65.06")
    ec2.run_instances(ImageId=image, InstanceType="g5.2xlarge", MinCount=1, MaxCount=1)
    account.recorded(quota=12, concurrency=1000, unreserved=1000, ami=image)
    result = by_name(run_checks(preflight_checks(plan(stack_name="busy"), account)))
    gpu = result[CHECK_GPU_QUOTA]
    assert not gpu.ok  # 12 - 8 running elsewhere < 8 needed
    assert "quota 12 (applied), 8 in use elsewhere" in gpu.detail
    assert "of at least 16" in gpu.detail


def test_an_existing_stack_needs_the_archive_at_the_key_the_hosts_read(account: Account) -> None:
    cloudformation = account.moto("cloudformation")
    cloudformation.create_stack(StackName="preflight-live", TemplateBody=_MODEL_BUCKET_STACK)
    outputs = cloudformation.describe_stacks(StackName="preflight-live")["Stacks"][0]["Outputs"]
    (bucket,) = [o["OutputValue"] for o in outputs if o["OutputKey"] == "ModelBucketName"]
    account.recorded(quota=64, concurrency=1000, unreserved=1000, ami=account.image("580.65.06"))
    live = plan(stack_name="preflight-live")
    missing = by_name(run_checks(preflight_checks(live, account)))[CHECK_MODEL_ARCHIVE]
    assert not missing.ok
    assert f"s3://{bucket}/models/chipscale.mar does not exist" in missing.detail
    account.moto("s3").put_object(Bucket=bucket, Key="models/chipscale.mar", Body=b"mar")
    account.recorded(quota=64, concurrency=1000, unreserved=1000, ami=account.image("580.65.06"))
    found = by_name(run_checks(preflight_checks(live, account)))[CHECK_MODEL_ARCHIVE]
    assert found.ok and found.detail == f"s3://{bucket}/models/chipscale.mar (3 B)"


def test_a_reservation_must_leave_lambdas_100_unreserved(account: Account) -> None:
    account.recorded(quota=64, concurrency=150, unreserved=150, ami=account.image("580.65.06"))
    reserved = plan(stack_name="preflight-reserved", reserved_concurrency=80)
    result = by_name(run_checks(preflight_checks(reserved, account)))[CHECK_LAMBDA_LIMIT]
    assert not result.ok
    assert "need 180 (80 reserved for the worker + 100 left unreserved)" in result.detail


def test_the_cli_reads_cdk_json_and_names_each_failure(
    account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`verify --preflight --stack NAME -c key=value`, the config read as the CDK app reads it."""
    _proxy(account, "preflight-cli-proxy")
    account.recorded(quota=0, concurrency=10, unreserved=10, ami=account.image("570.133.20"))
    monkeypatch.setattr("chipscale.cloud.aws_session.aws_session", lambda region=None: account)
    result = CliRunner().invoke(
        cli,
        ["verify", "--preflight", "--stack", "preflight-cli", "-c", "maxInstances=3",
         "--cdk-json", str(ROOT / "cdk.json"), "--json"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "verify failed: GPU vCPU quota, Lambda concurrency limit, RDS proxy name" in (
        result.output
    )
    assert "need 12 vCPUs (3 x g5.xlarge" in result.output


def test_load_plan_is_the_stacks_config(tmp_path: Path) -> None:
    dev = load_plan(ROOT / "cdk.json", {"stackName": "chipscale-dev", "maxInstances": "4"})
    assert (dev.stack_name, dev.max_instances, dev.proxy_name) == (
        "chipscale-dev",
        4,
        "chipscale-dev-proxy",
    )
    with pytest.raises(ValueError, match="maxInstances"):
        load_plan(ROOT / "cdk.json", {"maxInstances": "0"})


@pytest.mark.parametrize(
    ("image", "driver"),
    [
        ({"Description": "NVIDIA driver version: 570.133.20, CUDA 12.8"}, "570.133.20"),
        ({"Description": "", "Name": "Nvidia Driver 580.65.06 base image"}, "580.65.06"),
        ({"Name": "gpu-ami-driver-535"}, "535"),
        ({"Name": "Deep Learning AMI GPU PyTorch 2.7 (Ubuntu 22.04) 20250601"}, ""),
    ],
)
def test_ami_driver_is_read_from_the_description_or_the_name(
    image: dict[str, str], driver: str
) -> None:
    assert ami_driver(image) == driver


def _proxy(account: Account, name: str) -> None:
    """An RDS proxy of that name, owned by nothing of ours."""
    ec2 = account.moto("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.9.{i}.0/24", AvailabilityZone=f"{REGION}{z}")
        for i, z in enumerate("ab")
    ]
    account.moto("rds").create_db_proxy(
        DBProxyName=name,
        EngineFamily="POSTGRESQL",
        Auth=[{"AuthScheme": "SECRETS", "SecretArn": "arn:aws:secretsmanager:x"}],
        RoleArn="arn:aws:iam::123456789012:role/proxy",
        VpcSubnetIds=[s["Subnet"]["SubnetId"] for s in subnets],
    )  # fmt: skip


_MODEL_BUCKET_STACK = """
Resources:
  Models:
    Type: AWS::S3::Bucket
Outputs:
  ModelBucketName:
    Value: !Ref Models
"""
