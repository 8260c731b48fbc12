"""Operations Lambda: the operator's database and endpoint work, run inside the VPC.

The results database and the model endpoint are private; ``chipscale verify --stack NAME``
(and, with the cloud data-plane work, db-setup, status and export) invoke this function
instead of reaching into the VPC. Thin on purpose: the work lives in ``chipscale``.
"""

from __future__ import annotations

import os
from typing import Any

import boto3
from aws_lambda_powertools import Logger

from chipscale import names
from chipscale.db_credentials import url_from_environment
from chipscale.verify import verify_action

logger = Logger(service="chipscale-operations")
_secrets = boto3.client("secretsmanager")  # once per container


@logger.inject_lambda_context
def handler(event: dict[str, Any], context: Any) -> Any:
    action = event.get("action")
    if action == "verify":
        results = verify_action(os.environ.get(names.ENV_MODEL_URL), url_from_environment(_secrets))
        logger.info("verify", extra={"results": results})
        return results
    raise ValueError(f"unknown action {action!r}: this operations Lambda knows 'verify'")
