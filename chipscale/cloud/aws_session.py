"""The operator's AWS session: the region from ``AWS_REGION`` as the AWS CLI reads it, and
what to say when no credentials are found. Shared by push and the operator tools.

boto3 honours ``AWS_ENDPOINT_URL`` (moto in the tests, a VPC endpoint in the cloud) and the
usual credential chain.
"""

from __future__ import annotations

import os

import boto3

#: How to configure credentials, said whenever they are missing.
CREDENTIALS_HELP = (
    "configure them with `aws configure` (or `aws sso login --profile P` and AWS_PROFILE=P), "
    "or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
)


def aws_session(region: str | None = None) -> boto3.session.Session:
    """A boto3 session in ``region``, else ``AWS_REGION``, else ``AWS_DEFAULT_REGION``, else the
    profile's region. boto3 itself reads only ``AWS_DEFAULT_REGION``; Lambda and most CI set
    ``AWS_REGION``, so both are honoured, ``AWS_REGION`` first as the AWS CLI does."""
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return boto3.session.Session(region_name=region or None)
