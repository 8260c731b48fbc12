"""``chipscale redrive --peek``: a look at a dead-letter queue's messages that leaves them
where they are, each described (job, tiles) when it is a chipscale message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from chipscale.cloud.push_send import MAX_BATCH_ENTRIES
from chipscale.errors import InvalidMessageError
from chipscale.ops.sqs_queues import DEFAULT_WAIT_SECONDS, release_messages, sqs_errors
from chipscale.pipeline.messages import load_body


@dataclass(frozen=True, slots=True)
class PeekedMessage:
    """One dead-letter message as seen by ``redrive --peek``: left where it is."""

    message_id: str
    sent_at: str | None  #: ISO 8601 UTC, when the message was first sent
    receives: int | None  #: ApproximateReceiveCount: the worker's tries, plus peeks
    job: str | None  #: for a chipscale message, its job
    tiles: int | None  #: for a chipscale message, the tiles of its pack
    body: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_body(body: str) -> tuple[str | None, int | None]:
    """``(job, tiles)`` of a chipscale message body, ``(None, None)`` for anything else.

    >>> describe_body('{"v": 1, "job": "roofs", "source": "s3://b/a.tif", "tiles": [[1, 2, 3]]}')
    ('roofs', 1)
    >>> describe_body("not json")
    (None, None)
    """
    try:
        doc = load_body(body)  # the workers' parser: a poison body is described, not raised
    except InvalidMessageError:
        return None, None
    if not isinstance(doc, dict):
        return None, None
    job = doc.get("job") if isinstance(doc.get("job"), str) else None
    if isinstance(doc.get("tiles"), list):
        return job, len(doc["tiles"])
    if {"x", "y", "z"} <= doc.keys():  # chip-n-scale's single-tile message
        return job, 1
    return job, None


def peek(
    sqs: Any,
    dlq_url: str,
    count: int,
    *,
    visibility_timeout: int = 30,
    wait_seconds: int = DEFAULT_WAIT_SECONDS,
) -> list[PeekedMessage]:
    """Up to ``count`` distinct messages of the dead-letter queue, without moving them.

    They are held for ``visibility_timeout`` seconds while more are received (so the same
    one is not read twice), then made visible again at once. A peek counts as a receive
    (``ApproximateReceiveCount`` grows), which matters only to a DLQ with its own redrive
    policy.
    """
    seen: dict[str, PeekedMessage] = {}
    held: dict[str, str] = {}
    try:
        while len(seen) < count:
            with sqs_errors("dead-letter queue", dlq_url):
                messages = sqs.receive_message(
                    QueueUrl=dlq_url,
                    MaxNumberOfMessages=min(MAX_BATCH_ENTRIES, count - len(seen)),
                    VisibilityTimeout=visibility_timeout,
                    WaitTimeSeconds=wait_seconds,
                    MessageSystemAttributeNames=["SentTimestamp", "ApproximateReceiveCount"],
                ).get("Messages", [])
            fresh = [m for m in messages if m["MessageId"] not in seen]
            for message in messages:
                held[message["MessageId"]] = message["ReceiptHandle"]
            if not fresh:
                break
            for message in fresh[: count - len(seen)]:
                seen[message["MessageId"]] = _peeked(message)
    finally:
        release_messages(sqs, dlq_url, held)
    return list(seen.values())


def _peeked(message: Mapping[str, Any]) -> PeekedMessage:
    attributes = message.get("Attributes", {})
    sent = attributes.get("SentTimestamp")
    sent_at = (
        datetime.fromtimestamp(int(sent) / 1000, UTC).isoformat(timespec="seconds")
        if sent
        else None
    )
    receives = attributes.get("ApproximateReceiveCount")
    body = str(message.get("Body", ""))
    job, tiles = describe_body(body)
    return PeekedMessage(
        message_id=str(message["MessageId"]),
        body=body,
        sent_at=sent_at,
        receives=int(receives) if receives else None,
        job=job,
        tiles=tiles,
    )
