"""Names shared by the CDK stack, the Lambdas, the GPU hosts and the operator commands.

A name that two of them must agree on (a stack output key, a metric, an environment
variable) is defined here once, so a rename cannot leave one side reading what the other no
longer writes. Plain strings, and the pure functions that derive a stack's physical names:
this module is imported by the Lambda bundle, the CDK app and the CLI alike.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

# ---------------------------------------------------------------------------- stack outputs
# CloudFormation output keys of the chipscale stack; `--stack NAME` resolves resources by them.
OUTPUT_QUEUE_URL: Final = "QueueUrl"
OUTPUT_DLQ_URL: Final = "DeadLetterQueueUrl"
OUTPUT_RESULTS_BUCKET: Final = "ResultsBucketName"
OUTPUT_MODEL_BUCKET: Final = "ModelBucketName"
OUTPUT_WORKER_FUNCTION: Final = "WorkerFunctionName"
OUTPUT_OPERATIONS_FUNCTION: Final = "OperationsFunctionName"
OUTPUT_CONTROLLER_FUNCTION: Final = "FleetControllerFunctionName"
OUTPUT_EVENT_SOURCE_MAPPING: Final = "WorkerEventSourceMappingId"
OUTPUT_ASG_NAME: Final = "GpuAutoScalingGroupName"
OUTPUT_ENDPOINT_URL: Final = "ModelEndpointUrl"
OUTPUT_DB_SECRET_ARN: Final = "DatabaseSecretArn"
OUTPUT_DB_PROXY_ENDPOINT: Final = "DatabaseProxyEndpoint"
OUTPUT_PER_GPU_PARAMETER: Final = "PerGpuConcurrencyParameterName"
OUTPUT_LOG_GROUP_WORKER: Final = "WorkerLogGroupName"
OUTPUT_DASHBOARD_URL: Final = "DashboardUrl"
OUTPUT_ALARM_TOPIC: Final = "AlarmTopicArn"
#: S3 key (in OUTPUT_MODEL_BUCKET) of the model archive the GPU hosts serve.
OUTPUT_MODEL_KEY: Final = "ModelArchiveKey"
#: ARN of the load balancer's target group of the GPU hosts (its healthy targets are the GPUs
#: in service for the fleet controller and `chipscale verify`).
OUTPUT_TARGET_GROUP_ARN: Final = "ModelTargetGroupArn"

# ---------------------------------------------------------------------------- metrics
#: CloudWatch namespace of the worker's EMF metrics (Powertools `namespace`).
METRICS_NAMESPACE: Final = "chipscale"
#: Powertools service name of the worker Lambda (a metric dimension).
WORKER_SERVICE: Final = "chipscale-worker"
METRIC_TILES_OK: Final = "TilesOk"
METRIC_TILES_EMPTY: Final = "TilesEmpty"
METRIC_TILES_ERROR: Final = "TilesError"
METRIC_READ_SECONDS: Final = "ReadSeconds"
METRIC_PREDICT_SECONDS: Final = "PredictSeconds"
METRIC_WRITE_SECONDS: Final = "WriteSeconds"
METRIC_MESSAGES_REJECTED: Final = "MessagesRejected"
#: CloudWatch agent namespace and metric names of the GPU hosts (nvidia_smi plugin).
GPU_METRICS_NAMESPACE: Final = "chipscale/gpu"
GPU_METRIC_UTILIZATION: Final = "nvidia_smi_utilization_gpu"
GPU_METRIC_MEMORY_UTILIZATION: Final = "nvidia_smi_utilization_memory"
GPU_METRIC_MEMORY_USED: Final = "nvidia_smi_memory_used"
GPU_METRIC_MEMORY_TOTAL: Final = "nvidia_smi_memory_total"
#: The dimensions of one GPU's series (the agent's ``aggregation_dimensions``): the instance
#: and the GPU's index on it ("0", "1", ...), so multi-GPU instances give one series a GPU.
GPU_DIMENSION_INSTANCE: Final = "InstanceId"
GPU_DIMENSION_INDEX: Final = "index"
#: Powertools' dimension that names the worker's metrics after its function (the name
#: Powertools itself uses for ``ColdStart``). With it, the worker's tiles/s belong to one
#: stack; without it (``service`` alone) two stacks in one account and region add up.
WORKER_FUNCTION_DIMENSION: Final = "function_name"

# ---------------------------------------------------------------------------- environment
# Environment variables the stack sets on the Lambdas and the GPU hosts' boot script reads.
ENV_QUEUE_URL: Final = "CHIPSCALE_QUEUE_URL"
ENV_MODEL_URL: Final = "CHIPSCALE_MODEL_URL"
ENV_DB_SECRET_ARN: Final = "CHIPSCALE_DB_SECRET_ARN"
ENV_DB_HOST: Final = "CHIPSCALE_DB_HOST"
ENV_DB_NAME: Final = "CHIPSCALE_DB_NAME"
#: Comma-separated ``s3://bucket/prefix/`` and ``http(s)://host/prefix/`` sources the worker
#: may read, compared path segment by path segment (chipscale.cloud.allowed_sources). No s3://
#: prefix: no s3:// source; no http(s):// prefix: any http(s) source. The IAM role reads only
#: these buckets anyway.
ENV_ALLOWED_SOURCES: Final = "CHIPSCALE_ALLOWED_SOURCES"
ENV_MAX_TILES_PER_MESSAGE: Final = "CHIPSCALE_MAX_TILES_PER_MESSAGE"
ENV_DEFAULT_JOB: Final = "CHIPSCALE_DEFAULT_JOB"
ENV_DEFAULT_SOURCE: Final = "CHIPSCALE_DEFAULT_SOURCE"
ENV_RESULTS_BUCKET: Final = "CHIPSCALE_RESULTS_BUCKET"
# The fleet controller (Lambda concurrency follows the GPUs in service).
ENV_ASG_NAME: Final = "CHIPSCALE_ASG_NAME"
ENV_EVENT_SOURCE_MAPPING: Final = "CHIPSCALE_EVENT_SOURCE_MAPPING"
ENV_GPUS_PER_INSTANCE: Final = "CHIPSCALE_GPUS_PER_INSTANCE"
ENV_PER_GPU_PARAMETER: Final = "CHIPSCALE_PER_GPU_PARAMETER"
ENV_PER_GPU_DEFAULT: Final = "CHIPSCALE_PER_GPU_CONCURRENCY"
#: The worker's reserved concurrency (0 or unset: none): MaximumConcurrency never exceeds it.
ENV_RESERVED_CONCURRENCY: Final = "CHIPSCALE_RESERVED_CONCURRENCY"
#: The model's target group: only instances that are healthy targets in it count as in service.
ENV_TARGET_GROUP_ARN: Final = "CHIPSCALE_TARGET_GROUP_ARN"

# The GPU hosts' boot script (model_server/gpu_host_boot.sh) reads these from the user data.
HOST_ENV_REGION: Final = "CHIPSCALE_REGION"
HOST_ENV_MODEL_BUCKET: Final = "CHIPSCALE_MODEL_BUCKET"
HOST_ENV_MODEL_KEY: Final = "CHIPSCALE_MODEL_KEY"
HOST_ENV_MODEL_NAME: Final = "CHIPSCALE_MODEL_NAME"
HOST_ENV_WORKERS_PER_GPU: Final = "CHIPSCALE_WORKERS_PER_GPU"
HOST_ENV_ASG_NAME: Final = "CHIPSCALE_ASG_NAME"
HOST_ENV_LIFECYCLE_HOOK: Final = "CHIPSCALE_LIFECYCLE_HOOK"
HOST_ENV_WHEELHOUSE_URI: Final = "CHIPSCALE_WHEELHOUSE_URI"
HOST_ENV_TORCH_VERSION: Final = "CHIPSCALE_TORCH_VERSION"
#: Lowest NVIDIA driver the PyPI torch build needs (empty: unknown; a wheelhouse's manifest says).
HOST_ENV_MIN_DRIVER: Final = "CHIPSCALE_MIN_DRIVER"
HOST_ENV_CW_NAMESPACE: Final = "CHIPSCALE_CW_NAMESPACE"
#: Log group the hosts' CloudWatch agent ships the boot output and TorchServe's logs to.
HOST_ENV_LOG_GROUP: Final = "CHIPSCALE_LOG_GROUP"
#: Optional override of the readiness wait (seconds); the stack sets the boot deadline instead.
HOST_ENV_READY_TIMEOUT: Final = "CHIPSCALE_READY_TIMEOUT"
#: Epoch second by which the boot must have completed the lifecycle action (the hook's timeout
#: counted from the start of user data, less a margin): past it the script abandons.
HOST_ENV_BOOT_DEADLINE: Final = "CHIPSCALE_BOOT_DEADLINE"
#: The termination lifecycle hook the host's drain watcher completes, and how long it waits for
#: TorchServe's requests in flight first (seconds: the response timeout).
HOST_ENV_DRAIN_HOOK: Final = "CHIPSCALE_DRAIN_HOOK"
HOST_ENV_DRAIN_TIMEOUT: Final = "CHIPSCALE_DRAIN_TIMEOUT"

# ---------------------------------------------------------------------------- identifiers
#: Lifecycle hook that holds a new GPU instance in Pending:Wait until TorchServe is READY.
LIFECYCLE_HOOK_LAUNCH: Final = "chipscale-model-ready"
#: Lifecycle hook that holds a terminating GPU instance until TorchServe has drained.
LIFECYCLE_HOOK_TERMINATE: Final = "chipscale-drain"
#: systemd unit on the GPU hosts that completes LIFECYCLE_HOOK_TERMINATE.
DRAIN_UNIT: Final = "chipscale-drain.service"
#: systemd unit running TorchServe on the GPU hosts.
TORCHSERVE_UNIT: Final = "chipscale-torchserve.service"
#: TorchServe ports (inference, management, metrics) on the GPU hosts and in the tests.
INFERENCE_PORT: Final = 8080
MANAGEMENT_PORT: Final = 8081
METRICS_PORT: Final = 8082

# ---------------------------------------------------------------------------- physical names
#: RDS Proxy names: 1-63 characters, letters, digits and single hyphens, a letter first.
_DB_PROXY_NAME_MAX = 63


def db_proxy_name(stack_name: str) -> str:
    """The RDS Proxy's name, unique per account and region: ``<stackName>-proxy``.

    A stack name RDS would not take as is (capitals, ``--``, a trailing hyphen, too long) is
    folded to lower case and cut, with a hash of the whole name added so two stacks never
    fold to one proxy name.

    >>> db_proxy_name("chipscale-dev")
    'chipscale-dev-proxy'
    >>> db_proxy_name("Chipscale")
    'chipscale-6990aa-proxy'
    """
    simple = f"{stack_name}-proxy"
    if re.fullmatch(r"[a-z](-?[a-z0-9])*", stack_name) and len(simple) <= _DB_PROXY_NAME_MAX:
        return simple
    folded = re.sub(r"[^a-z0-9]+", "-", stack_name.lower()).strip("-")[:49].rstrip("-")
    digest = hashlib.sha256(stack_name.encode()).hexdigest()[:6]
    return f"{folded or 'stack'}-{digest}-proxy"


# ------------------------------------------------------------------------------ source kinds
#: File name endings of a mosaic source: a COG list, then a STAC item collection.
MOSAIC_LIST_SUFFIXES: Final = (".txt",)
MOSAIC_COLLECTION_SUFFIXES: Final = (".json", ".geojson")


def is_mosaic_name(source: str) -> bool:
    """Whether ``source`` names a mosaic (a ``.txt`` COG list or a ``.json``/``.geojson``
    STAC collection), by its name only. Only a local file is a mosaic (its assets may be
    remote): a URL is always a raster, so a worker never fetches and trusts a list.

    >>> is_mosaic_name("scenes.txt"), is_mosaic_name("s3://bucket/notes.txt")
    (True, False)
    """
    name = source.lower().split("?", 1)[0]
    if "://" in name or name.startswith("/vsi"):
        return False
    return name.endswith(MOSAIC_LIST_SUFFIXES + MOSAIC_COLLECTION_SUFFIXES)
