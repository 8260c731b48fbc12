"""SQS queues as the operator sees them: AWS's failures on a queue as one-line errors
(:func:`sqs_errors`), a queue's depth, the work queue and its dead-letter queue as ``chipscale
status --stack`` shows them, and releasing received messages.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)

from chipscale.cloud.aws_session import CREDENTIALS_HELP
from chipscale.cloud.push_send import MAX_BATCH_ENTRIES
from chipscale.errors import ChipscaleError, one_line
from chipscale.ops.aws import aws_reason, error_code, queue_name
from chipscale.ops.stack_outputs import NoCredentials, NoRegion
from chipscale.safe_text import plural

#: Long-poll seconds of each receive: an empty answer after a long poll ends the run (a
#: short poll samples a few servers and can answer empty while messages remain).
DEFAULT_WAIT_SECONDS = 1


#: Error codes SQS gives a queue URL or ARN that names no queue (query and JSON protocols).
QUEUE_MISSING_CODES = frozenset(
    {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "ResourceNotFoundException"}
)


class QueueError(ChipscaleError):
    """An SQS queue could not be read or written."""


class QueueNotFound(QueueError):
    """The queue URL (given, or from the stack's outputs) names no queue in the region."""


@contextmanager
def sqs_errors(what: str, url: str) -> Iterator[None]:
    """AWS's failures on ``what`` (e.g. "dead-letter queue") at ``url`` as one-line
    chipscale errors: missing credentials, missing region, a queue that does not exist, and
    any other refusal with AWS's reason."""
    try:
        yield
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise NoCredentials(
            f"no usable AWS credentials to reach the {what} {queue_name(url)}: {CREDENTIALS_HELP}"
        ) from exc
    except NoRegionError as exc:
        raise NoRegion(
            f"no AWS region for the {what} {url}: pass --region or set AWS_REGION"
        ) from exc
    except ClientError as exc:
        if error_code(exc) in QUEUE_MISSING_CODES:
            raise QueueNotFound(
                f"the {what} {url} does not exist: check the URL (or the stack's outputs) and "
                "the region"
            ) from exc
        raise QueueError(f"{what} {queue_name(url)}: {aws_reason(exc)}") from exc
    except BotoCoreError as exc:
        raise QueueError(f"cannot reach the {what} {queue_name(url)}: {one_line(exc)}") from exc


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """A queue's approximate message counts, as ``GetQueueAttributes`` gives them."""

    url: str
    arn: str
    visible: int  #: waiting to be received
    in_flight: int  #: received, not yet deleted nor back (ApproximateNumberOfMessagesNotVisible)
    delayed: int  #: sent with a delay that has not passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "visible": self.visible,
            "in_flight": self.in_flight,
            "delayed": self.delayed,
        }


def queue_depth(sqs: Any, url: str, what: str = "queue") -> QueueDepth:
    """The depth of the queue at ``url`` (one-line errors, see :func:`sqs_errors`)."""
    with sqs_errors(what, url):
        attributes = sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=[
                "QueueArn",
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )["Attributes"]
    return QueueDepth(
        url=url,
        arn=str(attributes.get("QueueArn", "")),
        visible=int(attributes.get("ApproximateNumberOfMessages", 0)),
        in_flight=int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0)),
        delayed=int(attributes.get("ApproximateNumberOfMessagesDelayed", 0)),
    )


def queue_view(sqs: Any, queue_url: str, dlq_url: str) -> dict[str, Any]:
    """The work queue's depth with its dead-letter queue's under ``dlq``: the ``queue``
    object of ``chipscale status --stack --json``."""
    queue = queue_depth(sqs, queue_url, "queue")
    dlq = queue_depth(sqs, dlq_url, "dead-letter queue")
    dead = dlq.to_dict()
    dead.pop("delayed")  # messages reach a DLQ without delay
    return {**queue.to_dict(), "dlq": dead}


def describe_queue_view(view: Mapping[str, Any], *, stack: str | None = None) -> list[str]:
    """The lines ``chipscale status`` prints under its table for a :func:`queue_view`; a
    non-empty dead-letter queue says how to move it back.

    >>> view = {"url": "https://q/work", "visible": 12, "in_flight": 3, "delayed": 0,
    ...         "dlq": {"url": "https://q/dead", "visible": 2, "in_flight": 0}}
    >>> print("\\n".join(describe_queue_view(view, stack="prod")))
    queue work: 12 waiting, 3 in flight
    dead-letter queue dead: 2 messages (look: chipscale redrive --stack prod --peek 5; move back: chipscale redrive --stack prod)
    """  # noqa: E501
    delayed = f", {view['delayed']} delayed" if view.get("delayed") else ""
    lines = [
        f"queue {queue_name(view['url'])}: {view['visible']} waiting, "
        f"{view['in_flight']} in flight{delayed}"
    ]
    dlq = view["dlq"]
    depth = int(dlq["visible"]) + int(dlq["in_flight"])
    line = f"dead-letter queue {queue_name(dlq['url'])}: {plural(depth, 'message')}"
    if dlq["in_flight"]:
        line += f" ({dlq['in_flight']} in flight)"
    if depth and stack:
        line += (
            f" (look: chipscale redrive --stack {stack} --peek 5; "
            f"move back: chipscale redrive --stack {stack})"
        )
    return [*lines, line]


def release_messages(sqs: Any, url: str, held: Mapping[str, str]) -> None:
    """Make held messages visible again now; best effort (they reappear when their
    visibility timeout ends anyway)."""
    handles = list(held.values())
    for start in range(0, len(handles), MAX_BATCH_ENTRIES):
        entries = [
            {"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": 0}
            for i, handle in enumerate(handles[start : start + MAX_BATCH_ENTRIES])
        ]
        with suppress(ClientError, BotoCoreError):
            sqs.change_message_visibility_batch(QueueUrl=url, Entries=entries)
