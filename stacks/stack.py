"""The chipscale stack: the constructs of this package wired together, and its outputs.

``create_app`` is what ``app.py`` and the tests call: it reads the typed config from the
app's context, builds the stack and registers cdk-nag's AwsSolutions pack as a validation
plugin, so an unacknowledged finding fails ``cdk synth``.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aws_cdk import App, Environment, Size, Stack, Stage, Tags, Validations
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_s3_deployment as s3_deployment
from cdk_nag import AwsSolutionsChecks
from constructs import Construct

from chipscale import names
from stacks.bundle import lambda_code
from stacks.common import acknowledge, add_output
from stacks.config import ConfigError, DeploymentConfig
from stacks.fleet_controller_function import FleetController
from stacks.gpu_fleet import GpuFleet
from stacks.monitoring import Monitoring
from stacks.network import Network
from stacks.operations_function import PURPOSE as OPERATIONS_PURPOSE
from stacks.operations_function import Operations
from stacks.queue import TileQueue
from stacks.results_db import DATABASE_NAME, ResultsDatabase
from stacks.storage import MODEL_PREFIX, Storage
from stacks.worker import Worker


class ChipscaleStack(Stack):
    """Queue, worker, GPU fleet, results DB, operations, fleet controller, monitoring."""

    def __init__(self, scope: Construct, construct_id: str, *, config: DeploymentConfig) -> None:
        super().__init__(
            scope,
            construct_id,
            stack_name=config.stack_name,
            # The region is pinned, the account is the deploying credentials' (left unset so
            # synth needs no credentials and makes no lookups).
            env=Environment(region=config.region),
            description="chipscale: run a model over every map tile of an area",
        )
        self.config = config
        network = Network(self, "Network", config=config)
        storage = Storage(self, "Storage", config=config)
        queues = TileQueue(self, "Queue", config=config)
        database = ResultsDatabase(
            self, "ResultsDb", config=config, vpc=network.vpc, subnets=network.data_subnets
        )
        model_key = self._model_archive(storage)
        fleet = GpuFleet(
            self,
            "GpuFleet",
            config=config,
            vpc=network.vpc,
            subnets=network.compute_subnets,
            model_bucket=storage.model_bucket,
            model_key=model_key,
            logs_bucket=storage.logs_bucket,
            queue=queues.queue,
        )
        if self.model_deployment is not None:
            # No host boots (and no rolling update starts) before its archive is in the bucket.
            fleet.launch_template.node.add_dependency(self.model_deployment)
        code = lambda_code()
        worker = Worker(
            self,
            "Worker",
            config=config,
            code=code,
            vpc=network.vpc,
            subnets=network.compute_subnets,
            queue=queues.queue,
            db_secret=database.secret,
            db_host=database.endpoint,
            db_name=DATABASE_NAME,
            model_url=fleet.model_url,
        )
        operations = Operations(
            self,
            "Operations",
            config=config,
            code=code,
            vpc=network.vpc,
            subnets=network.compute_subnets,
            db_secret=database.secret,
            db_host=database.endpoint,
            db_name=DATABASE_NAME,
            model_url=fleet.model_url,
            results_bucket=storage.results_bucket,
        )
        controller = FleetController(
            self,
            "FleetController",
            config=config,
            code=code,
            asg_name=fleet.group.auto_scaling_group_name,
            target_group_arn=fleet.target_group.target_group_arn,
            event_source_mapping_id=worker.event_source_mapping_id,
            event_source_mapping_arn=worker.event_source_mapping_arn,
        )
        # Who talks to whom: both Lambdas to the model ALB (the worker to predict, operations
        # for `verify`'s real tile) and to the DB proxy; nothing else reaches either.
        for peer, who in ((worker, "worker"), (operations, "operations")):
            fleet.load_balancer.connections.allow_from(
                peer.security_group,
                ec2.Port.tcp(names.INFERENCE_PORT),
                f"{who} Lambda to TorchServe",
            )
        database.allow_from(worker.security_group, "worker Lambda")
        database.allow_from(operations.security_group, "operations Lambda")
        # TorchServe's Prometheus metrics (8082) for the operations Lambda alone: the
        # monitor's fallback reads them from inside the VPC (config.properties, the unit).
        fleet.security_group.connections.allow_from(
            operations.security_group,
            ec2.Port.tcp(names.METRICS_PORT),
            "operations Lambda to TorchServe metrics",
        )
        monitoring = Monitoring(
            self,
            "Monitoring",
            config=config,
            queue=queues.queue,
            dead_letter_queue=queues.dead_letter_queue,
            worker=worker.function,
            functions={
                "worker": worker.function,
                "operations": operations.function,
                "controller": controller.function,
            },
            asg_name=fleet.group.auto_scaling_group_name,
        )
        self._acknowledge_stack_wide(database)
        outputs = {
            names.OUTPUT_QUEUE_URL: (queues.queue.queue_url, "SQS queue of tile packs"),
            names.OUTPUT_DLQ_URL: (queues.dead_letter_queue.queue_url, "Dead-letter queue"),
            names.OUTPUT_RESULTS_BUCKET: (storage.results_bucket.bucket_name, "Exports bucket"),
            names.OUTPUT_MODEL_BUCKET: (storage.model_bucket.bucket_name, "Model archive bucket"),
            names.OUTPUT_WORKER_FUNCTION: (worker.function.function_name, "Worker Lambda"),
            names.OUTPUT_OPERATIONS_FUNCTION: (
                operations.function.function_name,
                f"Operations Lambda in the VPC ({OPERATIONS_PURPOSE})",
            ),
            names.OUTPUT_CONTROLLER_FUNCTION: (
                controller.function.function_name,
                "Fleet controller",
            ),
            names.OUTPUT_EVENT_SOURCE_MAPPING: (
                worker.event_source_mapping_id,
                "Worker SQS event source mapping UUID",
            ),
            names.OUTPUT_ASG_NAME: (fleet.group.auto_scaling_group_name, "GPU Auto Scaling group"),
            names.OUTPUT_ENDPOINT_URL: (fleet.model_url, "TorchServe predictions URL (in the VPC)"),
            names.OUTPUT_DB_SECRET_ARN: (database.secret.secret_arn, "DB credentials secret ARN"),
            names.OUTPUT_DB_PROXY_ENDPOINT: (database.endpoint, "RDS Proxy endpoint (in the VPC)"),
            names.OUTPUT_PER_GPU_PARAMETER: (
                controller.per_gpu_parameter.parameter_name,
                "SSM parameter: concurrency per GPU",
            ),
            names.OUTPUT_LOG_GROUP_WORKER: (worker.log_group.log_group_name, "Worker log group"),
            names.OUTPUT_DASHBOARD_URL: (monitoring.dashboard_url, "CloudWatch dashboard"),
            names.OUTPUT_ALARM_TOPIC: (monitoring.topic.topic_arn, "SNS topic of the alarms"),
            names.OUTPUT_MODEL_KEY: (model_key, "S3 key of the model archive the hosts serve"),
            names.OUTPUT_TARGET_GROUP_ARN: (
                fleet.target_group.target_group_arn,
                "Target group of the GPU hosts (healthy targets = GPUs in service)",
            ),
        }
        for key, (value, description) in outputs.items():
            add_output(self, key, value, description)
        # DBProxyTargetGroup takes no Tags in CloudFormation (CDK would add them anyway).
        Tags.of(self).add(
            "Project", config.tag, exclude_resource_types=["AWS::RDS::DBProxyTargetGroup"]
        )

    def _model_archive(self, storage: Storage) -> str:
        """The model archive's key; upload ``modelArchive`` there at deploy when it is set.

        An uploaded archive gets a content-addressed key, ``models/<modelName>-<sha12>.mar``:
        the key is in the hosts' user data, so a new archive makes a new launch template
        version and the group's rolling update replaces the hosts (the same key would leave
        old hosts serving the old model beside new ones serving the new). Without
        ``modelArchive`` the key is fixed, ``models/<modelName>.mar``, and an archive uploaded
        there by hand is rolled out with an instance refresh (docs/deploy.md). The upload's
        handler gets the /tmp the archive needs (:func:`upload_storage_mib`)."""
        self.model_deployment: s3_deployment.BucketDeployment | None = None
        if not self.config.model_archive:
            return f"{MODEL_PREFIX}{self.config.model_name}.mar"
        archive = self.config.model_archive_path
        storage_mib = upload_storage_mib(archive.stat().st_size)  # before reading the archive
        if storage_mib > LAMBDA_TMP_MAX_MIB:
            raise ConfigError(
                f"modelArchive: {archive.name} ({math.ceil(archive.stat().st_size / MIB):,} "
                f"MiB) needs {storage_mib:,} MiB of Lambda /tmp to upload at deploy (twice the "
                f"archive + {UPLOAD_HEADROOM_MIB} MiB), above Lambda's {LAMBDA_TMP_MAX_MIB:,} "
                f"MiB: leave modelArchive empty and upload it yourself to "
                f"{MODEL_PREFIX}{self.config.model_name}.mar (docs/deploy.md, The model archive)"
            )
        name = model_archive_name(self.config.model_name, archive)
        deployment = s3_deployment.BucketDeployment(
            self,
            "ModelArchive",
            sources=[s3_deployment.Source.asset(str(_stage_archive(archive, name, self)))],
            destination_bucket=storage.model_bucket,
            destination_key_prefix=MODEL_PREFIX,
            prune=False,  # other archives (and older versions) stay
            retain_on_delete=True,
            memory_limit=1024,  # unzip and S3 copy stream: memory does not grow with the archive
            ephemeral_storage_size=Size.mebibytes(storage_mib),
        )
        self.model_deployment = deployment
        self._acknowledge_bucket_deployment(storage)
        return f"{MODEL_PREFIX}{name}"

    def _acknowledge_bucket_deployment(self, storage: Storage) -> None:
        """CDK's BucketDeployment brings its own singleton Lambda; its findings, each why."""
        (handler,) = [
            c for c in self.node.children if c.node.id.startswith("Custom::CDKBucketDeployment")
        ]
        bucket_ref = self.get_logical_id(storage.model_bucket.node.default_child)  # type: ignore[arg-type]
        why_actions = (
            "CDK's BucketDeployment handler copies the archive from the CDK asset bucket to "
            "the model bucket: CDK grants read on the asset and read/write on the destination "
            "with these action groups."
        )
        findings = {
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
            "AWSLambdaBasicExecutionRole]": "AWS's minimal policy for a Lambda writing its logs.",
            "AwsSolutions-IAM5[Action::s3:GetObject*]": why_actions,
            "AwsSolutions-IAM5[Action::s3:GetBucket*]": why_actions,
            "AwsSolutions-IAM5[Action::s3:List*]": why_actions,
            "AwsSolutions-IAM5[Action::s3:DeleteObject*]": why_actions,
            "AwsSolutions-IAM5[Action::s3:Abort*]": why_actions,
            "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:s3:::cdk-hnb659fds-assets-"
            f"<AWS::AccountId>-{self.region}/*]": "Read of the CDK bootstrap asset bucket, where "
            "the archive is staged by `cdk deploy`.",
            f"AwsSolutions-IAM5[Resource::<{bucket_ref}.Arn>/*]": "Writes the archive into the "
            "model bucket (under models/; prune is off, nothing else is deleted).",
            "AwsSolutions-L1": "The handler's runtime is chosen and updated by aws-cdk-lib's "
            "BucketDeployment, not by this stack.",
        }
        for rule, reason in findings.items():
            acknowledge(handler, rule, reason)

    def _acknowledge_stack_wide(self, database: ResultsDatabase) -> None:
        acknowledge(
            database.instance.node.find_child("Secret"),
            "AwsSolutions-SMG4",
            "Single-user rotation changes the password that the warm worker and operations "
            "Lambdas read from the secret at cold start and present to RDS Proxy; a rotation "
            "during a run would fail their new connections until they restart. The DB is "
            "reachable only from the proxy's security group; rotate between runs "
            "(docs/deploy.md, Design choices).",
        )


