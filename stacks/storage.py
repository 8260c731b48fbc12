"""Buckets: the model archives, the exports, and the access logs of both.

All three are encrypted (SSE-S3: the GPU hosts, the Lambdas and the load balancer's log
delivery then need no KMS grants), SSL-only and blocked from public access. The model and
results buckets log their access to the logs bucket; the load balancer logs there too.
The data buckets are retained when the stack is deleted (see docs/deploy.md, "Destroy").
"""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_s3 as s3
from constructs import Construct

from stacks.common import acknowledge
from stacks.config import DeploymentConfig

#: Key prefix of the model archives in the model bucket.
MODEL_PREFIX = "models/"


class Storage(Construct):
    """The model, results and access-log buckets."""

    def __init__(self, scope: Construct, construct_id: str, *, config: DeploymentConfig) -> None:
        super().__init__(scope, construct_id)
        self.logs_bucket = s3.Bucket(
            self,
            "AccessLogs",
            encryption=s3.BucketEncryption.S3_MANAGED,  # ELB log delivery accepts SSE-S3 only
            enforce_ssl=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            lifecycle_rules=[s3.LifecycleRule(expiration=Duration.days(config.log_retention_days))],
            removal_policy=RemovalPolicy.RETAIN,
        )
        acknowledge(
            self.logs_bucket,
            "AwsSolutions-S1",
            "This is the access-log bucket itself; logging its own access would log into "
            "itself without end.",
        )
        self.model_bucket = s3.Bucket(
            self,
            "Models",
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            versioned=True,  # a replaced .mar stays recoverable
            server_access_logs_bucket=self.logs_bucket,
            server_access_logs_prefix="s3/models/",
            removal_policy=RemovalPolicy.RETAIN,
        )
        expiry = (
            [s3.LifecycleRule(expiration=Duration.days(config.results_expire_days))]
            if config.results_expire_days
            else []
        )
        self.results_bucket = s3.Bucket(
            self,
            "Results",
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            lifecycle_rules=[
                *expiry,
                s3.LifecycleRule(abort_incomplete_multipart_upload_after=Duration.days(1)),
            ],
            server_access_logs_bucket=self.logs_bucket,
            server_access_logs_prefix="s3/results/",
            removal_policy=RemovalPolicy.RETAIN,
        )
