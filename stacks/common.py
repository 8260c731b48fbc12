"""Small helpers the constructs share: stack outputs with fixed keys, cdk-nag acknowledgments,
log groups and Python Lambda defaults."""

from __future__ import annotations

from aws_cdk import Acknowledgment, CfnOutput, RemovalPolicy, Stack, Validations
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
