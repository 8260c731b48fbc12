"""Worker: the SQS-triggered Lambda that reads tiles, asks TorchServe, writes results.

``sqs_worker.handler`` from the shared bundle, in the ``compute`` subnets, let out only to
HTTP(S), the model load balancer and the database proxy; no secret in its environment. The
event source reports partial batch failures; its MaximumConcurrency is only the initial value,
which the fleet controller then keeps. Why: docs/design.md, "The cloud".
"""

from __future__ import annotations

from aws_cdk import Duration, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_event_sources as sources
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from chipscale import names
from stacks.common import acknowledge, python_function
from stacks.config import DeploymentConfig

HANDLER = "sqs_worker.handler"


def source_prefixes(config: DeploymentConfig) -> list[str]:
    """The configured source buckets as ``s3://bucket/prefix`` (the worker's allow-list)."""
    return [f"s3://{source.rstrip('/')}/" for source in config.source_buckets]


def _single_tile_defaults(config: DeploymentConfig) -> dict[str, str]:
    """Job and source for chip-n-scale's ``{"x", "y", "z"}`` messages, when configured."""
    out = {}
    if config.default_job:
        out[names.ENV_DEFAULT_JOB] = config.default_job
    if config.default_source:
        out[names.ENV_DEFAULT_SOURCE] = config.default_source
    return out


class Worker(Construct):
    """The worker function, its log group, security group and SQS event source."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: DeploymentConfig,
        code: lambda_.Code,
        vpc: ec2.IVpc,
        subnets: ec2.SubnetSelection,
        queue: sqs.IQueue,
        db_secret: secretsmanager.ISecret,
        db_host: str,
        db_name: str,
        model_url: str,
    ) -> None:
        super().__init__(scope, construct_id)
        parts = python_function(
            self,
            description="chipscale worker: tile packs from SQS -> TorchServe -> PostgreSQL",
            security_group_description=(
                "chipscale worker Lambda: out to COG sources, the model and the DB proxy"
            ),
            handler=HANDLER,
            code=code,
            log_retention_days=config.log_retention_days,
            memory_size=config.lambda_memory_mb,
            timeout=Duration.seconds(config.lambda_timeout_seconds),
            reserved_concurrent_executions=config.reserved_concurrency or None,
            vpc=vpc,
            vpc_subnets=subnets,
            environment={
                names.ENV_QUEUE_URL: queue.queue_url,
                names.ENV_MODEL_URL: model_url,
                names.ENV_DB_SECRET_ARN: db_secret.secret_arn,
                names.ENV_DB_HOST: db_host,
                names.ENV_DB_NAME: db_name,
                names.ENV_ALLOWED_SOURCES: ",".join(source_prefixes(config)),
                names.ENV_MAX_TILES_PER_MESSAGE: str(config.max_tiles_per_message),
                **_single_tile_defaults(config),
                "POWERTOOLS_SERVICE_NAME": names.WORKER_SERVICE,
                "POWERTOOLS_METRICS_NAMESPACE": names.METRICS_NAMESPACE,
            },
        )
        self.function = parts.function
        self.log_group = parts.log_group
        assert parts.security_group is not None
        self.security_group = parts.security_group
        for port, why in ((443, "HTTPS: COG sources, AWS endpoints"), (80, "HTTP COG sources")):
            self.security_group.add_egress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(port), why)
        db_secret.grant_read(self.function)
        self._grant_sources(config)
        self.event_source = sources.SqsEventSource(
            queue,
            batch_size=config.batch_size,
            max_batching_window=(
                Duration.seconds(config.batching_window_seconds)
                if config.batching_window_seconds
                else None
            ),
            report_batch_item_failures=True,
            max_concurrency=config.max_concurrency,
            # With no GPU at deploy (minInstances 0) the mapping starts disabled; the fleet
            # controller enables it when the first GPU is in service.
            enabled=config.min_instances > 0,
        )
        self.function.add_event_source(self.event_source)
        self._acknowledge(config)

    @property
    def event_source_mapping_id(self) -> str:
        return self.event_source.event_source_mapping_id

    @property
    def event_source_mapping_arn(self) -> str:
        return self.event_source.event_source_mapping_arn

    def _grant_sources(self, config: DeploymentConfig) -> None:
        """Read-only access to the configured source buckets and nothing else in S3."""
        if not config.source_buckets:
            return
        partition = Stack.of(self).partition
        objects = []
        whole: set[str] = set()  # buckets with a whole-bucket source
        prefixed: dict[str, set[str]] = {}  # bucket -> the prefixes of its sources
        for source in config.source_buckets:
            bucket, _, prefix = source.rstrip("/").partition("/")
            objects.append(f"arn:{partition}:s3:::{bucket}/{prefix + '/' if prefix else ''}*")
            if prefix:
                prefixed.setdefault(bucket, set()).add(f"{prefix}/*")
            else:
                whole.add(bucket)
        self.function.add_to_role_policy(
            iam.PolicyStatement(actions=["s3:GetObject"], resources=objects)
        )
        # ListBucket turns a missing key into a 404 (a clear "not found") instead of a 403.
        # A bucket configured only with prefixes may be listed under those prefixes alone (the
        # s3:prefix condition), so the worker cannot enumerate the rest of the bucket.
        if whole:
            self.function.add_to_role_policy(
                iam.PolicyStatement(
                    actions=["s3:ListBucket"],
                    resources=[f"arn:{partition}:s3:::{b}" for b in sorted(whole)],
                )
            )
        for bucket, prefixes in sorted(prefixed.items()):
            if bucket in whole:
                continue  # already listable as a whole
            self.function.add_to_role_policy(
                iam.PolicyStatement(
                    actions=["s3:ListBucket"],
                    resources=[f"arn:{partition}:s3:::{bucket}"],
                    conditions={"StringLike": {"s3:prefix": sorted(prefixes)}},
                )
            )

    def _acknowledge(self, config: DeploymentConfig) -> None:
        role = self.function.role
        assert role is not None
        for source in config.source_buckets:
            bucket, _, prefix = source.rstrip("/").partition("/")
            acknowledge(
                role,
                f"AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:s3:::{bucket}/"
                f"{prefix + '/' if prefix else ''}*]",
                f"The worker reads any COG under the configured source {source!r} "
                "(sourceBuckets); read-only, that location only.",
            )
