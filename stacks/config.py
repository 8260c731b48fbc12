"""The typed deployment config: one frozen dataclass read from cdk.json's context.

Every key has a default in cdk.json and can be overridden on the command line with
``-c key=value`` (``npx cdk deploy -c instanceType=g6.xlarge -c maxInstances=4``). Values
given with ``-c`` arrive as strings, so each field is coerced from its annotated type; all the
problems found are reported together, each naming its key, before a single resource is built
(titiler's ``StackSettings`` is the model: typed fields, a description per field, cross-field
rules in one validator).
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from chipscale.cloud.allowed_sources import check_prefix
from chipscale.errors import InvalidMessageError
from chipscale.ops import feed
from chipscale.ops.wheelhouse import DEFAULT_PREFIX, DEFAULT_TORCH_VERSION

#: GPUs per instance of the GPU families the fleet accepts (NVIDIA A10G, L4, L40S, T4).
#: Sizes not listed carry one GPU.
_MULTI_GPU_SIZES: dict[str, dict[str, int]] = {
    "g4dn": {"12xlarge": 4, "metal": 8},
    "g5": {"12xlarge": 4, "24xlarge": 4, "48xlarge": 8},
    "g6": {"12xlarge": 4, "24xlarge": 4, "48xlarge": 8},
    "g6e": {"12xlarge": 4, "24xlarge": 4, "48xlarge": 8},
}
_INSTANCE_TYPE = re.compile(r"^(?P<family>g4dn|g5|g6|g6e)\.(?P<size>\d*xlarge|metal)$")

#: CloudWatch Logs accepts only these retention periods (days).
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827)

#: The Deep Learning Base AMI (NVIDIA driver, CUDA, Docker; no framework): the hosts install
#: the exact torch the model was exported with, so a framework AMI's torch would be unused.
#: The repository root: relative paths in the config (``modelArchive``) are read from here.
REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_AMI_PARAMETER = (
    "/aws/service/deeplearning/ami/x86_64/"
    "base-oss-nvidia-driver-gpu-amazon-linux-2023/latest/ami-id"
)


class ConfigError(ValueError):
    """The deployment config in cdk.json / ``-c`` is invalid; the message names every key."""


def _describe(text: str, default: Any = MISSING, **kwargs: Any) -> Any:
    return field(default=default, metadata={"description": text}, **kwargs)


@dataclass(frozen=True)
class DeploymentConfig:
    """Everything a deployment may choose. Keys are the camelCase of the field names."""

    stack_name: str = _describe(
        "CloudFormation stack name; `--stack NAME` of the CLI.", "chipscale"
    )
    region: str = _describe("AWS region the stack deploys to.", "us-east-1")
    tag: str = _describe("Value of the `Project` tag put on every resource.", "chipscale")
    # network
    max_azs: int = _describe("Availability zones the VPC spans (2 or more).", 2)
    nat_gateways: int = _describe(
        "NAT gateways (0 = none: the GPU hosts install from `wheelhousePrefix` in the model "
        "bucket and the worker reads only s3:// sources).",
        1,
    )
    interface_endpoints: bool = _describe(
        "Interface endpoints (SQS, Secrets Manager, SSM, CloudWatch, Logs, Auto Scaling) so "
        "AWS API traffic stays off the NAT; required when natGateways is 0.",
        True,
    )
    # GPU fleet
    instance_type: str = _describe("GPU instance type (g4dn, g5, g6 or g6e family).", "g5.xlarge")
    min_instances: int = _describe("Fewest GPU instances; 0 scales to zero when idle.", 0)
    max_instances: int = _describe("Most GPU instances.", 2)
    ami_parameter: str = _describe(
        "Public SSM parameter naming the GPU AMI: where to find an `amiId`; without one, each "
        "new host resolves it at its launch (never at deploy).",
        DEFAULT_AMI_PARAMETER,
    )
    ami_id: str = _describe(
        "The GPU AMI, pinned (ami-...): hosts change AMI only when this does (empty: "
        "`amiParameter` at each launch, and synth warns).",
        "",
    )
    root_volume_gb: int = _describe("Root EBS volume of a GPU host (gp3, encrypted).", 150)
    workers_per_gpu: int = _describe(
        "TorchServe workers per GPU (default: the fewest that keep the GPU 90 % busy given "
        "the handler's serial CPU, chipscale.ops.feed.workers_per_gpu over its MEASURED "
        "figures).",
        feed.MEASURED.workers_per_gpu(),
    )
    per_gpu_concurrency: int = _describe(
        "Worker Lambda concurrency per GPU in service (the fleet controller multiplies it; "
        "`chipscale tune` rewrites the SSM parameter). Default: Little's law over measured "
        "read and predict times, chipscale.ops.feed.per_gpu_concurrency.",
        feed.MEASURED.per_gpu_concurrency(),
    )
    backlog_per_instance: int = _describe(
        "Scaling target: queued + in-flight messages per GPU instance.", 200
    )
    instance_warmup_seconds: int = _describe("Seconds before a new host's metrics count.", 600)
    lifecycle_hook_timeout_seconds: int = _describe(
        "How long a new host may take to get every TorchServe worker READY before it is "
        "abandoned (30-7200).",
        1800,
    )
    torch_version: str = _describe(
        "torch installed on the hosts; must match the torch the model was exported with.",
        DEFAULT_TORCH_VERSION,
    )
    wheelhouse_prefix: str = _describe(
        "Key prefix of the wheelhouse in the model bucket the hosts install from, built by "
        "`chipscale wheelhouse build` (empty: PyPI through the NAT gateway).",
        DEFAULT_PREFIX,
    )
    # model
    model_name: str = _describe("Name TorchServe serves the model under.", "chipscale")
    model_archive: str = _describe(
        "Path of a .mar to upload to the model bucket at deploy, under the content-addressed "
        "key models/<modelName>-<sha256[:12]>.mar so a new archive rolls the hosts (empty: "
        "upload it yourself to models/<modelName>.mar and start an instance refresh).",
        "",
    )
    # worker Lambda and queue
    lambda_memory_mb: int = _describe("Worker Lambda memory (MB).", 2048)
    lambda_timeout_seconds: int = _describe("Worker Lambda timeout (s).", 120)
    batch_size: int = _describe("SQS messages per worker invocation.", 4)
    batching_window_seconds: int = _describe("Seconds the event source waits to fill a batch.", 1)
    max_concurrency: int = _describe(
        "Initial MaximumConcurrency of the SQS event source (the fleet controller then sets it).",
        2,
    )
    reserved_concurrency: int = _describe(
        "Reserved concurrency of the worker (0 = none; new accounts have only 10 in all). The "
        "fleet controller never sets MaximumConcurrency above it, so when set it must cover "
        "perGpuConcurrency x maxInstances x GPUs per instance.",
        0,
    )
    max_tiles_per_message: int = _describe("Most tiles one queue message may carry.", 100)
    max_receive_count: int = _describe(
        "Receives before a message moves to the DLQ (AWS advises at least 5 for a Lambda "
        "event source: throttled batches spend receives too).",
        5,
    )
    source_buckets: tuple[str, ...] = _describe(
        "S3 buckets (optionally bucket/prefix) the worker may read COGs from.", ()
    )
    default_job: str = _describe(
        "Job of chip-n-scale single-tile messages ({x, y, z}), which name none (empty: refused).",
        "",
    )
    default_source: str = _describe(
        "COG of chip-n-scale single-tile messages, which name none (empty: refused).", ""
    )
    # database
    db_instance_class: str = _describe("RDS instance class (without `db.`).", "t4g.medium")
    db_allocated_storage_gb: int = _describe("Initial DB storage (GB, gp3).", 20)
    db_max_allocated_storage_gb: int = _describe("Storage autoscaling ceiling (GB).", 200)
    db_multi_az: bool = _describe("Standby in a second AZ.", False)
    db_deletion_protection: bool = _describe(
        "Refuse to delete the DB. Off for the first deploy, so that a failed create can roll "
        "back; turn it on once the stack exists (docs/deploy.md).",
        False,
    )
    db_backup_retention_days: int = _describe("Automated backup retention (1-35 days).", 7)
    # retention and monitoring
    log_retention_days: int = _describe("CloudWatch Logs retention (days).", 30)
    results_expire_days: int = _describe("Days before exports in the results bucket expire.", 30)
    alarm_email: str = _describe("E-mail subscribed to the alarm topic (empty: none).", "")
    oldest_message_alarm_seconds: int = _describe("Alarm when a message waits this long.", 3600)

    # ------------------------------------------------------------------ derived values
    @property
    def gpus_per_instance(self) -> int:
        """GPUs of one instance of ``instance_type``."""
        match = _INSTANCE_TYPE.match(self.instance_type)
        if match is None:  # validate() refuses these; keep the property total
            return 1
        return _MULTI_GPU_SIZES[match["family"]].get(match["size"], 1)

    @property
    def planned_concurrency(self) -> int:
        """Most worker Lambdas at once with the fleet full: the reservation when one is set,
        else perGpuConcurrency x maxInstances x GPUs per instance (maxConcurrency if higher),
        as ``chipscale verify`` sizes the Lambda quota."""
        if self.reserved_concurrency:
            return self.reserved_concurrency
        full_fleet = self.per_gpu_concurrency * self.max_instances * self.gpus_per_instance
        return max(full_fleet, self.max_concurrency)

    @property
    def visibility_timeout_seconds(self) -> int:
        """SQS visibility timeout: AWS asks for 6x the function timeout plus the batching window,
        so a message is not handed out again while a slow invocation still holds it."""
        return 6 * self.lambda_timeout_seconds + self.batching_window_seconds

    @property
    def model_archive_path(self) -> Path:
        """``model_archive`` as an absolute path (relative ones are read from the repo root)."""
        path = Path(self.model_archive)
        return path if path.is_absolute() else REPO_ROOT / path

    # ------------------------------------------------------------------ construction
    @classmethod
    def context_keys(cls) -> dict[str, str]:
        """Field name -> cdk.json context key."""
        return {f.name: _camel(f.name) for f in fields(cls)}

    @classmethod
    def from_context(cls, get: Callable[[str], Any]) -> DeploymentConfig:
        """Build from a context getter (``node.try_get_context``); raise one ConfigError listing
        every bad key. Keys not set fall back to the defaults above."""
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        problems: list[str] = []
        for f in fields(cls):
            key = _camel(f.name)
            raw = get(key)
            if raw is None:
                continue
            try:
                values[f.name] = _coerce(raw, hints[f.name])
            except (TypeError, ValueError) as exc:
                problems.append(f"{key}: {exc} (got {raw!r})")
        if problems:
            raise ConfigError(_report(problems))
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Check each value and the rules across them; raise one ConfigError naming them all."""
        p: list[str] = []

        def need(ok: bool, key: str, message: str) -> None:
            if not ok:
                p.append(f"{key}: {message} (got {getattr(self, _snake(key))!r})")

        need(
            bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{0,100}", self.stack_name)),
            "stackName",
            "letters, digits and hyphens, starting with a letter",
        )
        need(
            bool(re.fullmatch(r"[a-z]{2}(-gov)?-[a-z]+-\d", self.region)),
            "region",
            "an AWS region such as us-east-1",
        )
        need(bool(re.fullmatch(r"[\w .:/=+@-]{1,256}", self.tag)), "tag", "a valid tag value")
        need(2 <= self.max_azs <= 6, "maxAzs", "between 2 and 6")
        need(0 <= self.nat_gateways <= self.max_azs, "natGateways", "between 0 and maxAzs")
        need(
            _INSTANCE_TYPE.match(self.instance_type) is not None,
            "instanceType",
            "a g4dn, g5, g6 or g6e instance type such as g5.xlarge",
        )
        need(self.min_instances >= 0, "minInstances", "0 or more")
        need(
            self.max_instances >= max(1, self.min_instances),
            "maxInstances",
            "at least 1 and at least minInstances",
        )
        need(
            self.ami_parameter.startswith("/aws/service/"),
            "amiParameter",
            "a public SSM parameter under /aws/service/",
        )
        need(
            self.ami_id == "" or bool(re.fullmatch(r"ami-([0-9a-f]{8}|[0-9a-f]{17})", self.ami_id)),
            "amiId",
            "empty or an AMI id such as ami-0123456789abcdef0",
        )
        need(30 <= self.root_volume_gb <= 16384, "rootVolumeGb", "between 30 and 16384")
        need(1 <= self.workers_per_gpu <= 16, "workersPerGpu", "between 1 and 16")
        need(1 <= self.per_gpu_concurrency <= 1000, "perGpuConcurrency", "between 1 and 1000")
        need(self.backlog_per_instance >= 1, "backlogPerInstance", "1 or more")
        need(0 <= self.instance_warmup_seconds <= 3600, "instanceWarmupSeconds", "0-3600")
        need(
            30 <= self.lifecycle_hook_timeout_seconds <= 7200,
            "lifecycleHookTimeoutSeconds",
            "between 30 and 7200",
        )
        need(
            bool(re.fullmatch(r"\d+\.\d+(\.\d+)?", self.torch_version)),
            "torchVersion",
            "a version such as 2.13.0",
        )
        need(
            self.wheelhouse_prefix == "" or not self.wheelhouse_prefix.startswith(("/", "s3:")),
            "wheelhousePrefix",
            "a key prefix inside the model bucket, not a URL",
        )
        need(
            bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.model_name)),
            "modelName",
            "letters, digits, '_', '.', '-'",
        )
        if self.model_archive:
            archive = self.model_archive_path
            need(archive.suffix == ".mar", "modelArchive", "a .mar file")
            need(archive.is_file(), "modelArchive", "an existing file (relative to the repo)")
        need(128 <= self.lambda_memory_mb <= 10240, "lambdaMemoryMb", "between 128 and 10240")
        need(1 <= self.lambda_timeout_seconds <= 900, "lambdaTimeoutSeconds", "between 1 and 900")
        need(1 <= self.batch_size <= 10000, "batchSize", "between 1 and 10000")
        need(0 <= self.batching_window_seconds <= 300, "batchingWindowSeconds", "between 0 and 300")
        need(
            self.batch_size <= 10 or self.batching_window_seconds >= 1,
            "batchSize",
            "above 10 needs batchingWindowSeconds of at least 1 (an SQS event source rule)",
        )
        need(2 <= self.max_concurrency <= 1000, "maxConcurrency", "between 2 and 1000")
        need(self.reserved_concurrency >= 0, "reservedConcurrency", "0 (none) or more")
        need(
            self.reserved_concurrency == 0 or self.reserved_concurrency >= 2,
            "reservedConcurrency",
            "0 (none) or at least 2: the fleet controller caps the event source's "
            "MaximumConcurrency at it, and AWS accepts no MaximumConcurrency below 2",
        )
        need(
            self.reserved_concurrency == 0 or self.reserved_concurrency >= self.max_concurrency,
            "reservedConcurrency",
            "0 or at least maxConcurrency, or the event source throttles",
        )
        full_fleet = self.per_gpu_concurrency * self.max_instances * self.gpus_per_instance
        if 0 < self.reserved_concurrency < full_fleet:
            p.append(
                f"reservedConcurrency: {self.reserved_concurrency} is below perGpuConcurrency x "
                f"maxInstances x GPUs per {self.instance_type} = {self.per_gpu_concurrency} x "
                f"{self.max_instances} x {self.gpus_per_instance} = {full_fleet}: the fleet "
                "controller never sets MaximumConcurrency above the reserved concurrency (an SQS "
                "event source above it is throttled, and each throttled batch returns to the "
                "queue with a receive spent), so a full fleet would get fewer Lambdas than its "
                f"GPUs take and sit partly idle. Reserve {full_fleet} or more, lower "
                "perGpuConcurrency or maxInstances, or set 0 (no reservation)"
            )
        need(
            self.visibility_timeout_seconds <= 43200,
            "lambdaTimeoutSeconds",
            "small enough that 6x it plus the batching window fits SQS's 12 h visibility limit",
        )
        need(1 <= self.max_tiles_per_message <= 10000, "maxTilesPerMessage", "between 1 and 10000")
        need(1 <= self.max_receive_count <= 1000, "maxReceiveCount", "between 1 and 1000")
        for source in self.source_buckets:
            if not _is_source_prefix(source):
                p.append(f"sourceBuckets: {source!r} is not a bucket name or bucket/prefix")
        need(
            bool(re.fullmatch(r"[a-z0-9]+\.[a-z0-9]+", self.db_instance_class)),
            "dbInstanceClass",
            "an RDS class without 'db.', such as t4g.medium",
        )
        need(20 <= self.db_allocated_storage_gb <= 65536, "dbAllocatedStorageGb", "20-65536")
        need(
            self.db_max_allocated_storage_gb >= self.db_allocated_storage_gb,
            "dbMaxAllocatedStorageGb",
            "at least dbAllocatedStorageGb",
        )
        need(1 <= self.db_backup_retention_days <= 35, "dbBackupRetentionDays", "between 1 and 35")
        need(
            self.log_retention_days in LOG_RETENTION_DAYS,
            "logRetentionDays",
            f"one of {', '.join(map(str, LOG_RETENTION_DAYS))}",
        )
        need(self.results_expire_days >= 0, "resultsExpireDays", "0 (never) or more")
        need(self.alarm_email == "" or "@" in self.alarm_email, "alarmEmail", "an e-mail address")
        need(self.oldest_message_alarm_seconds >= 60, "oldestMessageAlarmSeconds", "60 or more")
        # rules across fields: the hosts and the Lambdas must have a way out
        if self.nat_gateways == 0 and not self.wheelhouse_prefix:
            p.append(
                "wheelhousePrefix: required when natGateways is 0 (the GPU hosts cannot "
                "reach PyPI for TorchServe and torch without a NAT gateway)"
            )
        if self.nat_gateways == 0 and not self.interface_endpoints:
            p.append(
                "interfaceEndpoints: must be true when natGateways is 0 (the hosts and "
                "Lambdas reach SSM, Secrets Manager and CloudWatch only through them)"
            )
        if p:
            raise ConfigError(_report(p))


