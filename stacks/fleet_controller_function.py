"""Fleet controller: the Lambda that keeps the worker's concurrency on the GPUs in service.

``fleet_controller.handler`` (logic in :mod:`chipscale.ops.fleet`) runs on this group's
instance launch/terminate events and every minute. It is outside the VPC (AWS APIs only);
its IAM is scoped to the mapping and the parameter, with the two Describe calls that allow no
resource-level permission on ``*``. Why: docs/design.md, "The cloud".
"""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from chipscale import names
from stacks.common import acknowledge, python_function
from stacks.config import DeploymentConfig

HANDLER = "fleet_controller.handler"
INSTANCE_EVENTS = ["EC2 Instance Launch Successful", "EC2 Instance Terminate Successful"]


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
        self.function.add_to_role_policy(
            iam.PolicyStatement(
                actions=[
                    "autoscaling:DescribeAutoScalingGroups",
                    "elasticloadbalancing:DescribeTargetHealth",
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
            "autoscaling:DescribeAutoScalingGroups and elasticloadbalancing:DescribeTargetHealth "
            "support no resource-level permissions (ELBv2 Describe* actions take no resource "
            "ARN in IAM); they are the only actions granted on '*', both read-only.",
        )
