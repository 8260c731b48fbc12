"""Fleet controller: the Lambda that keeps the worker's concurrency on the GPUs in service.

``fleet_controller.handler`` (logic in :mod:`chipscale.ops.fleet`) runs on this group's
instance launch/terminate events and every minute. It is outside the VPC (AWS APIs only);
its IAM is scoped to the mapping and the parameter, with the three read-only calls that allow
no resource-level permission on ``*``. Synth warns when the planned worker concurrency would
not fit a new account's Lambda limit. Why: docs/design.md, "The cloud".
"""

from __future__ import annotations

from aws_cdk import Annotations, Duration
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from chipscale import names
from chipscale.ops.aws_checks import LAMBDA_HEADROOM, LAMBDA_UNRESERVED_MINIMUM
from stacks.common import acknowledge, python_function
from stacks.config import DeploymentConfig

HANDLER = "fleet_controller.handler"
INSTANCE_EVENTS = ["EC2 Instance Launch Successful", "EC2 Instance Terminate Successful"]

#: Lambda concurrent executions of a new account in a region (quota L-B99A9384).
NEW_ACCOUNT_CONCURRENCY = 10


def concurrency_warnings(config: DeploymentConfig) -> list[str]:
    """What a new account's Lambda limit of 10 would do to this config, as synth warnings."""
    planned = config.planned_concurrency
    if config.reserved_concurrency:
        need = config.reserved_concurrency + LAMBDA_UNRESERVED_MINIMUM
        return [
            f"reservedConcurrency {config.reserved_concurrency} needs a Lambda concurrent "
            f"executions quota of at least {need} (Lambda keeps {LAMBDA_UNRESERVED_MINIMUM} "
            f"unreserved); a new account has {NEW_ACCOUNT_CONCURRENCY} and the deploy fails "
            "there. Request Lambda L-B99A9384 in Service Quotas first, or set 0."
        ]
    if planned <= NEW_ACCOUNT_CONCURRENCY:
        return []
    return [
        f"The worker may run {planned} Lambdas at once (perGpuConcurrency "
        f"{config.per_gpu_concurrency} x maxInstances {config.max_instances} x "
        f"{config.gpus_per_instance} GPUs per {config.instance_type}, or maxConcurrency), "
        f"above the {NEW_ACCOUNT_CONCURRENCY} concurrent executions of a new account: the fleet "
        "controller then caps it at the account's unreserved concurrency less a margin and "
        "GPUs sit partly idle. Request a Lambda concurrent executions quota (L-B99A9384) of "
        f"at least {planned + LAMBDA_HEADROOM}; `chipscale verify` checks it."
    ]


class FleetController(Construct):
    """The controller function, the per-GPU concurrency parameter and the two triggers."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: DeploymentConfig,
        code: lambda_.Code,
        asg_name: str,
        target_group_arn: str,
        event_source_mapping_id: str,
        event_source_mapping_arn: str,
    ) -> None:
        super().__init__(scope, construct_id)
        self.per_gpu_parameter = ssm.StringParameter(
            self,
            "PerGpuConcurrency",
            parameter_name=f"/{config.stack_name}/per-gpu-concurrency",
            string_value=str(config.per_gpu_concurrency),
            description="Worker Lambda concurrency per GPU in service (chipscale tune writes it)",
        )
        parts = python_function(
            self,
            description="chipscale fleet controller: worker concurrency follows the GPUs",
            handler=HANDLER,
            code=code,
            log_retention_days=config.log_retention_days,
            memory_size=256,
            timeout=Duration.seconds(30),
            environment={
                names.ENV_ASG_NAME: asg_name,
                names.ENV_TARGET_GROUP_ARN: target_group_arn,
                names.ENV_EVENT_SOURCE_MAPPING: event_source_mapping_id,
                names.ENV_GPUS_PER_INSTANCE: str(config.gpus_per_instance),
                names.ENV_PER_GPU_PARAMETER: self.per_gpu_parameter.parameter_name,
                names.ENV_PER_GPU_DEFAULT: str(config.per_gpu_concurrency),
                # 0: none reserved; else MaximumConcurrency never exceeds it.
                names.ENV_RESERVED_CONCURRENCY: str(config.reserved_concurrency),
            },
        )
        self.function = parts.function
        self.log_group = parts.log_group
        for number, text in enumerate(concurrency_warnings(config)):
            Annotations.of(self).add_warning_v2(f"chipscale:accountConcurrency{number}", text)
        self.function.add_to_role_policy(
            iam.PolicyStatement(
                actions=[
                    "autoscaling:DescribeAutoScalingGroups",
                    "elasticloadbalancing:DescribeTargetHealth",
                    # The account's unreserved concurrency, the worker's ceiling when none
                    # is reserved.
                    "lambda:GetAccountSettings",
                ],
                resources=["*"],
            )
        )
        self.function.add_to_role_policy(
            iam.PolicyStatement(
                actions=["lambda:GetEventSourceMapping", "lambda:UpdateEventSourceMapping"],
                resources=[event_source_mapping_arn],
            )
        )
        self.function.add_to_role_policy(
            iam.PolicyStatement(
                actions=["ssm:GetParameter"], resources=[self.per_gpu_parameter.parameter_arn]
            )
        )
        self.instance_events = events.Rule(
            self,
            "InstanceEvents",
            description="chipscale GPU instances launched or terminated",
            event_pattern=events.EventPattern(
                source=["aws.autoscaling"],
                detail_type=INSTANCE_EVENTS,
                detail={"AutoScalingGroupName": [asg_name]},
            ),
            targets=[targets.LambdaFunction(self.function, retry_attempts=2)],
        )
        self.schedule = events.Rule(
            self,
            "EveryMinute",
            description="chipscale fleet controller: converge every minute",
            schedule=events.Schedule.rate(Duration.minutes(1)),
            targets=[targets.LambdaFunction(self.function, retry_attempts=0)],
        )
        role = self.function.role
        assert role is not None
        acknowledge(
            role,
            "AwsSolutions-IAM5[Resource::*]",
            "autoscaling:DescribeAutoScalingGroups, elasticloadbalancing:DescribeTargetHealth "
            "and lambda:GetAccountSettings support no resource-level permissions (ELBv2 "
            "Describe* and Lambda's account settings take no resource ARN in IAM); they are "
            "the only actions granted on '*', all read-only.",
        )
