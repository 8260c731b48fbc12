"""Network: a VPC over ``maxAzs`` zones with three subnet tiers and private AWS endpoints.

``public`` holds only the NAT gateway(s); ``compute`` the Lambdas, GPU hosts and internal
load balancer (egress through the NAT when there is one); ``data``, isolated, the database and
its proxy. S3 is a gateway endpoint; interface endpoints carry the AWS APIs the Lambdas and
hosts call. Why: docs/design.md, "Where each real component stands".
"""

from __future__ import annotations

from aws_cdk import aws_ec2 as ec2
from constructs import Construct

from stacks.common import log_group
from stacks.config import DeploymentConfig

CIDR = "10.40.0.0/16"
COMPUTE = "compute"
DATA = "data"

#: Interface endpoints created when ``interfaceEndpoints`` is true.
INTERFACE_SERVICES = {
    "Sqs": ec2.InterfaceVpcEndpointAwsService.SQS,
    "SecretsManager": ec2.InterfaceVpcEndpointAwsService.SECRETS_MANAGER,
    "Ssm": ec2.InterfaceVpcEndpointAwsService.SSM,
    "SsmMessages": ec2.InterfaceVpcEndpointAwsService.SSM_MESSAGES,
    "Ec2Messages": ec2.InterfaceVpcEndpointAwsService.EC2_MESSAGES,
    "Monitoring": ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_MONITORING,
    "Logs": ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_LOGS,
    "AutoScaling": ec2.InterfaceVpcEndpointAwsService.AUTOSCALING,
}


class Network(Construct):
    """The VPC, its endpoints and its flow log."""

    def __init__(self, scope: Construct, construct_id: str, *, config: DeploymentConfig) -> None:
        super().__init__(scope, construct_id)
        has_nat = config.nat_gateways > 0
        subnets = [
            ec2.SubnetConfiguration(
                name=COMPUTE,
                subnet_type=(
                    ec2.SubnetType.PRIVATE_WITH_EGRESS
                    if has_nat
                    else ec2.SubnetType.PRIVATE_ISOLATED
                ),
                cidr_mask=20,
            ),
            ec2.SubnetConfiguration(
                name=DATA, subnet_type=ec2.SubnetType.PRIVATE_ISOLATED, cidr_mask=24
            ),
        ]
        if has_nat:
            subnets.insert(
                0,
                ec2.SubnetConfiguration(
                    name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24
                ),
            )
        self.vpc = ec2.Vpc(
            self,
            "Vpc",
            ip_addresses=ec2.IpAddresses.cidr(CIDR),
            max_azs=config.max_azs,
            nat_gateways=config.nat_gateways,
            subnet_configuration=subnets,
            restrict_default_security_group=False,
            gateway_endpoints={
                "S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3)
            },
        )
        # The default security group is unused; locking it down would need a custom-resource
        # Lambda (restrict_default_security_group) for no gain: nothing is attached to it.
        self.flow_logs = log_group(self, "FlowLogs", retention_days=config.log_retention_days)
        self.vpc.add_flow_log(
            "FlowLog",
            destination=ec2.FlowLogDestination.to_cloud_watch_logs(self.flow_logs),
            traffic_type=ec2.FlowLogTrafficType.ALL,
        )
        self.compute_subnets = ec2.SubnetSelection(subnet_group_name=COMPUTE)
        self.data_subnets = ec2.SubnetSelection(subnet_group_name=DATA)
        if config.interface_endpoints:
            # One group for all endpoints: HTTPS from the VPC's own range (a literal, so the
            # checks can read it), nothing else.
            self.endpoint_security_group = ec2.SecurityGroup(
                self,
                "EndpointSecurityGroup",
                vpc=self.vpc,
                allow_all_outbound=False,
                description="chipscale interface endpoints: HTTPS from inside the VPC",
            )
            self.endpoint_security_group.add_ingress_rule(
                ec2.Peer.ipv4(CIDR), ec2.Port.tcp(443), "HTTPS from the VPC"
            )
            for name, service in INTERFACE_SERVICES.items():
                self.vpc.add_interface_endpoint(
                    name,
                    service=service,
                    subnets=self.compute_subnets,
                    private_dns_enabled=True,
                    security_groups=[self.endpoint_security_group],
                    open=False,
                )
