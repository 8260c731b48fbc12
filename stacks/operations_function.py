"""Operations: the Lambda inside the VPC that does the operator's work on private resources.

``chipscale verify | db-setup | status | download --stack NAME`` and ``push --stack`` invoke
it (``operations.handler``, actions in :mod:`chipscale.ops.operations_actions`). It may read
the secret, reach AWS endpoints, the load balancer and the proxy, and write under two prefixes
of the results bucket. Why: docs/design.md, "Reaching a private stack".
"""

from __future__ import annotations

from aws_cdk import Duration, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from chipscale import names
from chipscale.ops.operations_actions import DONE_TILES_PREFIX, EXPORT_PREFIX
from stacks.common import acknowledge, python_function
from stacks.config import DeploymentConfig

HANDLER = "operations.handler"
#: What the function does today, for its description and the stack output's.
PURPOSE = "verify, db-setup, status, export, record-job, done-tiles, job, scrape-metrics"
#: Results-bucket prefixes the function writes (the keys of chipscale.ops.operations_actions).
WRITE_PREFIXES = (EXPORT_PREFIX, DONE_TILES_PREFIX)
#: Lambda's /tmp for an export before its upload: 10 GiB (the most Lambda allows) holds a
#: GeoJSON of some 20 million tiles; /tmp is billed only while the function runs.
EPHEMERAL_STORAGE_MIB = 10240


class Operations(Construct):
    """The operations function, its log group and security group."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: DeploymentConfig,
        code: lambda_.Code,
        vpc: ec2.IVpc,
        subnets: ec2.SubnetSelection,
        db_secret: secretsmanager.ISecret,
        db_host: str,
        db_name: str,
        model_url: str,
        results_bucket: s3.IBucket,
    ) -> None:
        super().__init__(scope, construct_id)
        parts = python_function(
            self,
            description=f"chipscale operations in the VPC: {PURPOSE}",
            security_group_description=(
                "chipscale operations Lambda: out to the DB proxy, the model and AWS"
            ),
            handler=HANDLER,
            code=code,
            log_retention_days=config.log_retention_days,
            memory_size=1024,
            # verify takes seconds; an export of millions of rows streams for minutes.
            timeout=Duration.minutes(15),
            ephemeral_storage_mib=EPHEMERAL_STORAGE_MIB,
            vpc=vpc,
            vpc_subnets=subnets,
            environment={
                # verify's schema check: the proxy, with the password read from the secret.
                names.ENV_DB_SECRET_ARN: db_secret.secret_arn,
                names.ENV_DB_HOST: db_host,
                names.ENV_DB_NAME: db_name,
                # verify scores a real tile through the internal load balancer from here.
                names.ENV_MODEL_URL: model_url,
                # export, done-tiles (and job, for a large record) write their answers here.
                names.ENV_RESULTS_BUCKET: results_bucket.bucket_name,
            },
        )
        self.function = parts.function
        self.log_group = parts.log_group
        assert parts.security_group is not None
        self.security_group = parts.security_group
        self.security_group.add_egress_rule(
            ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "HTTPS: Secrets Manager and AWS endpoints"
        )
        db_secret.grant_read(self.function)
        for prefix in WRITE_PREFIXES:
            results_bucket.grant_put(self.function, f"{prefix}*")
        self._acknowledge(results_bucket)

    def _acknowledge(self, results_bucket: s3.IBucket) -> None:
        role = self.function.role
        assert role is not None
        policy = role.node.find_child("DefaultPolicy")
        ref = Stack.of(self).get_logical_id(results_bucket.node.default_child)  # type: ignore[arg-type]
        for prefix in WRITE_PREFIXES:
            acknowledge(
                policy,
                f"AwsSolutions-IAM5[Resource::<{ref}.Arn>/{prefix}*]",
                f"Exports and resume lists are new objects under {prefix} of the results "
                "bucket, named per job and time: the function writes only under that prefix.",
            )
        acknowledge(
            policy,
            "AwsSolutions-IAM5[Action::s3:Abort*]",
            "s3:AbortMultipartUpload (CDK's grantPut) lets a failed large export clean up its "
            "own multipart upload under the same prefixes.",
        )
