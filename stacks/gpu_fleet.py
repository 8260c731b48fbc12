"""GPU fleet: TorchServe on GPU instances in an Auto Scaling group, behind an internal ALB.

A launch template (Deep Learning Base AMI pinned or resolved at launch, IMDSv2, encrypted gp3,
no key pair) whose user data runs ``model_server/gpu_host_boot.sh``; a launch lifecycle hook
holding each instance until its TorchServe workers are READY, with a boot deadline; host logs;
content-addressed model rollout; backlog scaling from zero. Why: docs/design.md, "The cloud".
"""

from __future__ import annotations

import shlex

from aws_cdk import Annotations, ArnFormat, Aws, Duration, Stack
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_assets as s3_assets
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from chipscale import names
from chipscale.ops.wheelhouse import min_driver_for_torch
from stacks.common import acknowledge, log_group
from stacks.config import REPO_ROOT, DeploymentConfig
from stacks.drain import (
    deregistration_delay_seconds,
    drain_timeout_seconds,
    termination_hook_timeout_seconds,
)

BOOT_SCRIPT = "gpu_host_boot.sh"
HOST_DIR = "/opt/chipscale"
ROOT_DEVICE = "/dev/xvda"  # Amazon Linux 2023
#: Seconds the boot deadline keeps before the hook's own timeout: time for the script to say
#: ABANDON (and the agent to flush the log) between the EC2 launch and the kernel's start.
BOOT_DEADLINE_MARGIN = 120


