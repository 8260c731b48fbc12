"""Fleet controller Lambda: the worker's concurrency follows the GPUs in service.

Invoked by Auto Scaling instance events and by a schedule; every invocation converges the
event source mapping on the fleet (see chipscale.ops.fleet), whatever the event says.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import boto3
from aws_lambda_powertools import Logger

from chipscale.ops.fleet import FleetSettings

logger = Logger(service="chipscale-fleet-controller")


#: Auto Scaling (the group), ELBv2 (the health of the model's targets), Lambda (the mapping
#: and the account's unreserved concurrency) and SSM (the per-GPU concurrency).
_SERVICES = {
    "autoscaling": "autoscaling",
    "elbv2": "elbv2",
    "lambda_client": "lambda",
    "ssm": "ssm",
}


@cache
def _clients() -> dict[str, Any]:
    """boto3 clients, created once per container (on first use, so importing is free)."""
    return {name: boto3.client(service) for name, service in _SERVICES.items()}


@logger.inject_lambda_context
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Sync the mapping once and log what was seen and done as one structured record."""
    result = FleetSettings.from_env(os.environ).sync(**_clients()).as_log()
    for warning in result["warnings"]:
        logger.warning(warning)
    logger.info("fleet sync", extra={"fleet": result, "trigger": event.get("detail-type")})
    return result