MIB = 1 << 20
#: Lambda's /tmp (ephemeral storage): its default and its maximum, MiB.
LAMBDA_TMP_DEFAULT_MIB = 512
LAMBDA_TMP_MAX_MIB = 10_240
#: /tmp kept free beside the archive's two copies in the upload handler.
UPLOAD_HEADROOM_MIB = 256


def upload_storage_mib(archive_bytes: int) -> int:
    """MiB of /tmp the upload handler needs: it downloads the asset zip (about the archive's
    size: a .mar is already compressed) and unzips it there, so two copies plus headroom;
    never below Lambda's default."""
    need = 2 * math.ceil(archive_bytes / MIB) + UPLOAD_HEADROOM_MIB
    return max(LAMBDA_TMP_DEFAULT_MIB, need)


def model_archive_name(model_name: str, archive: Path) -> str:
    """``<model_name>-<first 12 hex digits of the archive's sha256>.mar``."""
    digest = hashlib.sha256()
    with archive.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return f"{model_name}-{digest.hexdigest()[:12]}.mar"


def _stage_archive(archive: Path, name: str, scope: Construct) -> Path:
    """A directory holding only ``archive`` under ``name``, for the deployment's asset: in the
    app's output directory (a hard link where the file system allows, else a copy), so it
    outlives this call as long as the staged assets beside it."""
    stage = Stage.of(scope)
    folder = Path(stage.outdir if stage else ".") / ".chipscale-model" / name.removesuffix(".mar")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    if not target.exists():
        try:
            os.link(archive, target)
        except OSError:
            shutil.copyfile(archive, target)
    return folder


def create_app(context: Mapping[str, Any] | None = None, *, outdir: str | None = None) -> App:
    """The CDK app: config from the context (``context`` adds to what the CLI passes), the
    stack, and the cdk-nag AwsSolutions validation plugin."""
    app = App(context=dict(context or {}), outdir=outdir)
    config = DeploymentConfig.from_context(app.node.try_get_context)
    ChipscaleStack(app, config.stack_name, config=config)
    Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return app