def boot_deadline_budget(config: DeploymentConfig) -> int:
    """Seconds from the instance's kernel start by which the boot must have completed the
    lifecycle action: the hook's timeout less a margin (a quarter of it for short hooks)."""
    hook = config.lifecycle_hook_timeout_seconds
    return hook - min(BOOT_DEADLINE_MARGIN, hook // 4)


def asg_name(config: DeploymentConfig) -> str:
    """The group's fixed name: the hosts' user data and the instance role need it, and a
    reference to the group from its own launch template would be a dependency cycle."""
    return f"{config.stack_name}-gpu-fleet"


class GpuFleet(Construct):
    """Launch template, Auto Scaling group, lifecycle hook, scaling and the internal ALB."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: DeploymentConfig,
        vpc: ec2.IVpc,
        subnets: ec2.SubnetSelection,
        model_bucket: s3.IBucket,
        model_key: str,
        logs_bucket: s3.IBucket,
        queue: sqs.IQueue,
    ) -> None:
        super().__init__(scope, construct_id)
        self.config = config
        self.name = asg_name(config)
        self.model_key = model_key
        self.security_group = ec2.SecurityGroup(
            self,
            "HostSecurityGroup",
            vpc=vpc,
            allow_all_outbound=False,
            description="chipscale GPU hosts: TorchServe from the ALB; HTTPS out (packages, AWS)",
        )
        self.security_group.add_egress_rule(
            ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "HTTPS: PyPI, dnf repositories, S3, AWS APIs"
        )
        self.host_logs = log_group(self, "HostLogs", retention_days=config.log_retention_days)
        self.files = s3_assets.Asset(
            self,
            "ModelServerFiles",
            path=str(REPO_ROOT / "model_server"),
            exclude=["__pycache__", "*.pyc", "logs", "*.mar", "key_file.json"],
        )
        self.role = self._role(model_bucket)
        self.launch_template = ec2.LaunchTemplate(
            self,
            "LaunchTemplate",
            instance_type=ec2.InstanceType(config.instance_type),
            machine_image=self._machine_image(),
            role=self.role,
            security_group=self.security_group,
            user_data=self._user_data(model_bucket),
            require_imdsv2=True,
            http_tokens=ec2.LaunchTemplateHttpTokens.REQUIRED,
            detailed_monitoring=True,
            block_devices=[
                ec2.BlockDevice(
                    device_name=ROOT_DEVICE,
                    volume=ec2.BlockDeviceVolume.ebs(
                        config.root_volume_gb,
                        encrypted=True,
                        volume_type=ec2.EbsDeviceVolumeType.GP3,
                        delete_on_termination=True,
                    ),
                )
            ],
        )
        self.group = autoscaling.AutoScalingGroup(
            self,
            "Group",
            auto_scaling_group_name=self.name,
            vpc=vpc,
            vpc_subnets=subnets,
            launch_template=self.launch_template,
            min_capacity=config.min_instances,
            max_capacity=config.max_instances,
            group_metrics=[autoscaling.GroupMetrics.all()],
            default_instance_warmup=Duration.seconds(config.instance_warmup_seconds),
            health_checks=autoscaling.HealthChecks.with_additional_checks(
                additional_types=[autoscaling.AdditionalHealthCheckType.ELB],
                grace_period=Duration.minutes(2),
            ),
            # A new launch template version (a new model key, a new boot file asset) replaces
            # the hosts one at a time; with minInstances 0 nothing has to stay in service
            # (CloudFormation wants MinInstancesInService below MaxSize).
            update_policy=autoscaling.UpdatePolicy.rolling_update(
                max_batch_size=1,
                min_instances_in_service=min(config.min_instances, config.max_instances - 1),
            ),
        )
        self._lifecycle_hook()
        self._load_balancer(vpc, subnets, logs_bucket)
        self._scaling(queue)
        self._acknowledge(model_bucket)

    # ------------------------------------------------------------------ parts
    @property
    def model_url(self) -> str:
        """What the worker calls: TorchServe's predictions API through the internal ALB."""
        return (
            f"http://{self.load_balancer.load_balancer_dns_name}:{names.INFERENCE_PORT}"
            f"/predictions/{self.config.model_name}"
        )

    def _machine_image(self) -> ec2.IMachineImage:
        """``amiId`` when pinned; else ``resolve:ssm:`` in the launch template, which EC2 reads
        at each launch: the template (and so the hosts) never changes with a new AMI release,
        unlike a CloudFormation SSM parameter re-read at every deploy."""
        linux = ec2.OperatingSystemType.LINUX
        if self.config.ami_id:
            return ec2.MachineImage.generic_linux({self.config.region: self.config.ami_id})
        Annotations.of(self).add_warning_v2(
            "chipscale:amiNotPinned",
            f"amiId is empty: each new GPU host boots whatever AMI {self.config.ami_parameter} "
            "names at its launch. Pin one for production: -c amiId=$(aws ssm get-parameter "
            f"--name {self.config.ami_parameter} --query Parameter.Value --output text)",
        )
        return ec2.MachineImage.resolve_ssm_parameter_at_launch(self.config.ami_parameter, os=linux)

    def wheelhouse_uri(self, model_bucket: s3.IBucket) -> str:
        """``s3://`` prefix of the wheelhouse, or empty (install from PyPI through the NAT)."""
        prefix = self.config.wheelhouse_prefix.strip("/")
        return f"s3://{model_bucket.bucket_name}/{prefix}/" if prefix else ""

    def host_environment(self, model_bucket: s3.IBucket) -> dict[str, str]:
        """The variables ``gpu_host_boot.sh`` reads (its header documents each)."""
        return {
            names.HOST_ENV_REGION: Aws.REGION,
            names.HOST_ENV_MODEL_BUCKET: model_bucket.bucket_name,
            names.HOST_ENV_MODEL_KEY: self.model_key,
            names.HOST_ENV_MODEL_NAME: self.config.model_name,
            names.HOST_ENV_WORKERS_PER_GPU: str(self.config.workers_per_gpu),
            names.HOST_ENV_ASG_NAME: self.name,
            names.HOST_ENV_LIFECYCLE_HOOK: names.LIFECYCLE_HOOK_LAUNCH,
            names.HOST_ENV_WHEELHOUSE_URI: self.wheelhouse_uri(model_bucket),
            names.HOST_ENV_TORCH_VERSION: self.config.torch_version,
            names.HOST_ENV_MIN_DRIVER: min_driver_for_torch(self.config.torch_version),
            names.HOST_ENV_CW_NAMESPACE: names.GPU_METRICS_NAMESPACE,
            # The CloudWatch agent ships the boot's output and TorchServe's logs here.
            names.HOST_ENV_LOG_GROUP: self.host_logs.log_group_name,
            # The drain watcher holds scale-in until TorchServe has no request in flight.
            names.HOST_ENV_DRAIN_HOOK: names.LIFECYCLE_HOOK_TERMINATE,
            names.HOST_ENV_DRAIN_TIMEOUT: str(drain_timeout_seconds(self.config)),
        }

    def boot_deadline_command(self) -> str:
        """The user data line exporting the boot's absolute deadline (epoch seconds): the
        kernel's start (now less /proc/uptime) plus :func:`boot_deadline_budget`, so time spent
        before user data and in every install step counts against the hook's timeout."""
        return (
            f"export {names.HOST_ENV_BOOT_DEADLINE}="
            "$(( $(date +%s) - $(cut -d. -f1 /proc/uptime) + "
            f"{boot_deadline_budget(self.config)} ))"
        )

    def _user_data(self, model_bucket: s3.IBucket) -> ec2.UserData:
        """Fetch ``model_server/`` and run the boot script; abandon the launch on any error
        before the script takes over (it abandons on its own failures)."""
        user_data = ec2.UserData.for_linux()
        env = self.host_environment(model_bucket)
        archive = f"{HOST_DIR}/model_server.zip"
        abandon = (
            "abandon() { t=$(curl -fsS -X PUT http://169.254.169.254/latest/api/token "
            '-H "X-aws-ec2-metadata-token-ttl-seconds: 60"); '
            'id=$(curl -fsS -H "X-aws-ec2-metadata-token: $t" '
            "http://169.254.169.254/latest/meta-data/instance-id); "
            'aws autoscaling complete-lifecycle-action --region "$CHIPSCALE_REGION" '
            '--auto-scaling-group-name "$CHIPSCALE_ASG_NAME" '
            '--lifecycle-hook-name "$CHIPSCALE_LIFECYCLE_HOOK" --instance-id "$id" '
            "--lifecycle-action-result ABANDON || true; }"
        )
        user_data.add_commands(
            "set -euo pipefail",
            *(f"export {key}={_quote(value)}" for key, value in env.items()),
            self.boot_deadline_command(),
            abandon,
            "trap abandon ERR",
            f"mkdir -p {HOST_DIR}",
            f'aws s3 cp --only-show-errors --region "$CHIPSCALE_REGION" '
            f"s3://{self.files.s3_bucket_name}/{self.files.s3_object_key} {archive}",
            f"rm -rf {HOST_DIR}/model_server",
            f"python3 -m zipfile -e {archive} {HOST_DIR}/model_server",
            "trap - ERR",
            f"cd {HOST_DIR}/model_server && exec bash {BOOT_SCRIPT}",
        )
        return user_data

    def _role(self, model_bucket: s3.IBucket) -> iam.Role:
        """Session Manager, the model bucket (read), the boot files (read), GPU metrics and
        logs (write), and completing this group's launch lifecycle action."""
        stack = Stack.of(self)
        role = iam.Role(
            self,
            "InstanceRole",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description="chipscale GPU host",
            managed_policies=[
                iam.ManagedPolicy.from_aws_managed_policy_name("AmazonSSMManagedInstanceCore")
            ],
        )
        readable = [model_bucket.arn_for_objects(f"{storage_prefix(self.model_key)}*")]
        # The boot's HEAD of the archive: with ListBucket a missing key answers 404 (403
        # without). S3 checks it with the key as s3:prefix, so the models/ prefix suffices.
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["s3:ListBucket"],
                resources=[model_bucket.bucket_arn],
                conditions={"StringLike": {"s3:prefix": [f"{storage_prefix(self.model_key)}*"]}},
            )
        )
        if self.config.wheelhouse_prefix:
            readable.append(
                model_bucket.arn_for_objects(f"{self.config.wheelhouse_prefix.strip('/')}/*")
            )
            role.add_to_policy(
                iam.PolicyStatement(
                    actions=["s3:ListBucket"],
                    resources=[model_bucket.bucket_arn],
                    conditions={
                        "StringLike": {
                            "s3:prefix": [f"{self.config.wheelhouse_prefix.strip('/')}/*"]
                        }
                    },
                )
            )
        readable.append(self.files.bucket.arn_for_objects(self.files.s3_object_key))
        role.add_to_policy(iam.PolicyStatement(actions=["s3:GetObject"], resources=readable))
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["cloudwatch:PutMetricData"],
                resources=["*"],
                conditions={"StringEquals": {"cloudwatch:namespace": names.GPU_METRICS_NAMESPACE}},
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
                resources=[self.host_logs.log_group_arn],
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["autoscaling:CompleteLifecycleAction"],
                resources=[
                    stack.format_arn(
                        service="autoscaling",
                        resource="autoScalingGroup",
                        resource_name=f"*:autoScalingGroupName/{self.name}",
                        arn_format=ArnFormat.COLON_RESOURCE_NAME,
                    )
                ],
            )
        )
        return role

    def _lifecycle_hook(self) -> None:
        cfn = self.group.node.default_child
        assert isinstance(cfn, autoscaling.CfnAutoScalingGroup)
        cfn.lifecycle_hook_specification_list = [
            autoscaling.CfnAutoScalingGroup.LifecycleHookSpecificationProperty(
                lifecycle_hook_name=names.LIFECYCLE_HOOK_LAUNCH,
                lifecycle_transition="autoscaling:EC2_INSTANCE_LAUNCHING",
                default_result="ABANDON",
                heartbeat_timeout=self.config.lifecycle_hook_timeout_seconds,
            ),
            # Scale-in: after the load balancer's drain, the host completes this once
            # TorchServe has no request in flight; CONTINUE if the host cannot (stacks/drain.py).
            autoscaling.CfnAutoScalingGroup.LifecycleHookSpecificationProperty(
                lifecycle_hook_name=names.LIFECYCLE_HOOK_TERMINATE,
                lifecycle_transition="autoscaling:EC2_INSTANCE_TERMINATING",
                default_result="CONTINUE",
                heartbeat_timeout=termination_hook_timeout_seconds(self.config),
            ),
        ]

    def _load_balancer(
        self, vpc: ec2.IVpc, subnets: ec2.SubnetSelection, logs_bucket: s3.IBucket
    ) -> None:
        self.load_balancer_security_group = ec2.SecurityGroup(
            self,
            "LoadBalancerSecurityGroup",
            vpc=vpc,
            allow_all_outbound=False,
            description="chipscale model ALB: 8080 from the worker Lambda only",
        )
        self.load_balancer = elbv2.ApplicationLoadBalancer(
            self,
            "LoadBalancer",
            vpc=vpc,
            vpc_subnets=subnets,
            internet_facing=False,
            security_group=self.load_balancer_security_group,
            drop_invalid_header_fields=True,
            idle_timeout=Duration.seconds(120),
        )
        self.load_balancer.log_access_logs(logs_bucket, prefix="alb")
        self.listener = self.load_balancer.add_listener(
            "Inference",
            port=names.INFERENCE_PORT,
            protocol=elbv2.ApplicationProtocol.HTTP,
            open=False,  # no 0.0.0.0/0 rule: the stack admits the worker's group alone
        )
        self.target_group = self.listener.add_targets(
            "TorchServe",
            port=names.INFERENCE_PORT,
            protocol=elbv2.ApplicationProtocol.HTTP,
            targets=[self.group],
            load_balancing_algorithm_type=elbv2.TargetGroupLoadBalancingAlgorithmType.LEAST_OUTSTANDING_REQUESTS,
            deregistration_delay=Duration.seconds(deregistration_delay_seconds(self.config)),
            health_check=elbv2.HealthCheck(
                path="/ping",
                port=str(names.INFERENCE_PORT),
                healthy_http_codes="200",
                interval=Duration.seconds(15),
                timeout=Duration.seconds(5),
                healthy_threshold_count=2,
                unhealthy_threshold_count=3,
            ),
        )

    def _scaling(self, queue: sqs.IQueue) -> None:
        policy = autoscaling.CfnScalingPolicy  # the L1 types: L2 target tracking takes no math
        by_queue = [policy.MetricDimensionProperty(name="QueueName", value=queue.queue_name)]
        by_group = [
            policy.MetricDimensionProperty(
                name="AutoScalingGroupName", value=self.group.auto_scaling_group_name
            )
        ]
        inputs = {  # id: (namespace, metric, dimensions, statistic)
            "visible": ("AWS/SQS", "ApproximateNumberOfMessagesVisible", by_queue, "Sum"),
            "inflight": ("AWS/SQS", "ApproximateNumberOfMessagesNotVisible", by_queue, "Sum"),
            "hosts": ("AWS/AutoScaling", "GroupInServiceInstances", by_group, "Average"),
        }
        queries = [
            policy.TargetTrackingMetricDataQueryProperty(
                id=query_id,
                return_data=False,
                metric_stat=policy.TargetTrackingMetricStatProperty(
                    metric=policy.MetricProperty(
                        namespace=namespace, metric_name=metric, dimensions=dimensions
                    ),
                    stat=statistic,
                ),
            )
            for query_id, (namespace, metric, dimensions, statistic) in inputs.items()
        ]
        queries.append(
            policy.TargetTrackingMetricDataQueryProperty(
                id="backlog",
                # In-flight messages count too: a busy fleet with an empty queue must not shrink.
                expression="(visible + inflight) / IF(hosts > 0, hosts, 1)",
                label="Messages per GPU instance in service",
                return_data=True,
            )
        )
        self.backlog_policy = policy(
            self,
            "BacklogPerInstance",
            auto_scaling_group_name=self.group.auto_scaling_group_name,
            policy_type="TargetTrackingScaling",
            estimated_instance_warmup=self.config.instance_warmup_seconds,
            target_tracking_configuration=policy.TargetTrackingConfigurationProperty(
                target_value=float(self.config.backlog_per_instance),
                customized_metric_specification=policy.CustomizedMetricSpecificationProperty(
                    metrics=queries
                ),
            ),
        )
        # From zero: while the group wants no instance and messages wait, ask for exactly one.
        self.scale_from_zero = autoscaling.StepScalingAction(
            self,
            "ScaleFromZero",
            auto_scaling_group=self.group,
            adjustment_type=autoscaling.AdjustmentType.EXACT_CAPACITY,
            metric_aggregation_type=autoscaling.MetricAggregationType.MAXIMUM,
        )
        self.scale_from_zero.add_adjustment(adjustment=1, lower_bound=0)
        self.work_waiting_alarm = cloudwatch.Alarm(
            self,
            "WorkWaitingWithNoHost",
            alarm_description="Messages wait and the GPU group's desired capacity is 0",
            metric=cloudwatch.MathExpression(
                expression="IF(desired == 0 AND visible > 0, 1, 0)",
                using_metrics={
                    "desired": cloudwatch.Metric(
                        namespace="AWS/AutoScaling",
                        metric_name="GroupDesiredCapacity",
                        dimensions_map={"AutoScalingGroupName": self.group.auto_scaling_group_name},
                        statistic="Maximum",
                    ),
                    "visible": queue.metric_approximate_number_of_messages_visible(
                        statistic="Maximum"
                    ),
                },
                period=Duration.minutes(1),
                label="Work waiting with no GPU host",
            ),
            threshold=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            evaluation_periods=1,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        self.work_waiting_alarm.add_alarm_action(cw_actions.AutoScalingAction(self.scale_from_zero))

    def _acknowledge(self, model_bucket: s3.IBucket) -> None:
        stack = Stack.of(self)
        bucket_ref = stack.get_logical_id(model_bucket.node.default_child)  # type: ignore[arg-type]
        acknowledge(
            self.role,
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/AmazonSSMManagedInstanceCore]",
            "AmazonSSMManagedInstanceCore is what Session Manager needs: it replaces SSH keys "
            "and open ports for operator access to the hosts.",
        )
        policy = self.role.node.find_child("DefaultPolicy")
        acknowledge(
            policy,
            "AwsSolutions-IAM5[Resource::*]",
            "cloudwatch:PutMetricData has no resource-level permissions; the statement is "
            f"limited by condition to the namespace {names.GPU_METRICS_NAMESPACE!r}.",
        )
        acknowledge(
            policy,
            f"AwsSolutions-IAM5[Resource::<{bucket_ref}.Arn>/{storage_prefix(self.model_key)}*]",
            "The hosts read the model archives under the models/ prefix of the model bucket "
            "(read-only), so a new archive version needs no new policy.",
        )
        if self.config.wheelhouse_prefix:
            acknowledge(
                policy,
                f"AwsSolutions-IAM5[Resource::<{bucket_ref}.Arn>/"
                f"{self.config.wheelhouse_prefix.strip('/')}/*]",
                "The hosts install from the wheelhouse prefix of the model bucket (read-only).",
            )
        acknowledge(
            policy,
            f"AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:autoscaling:{stack.region}:"
            f"<AWS::AccountId>:autoScalingGroup:*:autoScalingGroupName/{self.name}]",
            "An Auto Scaling group ARN holds a generated id; this names the one group of this "
            "stack by its fixed name, for CompleteLifecycleAction only.",
        )
        acknowledge(
            self.group,
            "AwsSolutions-AS3",
            "Instance launch/terminate events go to the fleet controller through EventBridge and "
            "capacity is on the dashboard; SNS mail per instance event would be noise.",
        )


def storage_prefix(key: str) -> str:
    """The folder part of an S3 key (``models/x.mar`` -> ``models/``)."""
    head, sep, _ = key.rpartition("/")
    return f"{head}{sep}"


def _quote(value: str) -> str:
    """Quote a value for bash. A CloudFormation reference (a ``${Token[...]}`` placeholder at
    synth) becomes a bucket or log group name at deploy: quoted as a whole, it stays literal."""
    return shlex.quote(value)
