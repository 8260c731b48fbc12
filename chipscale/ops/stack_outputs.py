"""Resolving a deployed chipscale stack from its CloudFormation outputs (:func:`resolve_stack`).

Every operator command that takes ``--stack NAME`` finds the queue, buckets and functions by
the output keys of :mod:`chipscale.names`, never by a guessed physical name. The failures an
operator meets first (no credentials, no region, a wrong stack name, a stack that is not
chipscale's) each get their own error with a one-line message that says what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import boto3
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)

from chipscale import names
from chipscale.cloud.aws_session import CREDENTIALS_HELP, aws_session
from chipscale.errors import ChipscaleError, one_line


class StackError(ChipscaleError):
    """A chipscale stack could not be resolved from its CloudFormation outputs."""


class NoCredentials(StackError):
    """No AWS credentials were found in the environment, the profile or the instance role."""


class NoRegion(StackError):
    """No AWS region is configured, so there is no CloudFormation endpoint to ask."""


class StackNotFound(StackError):
    """No CloudFormation stack of that name exists in the region."""


class StackOutputMissing(StackError):
    """The stack exists but lacks an output chipscale needs: not (all) deployed by chipscale."""


@dataclass(frozen=True, slots=True)
class StackOutputs:
    """The resources of one deployed chipscale stack, from its CloudFormation outputs.

    ``queue_url`` and ``dlq_url`` are required (every operator command needs the queue);
    the others are None when the stack has no such output (an older or partial stack):
    commands that need one call :meth:`require`, which names the missing output.
    """

    stack_name: str
    region: str
    queue_url: str
    dlq_url: str
    results_bucket: str | None = field(default=None, metadata={"key": names.OUTPUT_RESULTS_BUCKET})
    model_bucket: str | None = field(default=None, metadata={"key": names.OUTPUT_MODEL_BUCKET})
    worker_function: str | None = field(
        default=None, metadata={"key": names.OUTPUT_WORKER_FUNCTION}
    )
    operations_function: str | None = field(
        default=None, metadata={"key": names.OUTPUT_OPERATIONS_FUNCTION}
    )
    controller_function: str | None = field(
        default=None, metadata={"key": names.OUTPUT_CONTROLLER_FUNCTION}
    )
    event_source_mapping_id: str | None = field(
        default=None, metadata={"key": names.OUTPUT_EVENT_SOURCE_MAPPING}
    )
    asg_name: str | None = field(default=None, metadata={"key": names.OUTPUT_ASG_NAME})
    endpoint_url: str | None = field(default=None, metadata={"key": names.OUTPUT_ENDPOINT_URL})
    db_secret_arn: str | None = field(default=None, metadata={"key": names.OUTPUT_DB_SECRET_ARN})
    db_proxy_endpoint: str | None = field(
        default=None, metadata={"key": names.OUTPUT_DB_PROXY_ENDPOINT}
    )
    per_gpu_parameter: str | None = field(
        default=None, metadata={"key": names.OUTPUT_PER_GPU_PARAMETER}
    )
    worker_log_group: str | None = field(
        default=None, metadata={"key": names.OUTPUT_LOG_GROUP_WORKER}
    )
    #: Every output of the stack, chipscale's or not, by key.
    raw: Mapping[str, str] = field(default_factory=dict)

    def require(self, attribute: str) -> str:
        """The value of an optional output a command cannot do without, or StackOutputMissing
        naming its CloudFormation key."""
        value = getattr(self, attribute)
        if value is None:
            raise _missing(self.stack_name, self.region, output_key(attribute))
        return value


#: Outputs without which a stack is not a chipscale stack (attribute -> output key).
REQUIRED_OUTPUTS: Mapping[str, str] = {
    "queue_url": names.OUTPUT_QUEUE_URL,
    "dlq_url": names.OUTPUT_DLQ_URL,
}


def output_key(attribute: str) -> str:
    """The CloudFormation output key behind a :class:`StackOutputs` attribute."""
    if attribute in REQUIRED_OUTPUTS:
        return REQUIRED_OUTPUTS[attribute]
    for f in fields(StackOutputs):
        if f.name == attribute and "key" in f.metadata:
            return f.metadata["key"]
    raise KeyError(f"StackOutputs has no output attribute {attribute!r}")


def resolve_stack(name: str, *, session: boto3.session.Session | None = None) -> StackOutputs:
    """The resources of stack ``name``, from ``describe_stacks``.

    Raises :class:`NoCredentials`, :class:`NoRegion`, :class:`StackNotFound` or
    :class:`StackOutputMissing`; any other AWS failure is a :class:`StackError` naming the
    stack, the region and AWS's reason.
    """
    session = session or aws_session()
    region = session.region_name
    if not region:
        raise NoRegion(
            f"no AWS region to find stack {name!r} in: set AWS_REGION (or AWS_DEFAULT_REGION), "
            "or a region in your AWS profile"
        )
    stack = _describe_stack(session, name, region)
    return outputs_from_stack(stack, region)


def outputs_from_stack(stack: Mapping[str, Any], region: str) -> StackOutputs:
    """A :class:`StackOutputs` from one ``describe_stacks`` stack description."""
    name = str(stack["StackName"])
    raw = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    values: dict[str, Any] = {}
    for attribute, key in REQUIRED_OUTPUTS.items():
        if not raw.get(key):
            status = str(stack.get("StackStatus", ""))
            if status and status not in ("CREATE_COMPLETE", "UPDATE_COMPLETE"):
                raise StackError(
                    f"stack {name!r} in {region} is {status}, without output {key!r}: "
                    "see its events (`aws cloudformation describe-stack-events`)"
                )
            raise _missing(name, region, key)
        values[attribute] = raw[key]
    for f in fields(StackOutputs):
        output = f.metadata.get("key")
        if output is not None:
            values[f.name] = raw.get(output) or None
    return StackOutputs(stack_name=name, region=region, raw=raw, **values)


def _describe_stack(session: boto3.session.Session, name: str, region: str) -> Mapping[str, Any]:
    """The stack's description, with AWS's failures turned into one-line StackErrors."""
    where = f"stack {name!r} in {region}"
    try:
        client = session.client("cloudformation")
        stacks = client.describe_stacks(StackName=name)["Stacks"]
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise NoCredentials(
            f"no usable AWS credentials to read {where}: {CREDENTIALS_HELP}"
        ) from exc
    except ClientError as exc:
        error = exc.response.get("Error", {})
        message = str(error.get("Message", ""))
        if error.get("Code") == "ValidationError" and "does not exist" in message:
            raise StackNotFound(
                f"no CloudFormation stack {name!r} in {region}: check the name "
                "(`aws cloudformation list-stacks`) and AWS_REGION"
            ) from exc
        raise StackError(f"cannot read {where}: {one_line(exc)}") from exc
    except EndpointConnectionError as exc:
        raise StackError(f"cannot reach CloudFormation for {where}: {one_line(exc)}") from exc
    except NoRegionError as exc:  # a session built without one (resolve_stack checks first)
        raise NoRegion(f"no AWS region to find stack {name!r} in: set AWS_REGION") from exc
    except BotoCoreError as exc:
        raise StackError(f"cannot read {where}: {one_line(exc)}") from exc
    if not stacks:
        raise StackNotFound(f"no CloudFormation stack {name!r} in {region}")
    stack = stacks[0]
    status = str(stack.get("StackStatus", ""))
    if status.startswith("DELETE_COMPLETE"):  # describe by ARN still finds deleted stacks
        raise StackNotFound(f"stack {name!r} in {region} was deleted")
    return stack


def _missing(stack: str, region: str, key: str) -> StackOutputMissing:
    return StackOutputMissing(
        f"stack {stack!r} in {region} has no output {key!r}: was it deployed by chipscale "
        "(`npx cdk deploy`), and is the deployment finished?"
    )
