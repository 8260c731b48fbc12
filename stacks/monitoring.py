"""Monitoring: one dashboard for a run, and alarms that mean someone should look.

Dashboard rows: the queue (depth, in flight, oldest message age, dead letters); the worker
(tiles/s from the worker's EMF metrics, concurrency, errors, throttles, duration); the GPUs
(utilisation and memory per GPU from the CloudWatch agent, instances in service). Alarms: a
message in the dead-letter queue, worker errors, a message waiting too long, and the GPU
group's refused launches and abandoned boots (``stacks/launch_alarms.py``); they notify an
SNS topic (encrypted with a key CloudWatch and EventBridge may use; e-mail subscription from
config, and a synth warning when there is none).
"""

from __future__ import annotations

from aws_cdk import Annotations, Aws, Duration, RemovalPolicy
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from chipscale import names
from stacks.config import DeploymentConfig
from stacks.launch_alarms import add_launch_alarms

WIDTH = 8  # three widgets a row (the dashboard grid is 24 wide)


class Monitoring(Construct):
    """The dashboard, the alarm topic and the alarms."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: DeploymentConfig,
        queue: sqs.IQueue,
        dead_letter_queue: sqs.IQueue,
        worker: lambda_.IFunction,
        functions: dict[str, lambda_.IFunction],
        asg_name: str,
    ) -> None:
        super().__init__(scope, construct_id)
        key = kms.Key(
            self,
            "AlarmTopicKey",
            description="chipscale alarm topic (CloudWatch alarms publish to it)",
            enable_key_rotation=True,
            # CDK's default, Retain, would leave a key ($1/month) behind each failed first deploy.
            removal_policy=RemovalPolicy.RETAIN_ON_UPDATE_OR_DELETE,
        )
        key.add_to_resource_policy(
            iam.PolicyStatement(
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                resources=["*"],  # in a key policy, '*' is this key
                conditions={"StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID}},
            )
        )
        # EventBridge publishes the launch alarms (AWS's key policy for an encrypted topic
        # target; the topic policy below refuses other accounts' rules).
        key.add_to_resource_policy(
            iam.PolicyStatement(
                principals=[iam.ServicePrincipal("events.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                resources=["*"],
            )
        )
        self.topic = sns.Topic(
            self, "Alarms", display_name="chipscale alarms", master_key=key, enforce_ssl=True
        )
        self.topic.add_to_resource_policy(
            iam.PolicyStatement(
                effect=iam.Effect.DENY,
                principals=[iam.ServicePrincipal("events.amazonaws.com")],
                actions=["sns:Publish"],
                resources=[self.topic.topic_arn],
                conditions={"StringNotEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID}},
            )
        )
        if config.alarm_email:
            self.topic.add_subscription(subscriptions.EmailSubscription(config.alarm_email))
        else:
            Annotations.of(self.topic).add_warning_v2(
                "chipscale:noAlarmSubscriber",
                "alarmEmail is empty: no one subscribes to the alarm topic, so dead letters, "
                "worker errors, refused GPU launches (a G and VT vCPU quota of 0) and abandoned "
                "boots reach no one. Deploy with -c alarmEmail=you@example.com, or subscribe "
                "to the AlarmTopicArn output yourself.",
            )
        action = cw_actions.SnsAction(self.topic)
        self.launch_rules = add_launch_alarms(
            self, topic=self.topic, asg_name=asg_name, stack_name=config.stack_name
        )

        minute = Duration.minutes(1)
        dlq_depth = dead_letter_queue.metric_approximate_number_of_messages_visible(
            statistic="Maximum", period=minute, label="Dead letters"
        )
        oldest = queue.metric_approximate_age_of_oldest_message(
            statistic="Maximum", period=minute, label="Oldest message (s)"
        )
        errors = worker.metric_errors(statistic="Sum", period=Duration.minutes(5))
        self.alarms = [
            cloudwatch.Alarm(
                self,
                "DeadLetters",
                metric=dlq_depth,
                threshold=0,
                evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
                alarm_description="Messages in the dead-letter queue: packs failed every retry",
            ),
            cloudwatch.Alarm(
                self,
                "WorkerErrors",
                metric=errors,
                threshold=0,
                evaluation_periods=2,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
                alarm_description="Worker invocations failing for 10 minutes",
            ),
            cloudwatch.Alarm(
                self,
                "OldestMessage",
                metric=oldest,
                threshold=config.oldest_message_alarm_seconds,
                evaluation_periods=5,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
                alarm_description="A message has waited longer than oldestMessageAlarmSeconds",
            ),
        ]
        for alarm in self.alarms:
            alarm.add_alarm_action(action)

        self.dashboard = cloudwatch.Dashboard(
            self,
            "Dashboard",
            # Dashboards are global to the account: two regions' stacks of one name would clash.
            dashboard_name=f"{config.stack_name}-{config.region}",
            default_interval=Duration.hours(3),
        )
        self.dashboard.add_widgets(
            _graph(
                "Queue",
                [
                    queue.metric_approximate_number_of_messages_visible(
                        period=minute, statistic="Maximum", label="Visible"
                    ),
                    queue.metric_approximate_number_of_messages_not_visible(
                        period=minute, statistic="Maximum", label="In flight"
                    ),
                ],
            ),
            _graph("Oldest message (s)", [oldest]),
            _graph("Dead-letter queue", [dlq_depth]),
        )
        tiles = {
            metric: cloudwatch.Metric(
                namespace=names.METRICS_NAMESPACE,
                metric_name=metric,
                dimensions_map={
                    "service": names.WORKER_SERVICE,
                    names.WORKER_FUNCTION_DIMENSION: worker.function_name,
                },
                statistic="Sum",
                period=minute,
            )
            for metric in (
                names.METRIC_TILES_OK,
                names.METRIC_TILES_EMPTY,
                names.METRIC_TILES_ERROR,
            )
        }
        self.dashboard.add_widgets(
            _graph(
                "Tiles per second",
                [
                    cloudwatch.MathExpression(
                        expression="(ok + empty) / 60",
                        label="Tiles/s",
                        using_metrics={
                            "ok": tiles[names.METRIC_TILES_OK],
                            "empty": tiles[names.METRIC_TILES_EMPTY],
                        },
                        period=minute,
                    ),
                    cloudwatch.MathExpression(
                        expression="error / 60",
                        label="Failed tiles/s",
                        using_metrics={"error": tiles[names.METRIC_TILES_ERROR]},
                        period=minute,
                    ),
                ],
            ),
            _graph(
                "Lambda concurrency",
                [
                    fn.metric(
                        "ConcurrentExecutions", statistic="Maximum", period=minute, label=label
                    )
                    for label, fn in functions.items()
                ],
            ),
            _graph(
                "Lambda errors and throttles",
                [
                    m
                    for label, fn in functions.items()
                    for m in (
                        fn.metric_errors(statistic="Sum", period=minute, label=f"{label} errors"),
                        fn.metric_throttles(
                            statistic="Sum", period=minute, label=f"{label} throttles"
                        ),
                    )
                ],
            ),
        )
        self.dashboard.add_widgets(
            _graph(
                "Worker duration (ms)",
                [
                    worker.metric_duration(statistic=stat, period=minute, label=stat)
                    for stat in ("p50", "p90", "Maximum")
                ],
            ),
            _graph("GPU utilisation per GPU (%)", [_gpu_search(names.GPU_METRIC_UTILIZATION)]),
            _graph(
                "GPU memory per GPU",
                [
                    _gpu_search(names.GPU_METRIC_MEMORY_UTILIZATION),
                    _gpu_search(names.GPU_METRIC_MEMORY_USED),
                ],
            ),
        )
        self.dashboard.add_widgets(
            _graph(
                "GPU instances",
                [
                    cloudwatch.Metric(
                        namespace="AWS/AutoScaling",
                        metric_name=name,
                        dimensions_map={"AutoScalingGroupName": asg_name},
                        statistic="Maximum",
                        period=minute,
                        label=label,
                    )
                    for name, label in (
                        ("GroupInServiceInstances", "In service"),
                        ("GroupPendingInstances", "Pending (booting)"),
                        ("GroupDesiredCapacity", "Desired"),
                    )
                ],
            ),
        )

    @property
    def dashboard_url(self) -> str:
        return (
            f"https://{Aws.REGION}.console.aws.amazon.com/cloudwatch/home?region={Aws.REGION}"
            f"#dashboards:name={self.dashboard.dashboard_name}"
        )


def _graph(title: str, metrics: list[cloudwatch.IMetric]) -> cloudwatch.GraphWidget:
    return cloudwatch.GraphWidget(title=title, left=metrics, width=WIDTH, height=6)


def _gpu_search(metric_name: str) -> cloudwatch.MathExpression:
    """Every GPU's series of ``metric_name`` (one per instance and GPU index)."""
    return cloudwatch.MathExpression(
        expression=(
            f'SEARCH(\'Namespace="{names.GPU_METRICS_NAMESPACE}" '
            f"MetricName=\"{metric_name}\"', 'Average', 60)"
        ),
        label=metric_name,
        period=Duration.minutes(1),
    )