def load_cdk_json_context(path: Path) -> dict[str, Any]:
    """The ``context`` of cdk.json: an in-process ``App()`` does not read it, the CLI does."""
    return dict(json.loads(path.read_text()).get("context", {}))


def _report(problems: list[str]) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"invalid chipscale deployment config (cdk.json context / -c key=value):\n{lines}"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.capitalize() for word in rest)


def _snake(key: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m[1].lower(), key)


def _coerce(raw: Any, kind: Any) -> Any:
    """Turn a context value (JSON from cdk.json, or a string from ``-c``) into ``kind``."""
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        kind = next(a for a in get_args(kind) if a is not type(None))
        origin = get_origin(kind)
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in {"true", "yes", "1", "on"}:
            return True
        if text in {"false", "no", "0", "off"}:
            return False
        raise ValueError("expected true or false")
    if kind is int:
        if isinstance(raw, bool):
            raise TypeError("expected an integer")
        if isinstance(raw, int):
            return raw
        text = str(raw).strip()
        if not re.fullmatch(r"-?\d+", text):
            raise ValueError("expected an integer")
        return int(text)
    if kind is str:
        if isinstance(raw, (dict, list)):
            raise TypeError("expected a string")
        return str(raw)
    if origin is tuple:
        items: Any = raw
        if isinstance(raw, str):
            text = raw.strip()
            items = (
                json.loads(text)
                if text.startswith("[")
                else [part.strip() for part in text.split(",") if part.strip()]
            )
        if not isinstance(items, list | tuple):
            raise TypeError("expected a list")
        return tuple(str(item) for item in items)
    raise TypeError(f"unsupported config type {kind!r}")


def default_context() -> Mapping[str, Any]:
    """Every key with its default, as cdk.json should hold it (a test keeps them in step)."""
    out: dict[str, Any] = {}
    for f in fields(DeploymentConfig):
        value = f.default
        out[_camel(f.name)] = list(value) if isinstance(value, tuple) else value
    return out


def _is_source_prefix(source: str) -> bool:
    """Whether ``bucket[/prefix]`` is a prefix the worker's allow-list accepts (no wildcard,
    no dot segment): the worker refuses a malformed one at cold start."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^*?]*)?", source):
        return False
    try:
        check_prefix(f"s3://{source.rstrip('/')}/")
    except InvalidMessageError:
        return False
    return True
