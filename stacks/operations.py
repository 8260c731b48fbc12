"""Operations: the Lambda inside the VPC that does the operator's work on private resources.

DESIGN.md, "Reaching a private stack": the database and the model endpoint have no public
address, so ``chipscale verify --stack NAME`` invokes this function (``operations.handler``,
same bundle as the worker), which scores one tile through the internal load balancer and
checks the results schema through the RDS Proxy. That is all it does today, and all it is
allowed: the secret's read, HTTPS to AWS endpoints (Secrets Manager), and the security-group
paths to the load balancer and the proxy that the stack adds. ``db-setup``, ``status`` and
``export`` arrive with the cloud data plane; each adds its own grants here when it lands
(export: write/read in the results bucket; status: sqs:GetQueueAttributes on the queues).
"""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from chipscale import names
from stacks.common import python_function
from stacks.config import DeploymentConfig

HANDLER = "operations.handler"
#: What the function does today, for its description and the stack output's.
PURPOSE = "verify today; db-setup, status and export with the cloud data plane"


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
            # verify takes seconds; the later export streams for minutes.
            timeout=Duration.minutes(15),
            vpc=vpc,
            vpc_subnets=subnets,
            environment={
                # verify's schema check: the proxy, with the password read from the secret.
                names.ENV_DB_SECRET_ARN: db_secret.secret_arn,
                names.ENV_DB_HOST: db_host,
                names.ENV_DB_NAME: db_name,
                # verify scores a real tile through the internal load balancer from here.
                names.ENV_MODEL_URL: model_url,
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
        # Nothing else yet: export and status add their S3 and SQS grants (and environment)
        # here when the cloud data plane brings those actions.
