"""The fleet controller: the worker Lambda's concurrency follows the GPUs in service.

The event source mapping is disabled while no GPU is in service, else its MaximumConcurrency
is per-GPU concurrency x GPUs in service, clamped to 2-1000 and to the worker's reserved
concurrency, or, with none reserved, to the account's unreserved concurrency less a margin
(``GetAccountSettings``). :func:`desired_mapping` is the pure rule; :func:`sync` reads AWS
(the fleet through :func:`chipscale.ops.aws.read_fleet`), applies the rule and writes the
mapping only when something changes. ``lambdas/fleet_controller.py`` runs it on Auto Scaling
events and a schedule. Rationale: docs/design.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from chipscale import names
from chipscale.errors import one_line
from chipscale.ops.aws import (
    AutoScalingClient,
    Elbv2Client,
    FleetConfigError,
    FleetNotFoundError,
    aws_reason,
    read_fleet,
)
from chipscale.ops.aws_checks import LAMBDA_HEADROOM

#: AWS's range for an SQS event source mapping's ``ScalingConfig.MaximumConcurrency``.
MIN_MAXIMUM_CONCURRENCY = 2
MAX_MAXIMUM_CONCURRENCY = 1000

#: Unreserved concurrency the worker leaves to the account's other functions (the controller
#: and operations Lambdas among them): a tenth of the pool, within these bounds; the upper is
#: the headroom ``chipscale verify`` asks the quota to hold. Rationale: docs/design.md, 9.7.
MIN_UNRESERVED_MARGIN = 2
MAX_UNRESERVED_MARGIN = LAMBDA_HEADROOM

# Event source mapping states. A mapping in a transition reports the state it is heading to
# as ...ing; one in Creating/Updating/Deleting refuses updates (ResourceInUseException), so
# the controller leaves it for the next tick instead of failing.
_ENABLED_STATES = frozenset({"Enabled", "Enabling"})
_DISABLED_STATES = frozenset({"Disabled", "Disabling"})


# ------------------------------------------------------------------------------- the rule


@dataclass(frozen=True)
class DesiredMapping:
    """What the event source mapping should be.

    ``maximum_concurrency`` is None when the mapping is to be disabled: the last value is left
    as it was, since re-enabling sets it again from the GPUs then in service.
    """

    enabled: bool
    maximum_concurrency: int | None


def clamp_concurrency(value: int) -> int:
    """``value`` forced into the range AWS accepts for MaximumConcurrency (2..1000).

    >>> clamp_concurrency(1), clamp_concurrency(48), clamp_concurrency(5000)
    (2, 48, 1000)
    """
    return max(MIN_MAXIMUM_CONCURRENCY, min(MAX_MAXIMUM_CONCURRENCY, value))


def account_ceiling(unreserved: int) -> int:
    """The most concurrency the worker may take from an account pool of ``unreserved``
    executions: the pool less a tenth of it, kept within 2..10 executions.

    >>> account_ceiling(10), account_ceiling(50), account_ceiling(1000)
    (8, 45, 990)
    """
    margin = min(MAX_UNRESERVED_MARGIN, max(MIN_UNRESERVED_MARGIN, unreserved // 10))
    return unreserved - margin


def desired_mapping(
    gpus_in_service: int,
    per_gpu_concurrency: int,
    reserved_concurrency: int | None = None,
    account_unreserved: int | None = None,
) -> DesiredMapping:
    """The mapping state for ``gpus_in_service`` GPUs, each fed by ``per_gpu_concurrency``
    Lambdas, for a worker with ``reserved_concurrency`` (None: none reserved) in an account
    with ``account_unreserved`` unreserved executions (None: unknown).

    Disabled while no GPU is in service (messages wait in the queue rather than fail into the
    DLQ); otherwise enabled with ``MaximumConcurrency = clamp(min(per_gpu x gpus, ceiling),
    2, 1000)``. The ceiling is the worker's reserved concurrency, else
    :func:`account_ceiling` of the unreserved pool: above either, the event source is
    throttled and each throttled batch goes back to the queue with a receive spent.

    >>> desired_mapping(0, 8)
    DesiredMapping(enabled=False, maximum_concurrency=None)
    >>> desired_mapping(4, 8)
    DesiredMapping(enabled=True, maximum_concurrency=32)
    >>> desired_mapping(4, 8, reserved_concurrency=20)
    DesiredMapping(enabled=True, maximum_concurrency=20)
    >>> desired_mapping(4, 8, account_unreserved=10)  # a new account
    DesiredMapping(enabled=True, maximum_concurrency=8)
    """
    if gpus_in_service < 0:
        raise FleetConfigError(f"GPUs in service must be 0 or more, got {gpus_in_service}")
    if per_gpu_concurrency < 1:
        raise FleetConfigError(f"per-GPU concurrency must be 1 or more, got {per_gpu_concurrency}")
    if reserved_concurrency is not None and reserved_concurrency < MIN_MAXIMUM_CONCURRENCY:
        raise FleetConfigError(
            f"reserved concurrency {reserved_concurrency} is below {MIN_MAXIMUM_CONCURRENCY}, "
            "the least MaximumConcurrency an SQS event source accepts"
        )
    if gpus_in_service == 0:
        return DesiredMapping(enabled=False, maximum_concurrency=None)
    wanted = per_gpu_concurrency * gpus_in_service
    if reserved_concurrency is not None:
        wanted = min(wanted, reserved_concurrency)
    elif account_unreserved is not None:
        wanted = min(wanted, account_ceiling(account_unreserved))
    return DesiredMapping(enabled=True, maximum_concurrency=clamp_concurrency(wanted))


def mapping_changes(
    state: str, maximum_concurrency: int | None, desired: DesiredMapping
) -> dict[str, Any]:
    """The ``update_event_source_mapping`` arguments that take a mapping in ``state`` with
    ``maximum_concurrency`` to ``desired``; empty when it is already there.

    A disabled mapping's concurrency is left alone (see :class:`DesiredMapping`).
    """
    changes: dict[str, Any] = {}
    if desired.enabled and state not in _ENABLED_STATES:
        changes["Enabled"] = True
    elif not desired.enabled and state not in _DISABLED_STATES:
        changes["Enabled"] = False
    if desired.maximum_concurrency is not None and (
        maximum_concurrency != desired.maximum_concurrency
    ):
        changes["ScalingConfig"] = {"MaximumConcurrency": desired.maximum_concurrency}
    return changes


def parse_per_gpu(value: str) -> int:
    """A per-GPU concurrency read from SSM or the environment: a positive integer."""
    try:
        number = int(value.strip())
    except ValueError:
        raise FleetConfigError(f"per-GPU concurrency must be an integer, got {value!r}") from None
    if number < 1:
        raise FleetConfigError(f"per-GPU concurrency must be 1 or more, got {value!r}")
    return number


# ------------------------------------------------------------------------------- AWS side


class LambdaClient(Protocol):
    """The Lambda calls :func:`sync` makes (a boto3 ``lambda`` client)."""

    exceptions: Any

    def get_event_source_mapping(self, **kwargs: Any) -> dict[str, Any]: ...

    def update_event_source_mapping(self, **kwargs: Any) -> dict[str, Any]: ...

    def get_account_settings(self, **kwargs: Any) -> dict[str, Any]: ...


class SsmClient(Protocol):
    """The SSM call :func:`sync` makes (a boto3 ``ssm`` client)."""

    exceptions: Any

    def get_parameter(self, **kwargs: Any) -> dict[str, Any]: ...


Action = Literal["none", "updated", "busy"]


@dataclass(frozen=True)
class SyncResult:
    """What one :func:`sync` saw and did, for the controller's structured log and the tests.

    ``action`` is ``none`` (already right), ``updated`` (``changes`` were sent) or ``busy``
    (the mapping was in a transition and refused the update; the next run retries).
    ``warnings`` are for the caller to log (the Lambda logs each at WARNING level).
    """

    asg_name: str
    mapping_uuid: str
    instances_total: int
    instances_in_service: int
    gpus_in_service: int
    per_gpu_concurrency: int
    per_gpu_source: Literal["parameter", "default"]
    state_before: str
    maximum_concurrency_before: int | None
    desired: DesiredMapping
    action: Action
    changes: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    #: The worker's reserved concurrency the concurrency was capped at (None: none).
    reserved_concurrency: int | None = None
    #: The account's unreserved concurrency (GetAccountSettings), read only when none is
    #: reserved (None: reserved, or unreadable, which is among ``warnings``).
    account_unreserved: int | None = None
    #: The target group whose healthy targets were counted (None: Auto Scaling state only).
    target_group_arn: str | None = None

    def as_log(self) -> dict[str, Any]:
        """A JSON-ready dict (the Lambda logs it as one structured record)."""
        return asdict(self)


def count_in_service(
    autoscaling: AutoScalingClient,
    asg_name: str,
    *,
    elbv2: Elbv2Client | None = None,
    target_group_arn: str | None = None,
) -> tuple[int, int]:
    """(instances in the group, instances in service) of Auto Scaling group ``asg_name``.

    In service: ``InService`` and ``Healthy`` in Auto Scaling and, when ``target_group_arn``
    is given (with an ``elbv2`` client), a ``healthy`` target of that group, i.e. what the
    load balancer really routes to. The one definition the controller and ``chipscale
    verify`` share.
    """
    fleet = read_fleet(autoscaling, asg_name, elbv2=elbv2, target_group_arn=target_group_arn)
    return len(fleet.instances), fleet.instances_in_service


def read_per_gpu(
    ssm: SsmClient, parameter: str | None, default: int
) -> tuple[int, Literal["parameter", "default"], str | None]:
    """The per-GPU concurrency: SSM ``parameter`` if it exists and holds a positive integer,
    else ``default``. Returns (value, where it came from, a warning or None).

    A missing or bad parameter must not stop the controller: the mapping still has to follow
    the fleet, so it falls back and says so.
    """
    if not parameter:
        return default, "default", None
    try:
        value = ssm.get_parameter(Name=parameter)["Parameter"]["Value"]
    except ssm.exceptions.ParameterNotFound:
        return default, "default", f"SSM parameter {parameter!r} not found; using {default}"
    try:
        return parse_per_gpu(value), "parameter", None
    except FleetConfigError as exc:
        return default, "default", f"SSM parameter {parameter!r}: {exc}; using {default}"


def read_account_unreserved(lambda_client: LambdaClient) -> tuple[int | None, str | None]:
    """(the account's unreserved concurrent executions in this region, a warning or None).

    Unreadable (no permission, an outage) is a warning, not a failure: the mapping must still
    follow the fleet, uncapped by the account as before.
    """
    try:
        limit = lambda_client.get_account_settings()["AccountLimit"]
        return int(limit["UnreservedConcurrentExecutions"]), None
    except (ClientError, BotoCoreError, KeyError, TypeError, ValueError) as exc:
        reason = aws_reason(exc) if isinstance(exc, ClientError) else one_line(exc)
        return None, (
            f"GetAccountSettings failed ({reason}): MaximumConcurrency not capped by the "
            "account's unreserved concurrency"
        )


def read_mapping(lambda_client: LambdaClient, mapping_uuid: str) -> tuple[str, int | None]:
    """(State, ScalingConfig.MaximumConcurrency or None) of event source mapping
    ``mapping_uuid``."""
    try:
        mapping = lambda_client.get_event_source_mapping(UUID=mapping_uuid)
    except lambda_client.exceptions.ResourceNotFoundException:
        raise FleetNotFoundError(f"event source mapping {mapping_uuid!r} not found") from None
    concurrency = (mapping.get("ScalingConfig") or {}).get("MaximumConcurrency")
    return mapping["State"], concurrency


def sync(
    asg_name: str,
    mapping_uuid: str,
    gpus_per_instance: int,
    per_gpu_parameter: str | None,
    per_gpu_default: int,
    *,
    autoscaling: AutoScalingClient,
    lambda_client: LambdaClient,
    ssm: SsmClient,
    elbv2: Elbv2Client | None = None,
    target_group_arn: str | None = None,
    reserved_concurrency: int | None = None,
) -> SyncResult:
    """Make event source mapping ``mapping_uuid`` follow the GPUs in service in ``asg_name``.

    Reads the group (and the health of ``target_group_arn``'s targets, when given), the
    per-GPU parameter, the mapping and, when the worker has no ``reserved_concurrency``, the
    account's unreserved concurrency, then calls ``update_event_source_mapping`` only if the
    state or the concurrency differs from :func:`desired_mapping`, so running it every minute
    costs no writes. Safe to repeat and to run concurrently: each run converges on the same state.
    """
    if gpus_per_instance < 1:
        raise FleetConfigError(f"GPUs per instance must be 1 or more, got {gpus_per_instance}")
    if per_gpu_default < 1:
        raise FleetConfigError(
            f"default per-GPU concurrency must be 1 or more, got {per_gpu_default}"
        )
    total, in_service = count_in_service(
        autoscaling, asg_name, elbv2=elbv2, target_group_arn=target_group_arn
    )
    per_gpu, source, warning = read_per_gpu(ssm, per_gpu_parameter, per_gpu_default)
    warnings = [warning] if warning else []
    state, concurrency = read_mapping(lambda_client, mapping_uuid)
    unreserved = None
    if reserved_concurrency is None:
        unreserved, account_warning = read_account_unreserved(lambda_client)
        warnings.extend([account_warning] if account_warning else [])
    gpus = in_service * gpus_per_instance
    desired = desired_mapping(gpus, per_gpu, reserved_concurrency, unreserved)
    capped = desired.maximum_concurrency
    if unreserved is not None and capped is not None and capped < per_gpu * gpus:
        warnings.append(
            f"the account's unreserved concurrency ({unreserved}) caps the worker at "
            f"{capped} of the {per_gpu * gpus} its {gpus} GPUs take: request a higher "
            "Lambda concurrent executions quota (L-B99A9384)"
        )
    changes = mapping_changes(state, concurrency, desired)
    action: Action = "none"
    if changes:
        try:
            lambda_client.update_event_source_mapping(UUID=mapping_uuid, **changes)
            action = "updated"
        except lambda_client.exceptions.ResourceInUseException:
            action = "busy"
    return SyncResult(
        asg_name=asg_name,
        mapping_uuid=mapping_uuid,
        instances_total=total,
        instances_in_service=in_service,
        gpus_in_service=in_service * gpus_per_instance,
        per_gpu_concurrency=per_gpu,
        per_gpu_source=source,
        state_before=state,
        maximum_concurrency_before=concurrency,
        desired=desired,
        action=action,
        changes=changes,
        warnings=tuple(warnings),
        reserved_concurrency=reserved_concurrency,
        account_unreserved=unreserved,
        target_group_arn=target_group_arn,
    )


# ------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class FleetSettings:
    """The controller's settings, read once from the environment the stack gives the Lambda."""

    asg_name: str
    mapping_uuid: str
    gpus_per_instance: int
    per_gpu_parameter: str | None
    per_gpu_default: int
    #: The model's target group: only its ``healthy`` targets count as in service.
    target_group_arn: str | None = None
    #: The worker's reserved concurrency, the ceiling of MaximumConcurrency (None: none).
    reserved_concurrency: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FleetSettings:
        """Settings from ``environ`` (names in :mod:`chipscale.names`); a missing or invalid
        one raises :class:`FleetConfigError` naming the variable."""

        def required(name: str) -> str:
            value = environ.get(name, "").strip()
            if not value:
                raise FleetConfigError(f"environment variable {name} is not set")
            return value

        def positive(name: str) -> int:
            raw = required(name)
            try:
                number = int(raw)
            except ValueError:
                number = 0
            if number < 1:
                raise FleetConfigError(f"{name} must be a positive integer, got {raw!r}")
            return number

        def reserved(name: str) -> int | None:
            """Unset, empty or 0: no reserved concurrency; else at least AWS's minimum."""
            raw = environ.get(name, "").strip()
            if raw in ("", "0"):
                return None
            try:
                number = int(raw)
            except ValueError:
                number = 0
            if number < MIN_MAXIMUM_CONCURRENCY:
                raise FleetConfigError(
                    f"{name} must be 0 (none) or an integer of at least "
                    f"{MIN_MAXIMUM_CONCURRENCY}, got {raw!r}"
                )
            return number

        return cls(
            asg_name=required(names.ENV_ASG_NAME),
            mapping_uuid=required(names.ENV_EVENT_SOURCE_MAPPING),
            gpus_per_instance=positive(names.ENV_GPUS_PER_INSTANCE),
            per_gpu_parameter=environ.get(names.ENV_PER_GPU_PARAMETER, "").strip() or None,
            per_gpu_default=positive(names.ENV_PER_GPU_DEFAULT),
            target_group_arn=environ.get(names.ENV_TARGET_GROUP_ARN, "").strip() or None,
            reserved_concurrency=reserved(names.ENV_RESERVED_CONCURRENCY),
        )

    def sync(
        self,
        *,
        autoscaling: AutoScalingClient,
        lambda_client: LambdaClient,
        ssm: SsmClient,
        elbv2: Elbv2Client | None = None,
    ) -> SyncResult:
        """:func:`sync` with these settings (``elbv2`` is needed when a target group is set)."""
        return sync(
            self.asg_name,
            self.mapping_uuid,
            self.gpus_per_instance,
            self.per_gpu_parameter,
            self.per_gpu_default,
            autoscaling=autoscaling,
            lambda_client=lambda_client,
            ssm=ssm,
            elbv2=elbv2,
            target_group_arn=self.target_group_arn,
            reserved_concurrency=self.reserved_concurrency,
        )
