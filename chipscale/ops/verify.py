"""``chipscale verify``: a post-deploy smoke test, as a list of named checks.

:func:`stack_checks` plans every check of a deployed stack: the AWS ones
(:mod:`chipscale.ops.aws_checks`) run here; the endpoint and schema checks
(:mod:`chipscale.ops.private_checks`) run here when given URLs, else inside the VPC through
the stack's operations Lambda. :func:`direct_checks` runs those two without a stack.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from chipscale.ops import private_checks as private
from chipscale.ops.aws import Fleet, quick_client
from chipscale.ops.aws_checks import (
    Capacity,
    check_dead_letter_queue,
    check_event_source,
    check_fleet,
    check_gpu_quota,
    check_lambda_quota,
    check_queue,
    check_worker,
    read_capacity,
    read_deployed_fleet,
)
from chipscale.ops.checks import (
    CHECK_DLQ,
    CHECK_ENDPOINT,
    CHECK_EVENT_SOURCE,
    CHECK_FLEET,
    CHECK_GPU_QUOTA,
    CHECK_LAMBDA_QUOTA,
    CHECK_QUEUE,
    CHECK_SCHEMA,
    CHECK_WORKER,
    Check,
    CheckFailed,
)
from chipscale.ops.private_checks import check_endpoint, check_schema, invoke_private_checks
from chipscale.ops.stack_outputs import StackOutputs, output_key


def stack_checks(
    outputs: StackOutputs,
    session: Any,
    *,
    endpoint_url: str | None = None,
    db_url: str | None = None,
) -> list[Check]:
    """Every check of a deployed stack. The endpoint and schema checks run directly when
    ``endpoint_url``/``db_url`` are given, else inside the VPC through the operations Lambda."""
    sqs = quick_client(session, "sqs")
    lambda_client = quick_client(session, "lambda", read_timeout=120)

    @cache
    def fleet() -> Fleet:
        from chipscale import names

        asg = _output(outputs, "asg_name")
        # Older stacks have no target group output: Auto Scaling's state alone then.
        target_group = outputs.raw.get(names.OUTPUT_TARGET_GROUP_ARN)
        return read_deployed_fleet(
            quick_client(session, "autoscaling"),
            quick_client(session, "ec2"),
            asg,
            elbv2=quick_client(session, "elbv2") if target_group else None,
            target_group_arn=target_group,
        )

    @cache
    def capacity() -> Capacity:
        ssm = quick_client(session, "ssm")
        try:
            deployed = fleet()
        except CheckFailed as exc:
            raise CheckFailed(f"cannot size the need: {exc}") from exc
        return read_capacity(deployed, lambda_client=lambda_client, ssm=ssm, outputs=outputs)

    def fleet_if_known() -> Fleet | None:
        """The fleet for the mapping's cross-check; its own failure is the fleet check's."""
        try:
            return fleet() if outputs.asg_name else None
        except Exception:
            return None

    quotas = quick_client(session, "service-quotas")
    checks = [
        Check(CHECK_QUEUE, lambda: check_queue(sqs, outputs.queue_url, outputs.dlq_url)),
        Check(CHECK_DLQ, lambda: check_dead_letter_queue(sqs, outputs.dlq_url)),
        Check(
            CHECK_EVENT_SOURCE,
            lambda: check_event_source(
                lambda_client,
                _output(outputs, "event_source_mapping_id"),
                outputs.queue_url,
                fleet_if_known(),
            ),
        ),
        Check(
            CHECK_WORKER,
            lambda: check_worker(
                lambda_client, sqs, _output(outputs, "worker_function"), outputs.queue_url
            ),
        ),
        Check(CHECK_FLEET, lambda: check_fleet(fleet())),
        Check(CHECK_GPU_QUOTA, lambda: check_gpu_quota(quotas, capacity())),
        Check(CHECK_LAMBDA_QUOTA, lambda: check_lambda_quota(quotas, capacity())),
    ]
    if endpoint_url:  # the stack's GPU fleet, reached from here
        checks.append(
            Check(
                CHECK_ENDPOINT,
                lambda: check_endpoint(endpoint_url, require_gpu=private.STACK_WORKERS_ON_GPU),
            )
        )
    if db_url:
        checks.append(Check(CHECK_SCHEMA, lambda: check_schema(db_url)))
    remote = tuple(
        name
        for name, given in ((CHECK_ENDPOINT, endpoint_url), (CHECK_SCHEMA, db_url))
        if not given
    )
    if remote:
        checks.append(
            Check(
                "operations Lambda",
                lambda: invoke_private_checks(
                    lambda_client, _output(outputs, "operations_function"), remote
                ),
                covers=remote,
            )
        )
    return checks


def direct_checks(endpoint_url: str | None, db_url: str | None) -> list[Check]:
    """The private checks against URLs reachable from here (no stack)."""
    checks = []
    if endpoint_url:
        checks.append(Check(CHECK_ENDPOINT, lambda: check_endpoint(endpoint_url)))
    if db_url:
        checks.append(Check(CHECK_SCHEMA, lambda: check_schema(db_url)))
    return checks


def _output(outputs: StackOutputs, attribute: str) -> str:
    value = getattr(outputs, attribute)
    if not value:
        raise CheckFailed(
            f"stack {outputs.stack_name} has no output {output_key(attribute)!r} (a partial or "
            "older chipscale stack?)"
        )
    return str(value)
