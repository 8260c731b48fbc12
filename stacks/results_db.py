"""Results DB: RDS for PostgreSQL behind RDS Proxy, in the isolated ``data`` subnets.

Credentials are generated into Secrets Manager (the Lambdas get the ARN, never the value);
the proxy requires TLS and the instance forces SSL; only the proxy reaches the instance and
only the Lambdas reach the proxy. Why RDS and not Aurora Serverless v2: docs/design.md, "The
results store". Deletion protection is off until the first create has succeeded (a protected
instance cannot be rolled back): docs/deploy.md, "Deletion protection: the two-step".
"""

from __future__ import annotations

from aws_cdk import Annotations, Duration, RemovalPolicy
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_rds as rds
from constructs import Construct

from chipscale import names
from stacks.common import acknowledge
from stacks.config import DeploymentConfig

DATABASE_NAME = "chipscale"
DATABASE_USER = "chipscale"
#: PostgreSQL 17: current (not in cfn-lint's deprecated list) and supported by RDS Proxy.
ENGINE_VERSION = rds.PostgresEngineVersion.VER_17_9


class ResultsDatabase(Construct):
    """The PostgreSQL instance, its credentials secret and the RDS Proxy in front."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: DeploymentConfig,
        vpc: ec2.IVpc,
        subnets: ec2.SubnetSelection,
    ) -> None:
        super().__init__(scope, construct_id)
        engine = rds.DatabaseInstanceEngine.postgres(version=ENGINE_VERSION)
        self.instance_security_group = ec2.SecurityGroup(
            self,
            "InstanceSecurityGroup",
            vpc=vpc,
            allow_all_outbound=False,
            description="chipscale results DB: PostgreSQL from the RDS Proxy only",
        )
        self.proxy_security_group = ec2.SecurityGroup(
            self,
            "ProxySecurityGroup",
            vpc=vpc,
            allow_all_outbound=False,
            description="chipscale RDS Proxy: PostgreSQL from the chipscale Lambdas only",
        )
        self.instance = rds.DatabaseInstance(
            self,
            "Instance",
            engine=engine,
            instance_type=ec2.InstanceType(config.db_instance_class),
            vpc=vpc,
            vpc_subnets=subnets,
            security_groups=[self.instance_security_group],
            publicly_accessible=False,
            credentials=rds.Credentials.from_generated_secret(DATABASE_USER),
            database_name=DATABASE_NAME,
            storage_encrypted=True,
            storage_type=rds.StorageType.GP3,
            allocated_storage=config.db_allocated_storage_gb,
            max_allocated_storage=config.db_max_allocated_storage_gb,
            multi_az=config.db_multi_az,
            deletion_protection=config.db_deletion_protection,
            backup_retention=Duration.days(config.db_backup_retention_days),
            # A rollback or a destroy deletes the instance and keeps a final snapshot.
            removal_policy=RemovalPolicy.SNAPSHOT,
            iam_authentication=True,
            auto_minor_version_upgrade=True,
            parameter_group=rds.ParameterGroup(
                self, "Parameters", engine=engine, parameters={"rds.force_ssl": "1"}
            ),
        )
        assert self.instance.secret is not None
        self.secret = self.instance.secret
        self.proxy = rds.DatabaseProxy(
            self,
            "Proxy",
            # Proxy names are unique per account and region: CDK's default is the id, "Proxy".
            db_proxy_name=names.db_proxy_name(config.stack_name),
            proxy_target=rds.ProxyTarget.from_instance(self.instance),
            secrets=[self.secret],
            vpc=vpc,
            vpc_subnets=subnets,
            security_groups=[self.proxy_security_group],
            require_tls=True,
            iam_auth=False,  # clients log in with the secret's password (over TLS)
            idle_client_timeout=Duration.minutes(30),
            max_connections_percent=90,
        )
        # DatabaseProxy itself lets the proxy's group in to the instance, and nothing else
        # is: the Lambdas are let in to the proxy by the stack (``allow_from``).
        acknowledge(
            self.instance,
            "AwsSolutions-RDS11",
            "5432 is reachable only from the RDS Proxy's security group in isolated subnets; a "
            "non-default port would add configuration without hiding anything.",
        )
        if not config.db_multi_az:
            acknowledge(
                self.instance,
                "AwsSolutions-RDS3",
                "dbMultiAz is false in this deployment's config: results are recomputable from "
                "the queue and a standby doubles the DB cost; set dbMultiAz=true to add one.",
            )
        if not config.db_deletion_protection:
            acknowledge(
                self.instance,
                "AwsSolutions-RDS10",
                "dbDeletionProtection is false, the default, so that a failed first deploy can "
                "roll back (RDS refuses to delete a protected instance: ROLLBACK_FAILED); the "
                "guide turns it on once the create has succeeded, and the Snapshot deletion "
                "policy keeps a final snapshot meanwhile.",
            )
            Annotations.of(self.instance).add_warning_v2(
                "chipscale:dbDeletionProtectionOff",
                "dbDeletionProtection is false: right for the first deploy of a stack; once it "
                "has succeeded, deploy again with -c dbDeletionProtection=true (docs/deploy.md).",
            )

    @property
    def endpoint(self) -> str:
        """The proxy's host name: the only address clients use."""
        return self.proxy.endpoint

    def allow_from(self, peer: ec2.IConnectable, description: str) -> None:
        """Let ``peer`` connect to the proxy on 5432."""
        self.proxy.connections.allow_from(peer, ec2.Port.POSTGRES, description)
