"""Fleet controller: the worker's Lambda concurrency follows the GPUs in service.

``fleet_controller.handler`` (logic in ``chipscale.ops.fleet``) sets the worker's event source
mapping to MaximumConcurrency = per-GPU concurrency x GPUs in service, capped at the worker's
reserved concurrency when it has one (``reservedConcurrency``, passed as
``names.ENV_RESERVED_CONCURRENCY``), and disables it while no GPU is in service, so
scale-from-zero never burns messages into the dead-letter queue and new GPUs never sit idle.

A GPU is in service when its instance is ``InService`` and ``Healthy`` in the Auto Scaling
group **and** a ``healthy`` target of the model's target group (``DescribeTargetHealth`` on
``names.ENV_TARGET_GROUP_ARN``): for 30-40 s after the lifecycle hook lets an instance in, the
target is still ``initial`` and the load balancer answers 503, which would cost the first
batches a receive. It runs on this group's instance launch/terminate events and every minute,
so the mapping is enabled on the first tick after the target turns healthy (a missed event is
repaired within a minute too).

It is not in the VPC: it calls only AWS APIs (Auto Scaling, Elastic Load Balancing, Lambda,
SSM) over their public endpoints, which needs neither a NAT gateway nor more interface
endpoints. Its IAM is scoped to this mapping and this parameter; DescribeAutoScalingGroups and
DescribeTargetHealth support no resource-level permissions, so those two (read-only) are on
``*``.
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
