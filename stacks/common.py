"""Small helpers the constructs share: stack outputs with fixed keys, cdk-nag acknowledgments,
log groups, and the Python Lambda every function of the stack is (``python_function``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aws_cdk import Acknowledgment, CfnOutput, Duration, RemovalPolicy, Size, Stack, Validations
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct, IConstruct

#: The Lambda runtime and architecture of every function: the bundle's manylinux wheels are
#: downloaded for exactly this interpreter and CPU (see ``stacks.bundle``).
LAMBDA_RUNTIME = lambda_.Runtime.PYTHON_3_12
LAMBDA_ARCHITECTURE = lambda_.Architecture.X86_64


def add_output(scope: Construct, key: str, value: str, description: str) -> CfnOutput:
    """A stack output whose key is exactly ``key`` (a ``chipscale.names.OUTPUT_*`` constant),
    wherever in the construct tree it is declared: the CLI resolves resources by these keys."""
    output = CfnOutput(Stack.of(scope), key, value=value, description=description)
    output.override_logical_id(key)
    return output


def acknowledge(scope: IConstruct, rule: str, reason: str) -> None:
    """Acknowledge one cdk-nag finding on ``scope`` (and its children) with its reason."""
    Validations.of(scope).acknowledge(Acknowledgment(id=rule, reason=reason))


def log_group(scope: Construct, construct_id: str, *, retention_days: int) -> logs.LogGroup:
    """A log group owned by the stack: tagged, with the configured retention, removed with the
    stack (instead of a Lambda's implicit, untagged, never-expiring group)."""
    group = logs.LogGroup(scope, construct_id, removal_policy=RemovalPolicy.DESTROY)
    # RetentionDays members are named (ONE_MONTH), the config speaks days: set the L1 value.
    cfn = group.node.default_child
    assert isinstance(cfn, logs.CfnLogGroup)
    cfn.retention_in_days = retention_days
    return group


#: Why every function stays on LAMBDA_RUNTIME (cdk-nag L1 asks for the latest runtime).
RUNTIME_PIN_REASON = (
    f"{LAMBDA_RUNTIME.name} is pinned on purpose: the functions share one bundle whose binary "
    f"wheels (rasterio, numpy, psycopg) are downloaded for exactly this interpreter and "
    f"{LAMBDA_ARCHITECTURE.name} (stacks/bundle.py); move LAMBDA_RUNTIME and the bundle together."
)


@dataclass(frozen=True)
class PythonFunction:
    """What :func:`python_function` built: the function, its log group, and its security group
    (None for a function outside the VPC)."""

    function: lambda_.Function
    log_group: logs.LogGroup
    security_group: ec2.SecurityGroup | None


def python_function(
    scope: Construct,
    *,
    description: str,
    handler: str,
    code: lambda_.Code,
    log_retention_days: int,
    memory_size: int,
    timeout: Duration,
    environment: Mapping[str, str],
    vpc: ec2.IVpc | None = None,
    vpc_subnets: ec2.SubnetSelection | None = None,
    security_group_description: str = "",
    reserved_concurrent_executions: int | None = None,
    ephemeral_storage_mib: int | None = None,
) -> PythonFunction:
    """A chipscale Lambda in ``scope``: LAMBDA_RUNTIME on LAMBDA_ARCHITECTURE, a log group of
    its own (``Logs``), and in the VPC (when ``vpc`` is given) a security group (``SecurityGroup``)
    with no egress, to which the caller adds exactly what the function needs. Owns the cdk-nag
    acknowledgments every such function has: AWS's managed execution roles (IAM4) and the
    pinned runtime (L1)."""
    security_group = None
    if vpc is not None:
        security_group = ec2.SecurityGroup(
            scope,
            "SecurityGroup",
            vpc=vpc,
            allow_all_outbound=False,
            description=security_group_description or description,
        )
    group = log_group(scope, "Logs", retention_days=log_retention_days)
    function = lambda_.Function(
        scope,
        "Function",
        description=description,
        runtime=LAMBDA_RUNTIME,
        architecture=LAMBDA_ARCHITECTURE,
        handler=handler,
        code=code,
        memory_size=memory_size,
        timeout=timeout,
        reserved_concurrent_executions=reserved_concurrent_executions,
        ephemeral_storage_size=(
            Size.mebibytes(ephemeral_storage_mib) if ephemeral_storage_mib is not None else None
        ),
        vpc=vpc,
        vpc_subnets=vpc_subnets if vpc is not None else None,
        security_groups=[security_group] if security_group is not None else None,
        log_group=group,
        environment=dict(environment),
    )
    role = function.role
    assert role is not None
    managed = ["AWSLambdaBasicExecutionRole"]
    if vpc is not None:
        managed.append("AWSLambdaVPCAccessExecutionRole")
    for policy in managed:
        acknowledge(
            role,
            f"AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/{policy}]",
            f"{policy} is AWS's minimal policy for a Lambda writing its logs"
            + (" and attaching its VPC network interfaces." if "VPC" in policy else "."),
        )
    acknowledge(function, "AwsSolutions-L1", RUNTIME_PIN_REASON)
    return PythonFunction(function, group, security_group)
