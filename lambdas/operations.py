"""Operations Lambda: the operator's database and endpoint work, run inside the VPC.

The results database and the model endpoint are private; ``chipscale verify | db-setup |
status | download --stack NAME`` and ``push --stack`` invoke this function instead of reaching
into the VPC. Thin on purpose: the actions live in :mod:`chipscale.ops.operations_actions`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import boto3
from aws_lambda_powertools import Logger

from chipscale import names
from chipscale.cloud.db_credentials import url_from_environment
from chipscale.ops.operations_actions import OperationsEnvironment, run_action

logger = Logger(service="chipscale-operations")


@functools.cache
def environment() -> OperationsEnvironment:
    """Clients once per container; the database URL is read from the secret on each use, so
    a rotated password is picked up without a redeploy."""
    secrets = boto3.client("secretsmanager")
    return OperationsEnvironment(
        db_url=lambda: url_from_environment(secrets),
        model_url=os.environ.get(names.ENV_MODEL_URL),
        results_bucket=os.environ.get(names.ENV_RESULTS_BUCKET),
        s3=boto3.client("s3"),
    )


@logger.inject_lambda_context
def handler(event: dict[str, Any], context: Any) -> Any:
    answer = run_action(event, environment())
    logger.info("done", extra={"action": event.get("action")})
    return answer
