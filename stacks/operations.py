"""Operations: the Lambda inside the VPC that does the operator's database work.

DESIGN.md, "Reaching a private stack": the database has no public address, so
``chipscale db-setup | status | download | verify --stack NAME`` invoke this function
(``operations.handler``, same bundle as the worker), which connects through the RDS Proxy,
writes exports to the results bucket and answers with their keys (the CLI downloads them with
the operator's own credentials), and for ``verify`` scores one tile through the internal
load balancer.
"""

from __future__ import annotations

from aws_cdk import Duration, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from chipscale import names
from stacks.common import LAMBDA_ARCHITECTURE, LAMBDA_RUNTIME, acknowledge, log_group
from stacks.config import DeploymentConfig

HANDLER = "operations.handler"


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
        results_bucket: s3.IBucket,
        queues: list[sqs.IQueue],
        db_secret: secretsmanager.ISecret,
        db_host: str,
        db_name: str,
        model_url: str,
    ) -> None:
        super().__init__(scope, construct_id)
        self.security_group = ec2.SecurityGroup(
            self,
            "SecurityGroup",
            vpc=vpc,
            allow_all_outbound=False,
            description="chipscale operations Lambda: out to the DB proxy, the model and AWS",
        )
        self.security_group.add_egress_rule(
            ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "HTTPS: S3 and AWS endpoints"
        )
        self.log_group = log_group(self, "Logs", retention_days=config.log_retention_days)
        self.function = lambda_.Function(
            self,
            "Function",
            description="chipscale operations: db-setup, status, export, verify inside the VPC",
            runtime=LAMBDA_RUNTIME,
            architecture=LAMBDA_ARCHITECTURE,
            handler=HANDLER,
            code=code,
            memory_size=1024,
            timeout=Duration.minutes(15),  # a large export streams for minutes
            vpc=vpc,
            vpc_subnets=subnets,
            security_groups=[self.security_group],
            log_group=self.log_group,
            environment={
                names.ENV_DB_SECRET_ARN: db_secret.secret_arn,
                names.ENV_DB_HOST: db_host,
                names.ENV_DB_NAME: db_name,
                names.ENV_RESULTS_BUCKET: results_bucket.bucket_name,
                names.ENV_QUEUE_URL: queues[0].queue_url,
                # `verify` scores a real tile through the internal load balancer from here.
                names.ENV_MODEL_URL: model_url,
            },
        )
        db_secret.grant_read(self.function)
        # Exports: write them, read them back (presigned download links), nothing else.
        self.function.add_to_role_policy(
            iam.PolicyStatement(
                actions=["s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload"],
                resources=[results_bucket.arn_for_objects("*")],
            )
        )
        # `status` reports queue and dead-letter depths.
        self.function.add_to_role_policy(
            iam.PolicyStatement(
                actions=["sqs:GetQueueAttributes"], resources=[q.queue_arn for q in queues]
            )
        )
        role = self.function.role
        assert role is not None
        for policy in ("AWSLambdaBasicExecutionRole", "AWSLambdaVPCAccessExecutionRole"):
            acknowledge(
                role,
                f"AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/{policy}]",
                f"{policy} is AWS's minimal policy for a Lambda writing its logs"
                + (" and attaching its VPC network interfaces." if "VPC" in policy else "."),
            )
        bucket_ref = Stack.of(self).get_logical_id(results_bucket.node.default_child)  # type: ignore[arg-type]
        acknowledge(
            role,
            f"AwsSolutions-IAM5[Resource::<{bucket_ref}.Arn>/*]",
            "Exports are written under keys named per job and run; the function may write "
            "and read objects of the results bucket only.",
        )
        acknowledge(
            self.function,
            "AwsSolutions-L1",
            "Python 3.12 is pinned on purpose: it shares the worker's bundle, whose binary "
            "wheels are built for cp312 (stacks/bundle.py).",
        )
