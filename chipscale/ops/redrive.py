"""Moving a dead-letter queue's messages back to the work queue (``chipscale redrive``), and
the queues' depths that ``chipscale status --stack`` shows under the job table.

A pack lands in the dead-letter queue after failing every retry (``maxReceiveCount``
receives). Once the cause is fixed (a model server down, a database full, a bug in the
worker), the operator moves the packs back; the worker's upserts make a pack that is run
twice harmless, so a redrive that delivers a message twice costs time, never results.

Two ways to move them, tried in this order:

1. **A message move task** (``StartMessageMoveTask``), the redrive SQS itself offers: one
   call, the copying done server-side at SQS's pace, message ids kept. The CLI polls
   ``ListMessageMoveTasks`` for the progress bar. It needs the source to be some queue's
   dead-letter queue, the operator to hold ``sqs:StartMessageMoveTask``, and an endpoint
   that implements it (moto 5.2 does not: it answers HTTP 500).
2. **Receive and re-send**, when the task cannot be started (any refusal of the start call,
   since nothing has moved then) or when ``max_messages`` asks for part of the queue (a task
   moves everything): receive ten messages at a time under a long visibility timeout, send
   them to the queue with ``SendMessageBatch`` (body and message attributes), then delete
   from the dead-letter queue exactly the ones whose send succeeded. A failed send leaves its
   message in the dead-letter queue, made visible again at the end of the run.

Exactly once within a run, at least once across runs: the ids of the messages re-sent are
remembered, so a message whose send succeeded but whose delete failed is deleted, never sent
again, when it reappears during the same run. A message whose delete still fails when the
run ends (or whose send call was cut off without an answer) stays in the dead-letter queue
and a later redrive sends it again: the queue then holds it twice, which the worker's
idempotent writes absorb.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)

from chipscale.cloud.push import MAX_BATCH_BYTES, MAX_BATCH_ENTRIES
from chipscale.errors import ChipscaleError, InvalidMessageError, one_line
from chipscale.ops.stack_outputs import CREDENTIALS_HELP, NoCredentials, NoRegion
from chipscale.pipeline.messages import load_body
from chipscale.safe_text import plural

Method = Literal["auto", "move-task", "receive"]
METHODS: tuple[Method, ...] = ("auto", "move-task", "receive")

#: Seconds a received message stays hidden while it is re-sent and deleted; long, since the
#: messages whose send failed are held until the run ends (then made visible again).
DEFAULT_VISIBILITY_TIMEOUT = 900
#: Long-poll seconds of each receive: an empty answer after a long poll ends the run (a
#: short poll samples a few servers and can answer empty while messages remain).
DEFAULT_WAIT_SECONDS = 1
#: Seconds between two ``ListMessageMoveTasks`` polls of a running move task.
DEFAULT_POLL_SECONDS = 2.0
#: Polls that may find no task at all before the task counts as lost (the list is
#: eventually consistent just after the start).
MAX_EMPTY_POLLS = 30

#: Error codes SQS gives a queue URL or ARN that names no queue (query and JSON protocols).
QUEUE_MISSING_CODES = frozenset(
    {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "ResourceNotFoundException"}
)


class QueueError(ChipscaleError):
    """An SQS queue could not be read or written."""


class QueueNotFound(QueueError):
    """The queue URL (given, or from the stack's outputs) names no queue in the region."""


class RedriveError(QueueError):
    """A redrive could not start or went wrong on the way."""


class MoveTaskUnavailable(RedriveError):
    """SQS's message move task cannot be used here (endpoint, permission or queue set-up)."""


class RedriveAborted(RedriveError):
    """A redrive stopped part way; ``summary`` says what had moved by then."""

    def __init__(self, message: str, summary: RedriveSummary) -> None:
        super().__init__(message)
        self.summary = summary


# ----------------------------------------------------------------------------- errors


def queue_name(url_or_arn: str) -> str:
    """The queue's name, the last part of its URL or ARN.

    >>> queue_name("https://sqs.us-east-1.amazonaws.com/123456789012/chipscale-dlq")
    'chipscale-dlq'
    """
    return url_or_arn.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]


def error_code(exc: ClientError) -> str:
    """The AWS error code of a ClientError ('' when it has none)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def aws_reason(exc: ClientError) -> str:
    """AWS's code and message, on one short line; an endpoint's HTML error page (moto's
    answer to an action it lacks) becomes its HTTP status."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", "")) or "error"
    message = " ".join(str(error.get("Message", "")).split())
    if message.startswith("<"):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return f"HTTP {status} from the endpoint (an HTML error page)"
    if len(message) > 160:
        message = message[:157] + "..."
    return f"{code}: {message}" if message and message != code else code


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


# ----------------------------------------------------------------------------- depths


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


@dataclass(frozen=True, slots=True)
class QueuePair:
    """A dead-letter queue and the work queue its messages go back to, as counted before
    the operator confirms."""

    dlq: QueueDepth
    queue: QueueDepth

    @property
    def to_move(self) -> int:
        """Messages a redrive would move now (the visible ones: in-flight messages are being
        received by someone else, a peek or another redrive)."""
        return self.dlq.visible


def inspect_pair(sqs: Any, dlq_url: str, queue_url: str) -> QueuePair:
    """Both queues' depths and ARNs; refuses a pair that is one queue twice."""
    if dlq_url.rstrip("/") == queue_url.rstrip("/"):
        raise RedriveError(f"the dead-letter queue and the queue are both {dlq_url}")
    return QueuePair(
        dlq=queue_depth(sqs, dlq_url, "dead-letter queue"),
        queue=queue_depth(sqs, queue_url, "queue"),
    )


# ----------------------------------------------------------------------------- peek


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
        _release(sqs, dlq_url, held)
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


def _release(sqs: Any, url: str, held: Mapping[str, str]) -> None:
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


# ----------------------------------------------------------------------------- redrive

#: ``on_progress(moved, total)``: messages moved so far, and the total when known.
ProgressCallback = Callable[[int, int | None], None]


@dataclass(frozen=True, slots=True)
class RedriveSummary:
    """What a redrive did."""

    method: Literal["move-task", "receive"]
    dlq_url: str
    queue_url: str
    moved: int  #: messages now in the queue
    failed: int  #: messages left in the dead-letter queue by a failure (not by --max)
    seconds: float
    #: sent to the queue, but still in the dead-letter queue too (their delete failed): a
    #: later redrive will deliver them twice
    undeleted: int = 0
    failure_reasons: tuple[str, ...] = ()
    #: why the move task was not used, when the receive path ran
    fallback_reason: str | None = None
    task_handle: str | None = None
    #: a move task's end state (COMPLETED, FAILED, CANCELLED)
    task_status: str | None = None
    messages_per_second: float = field(init=False)

    def __post_init__(self) -> None:
        rate = self.moved / self.seconds if self.seconds > 0 else 0.0
        object.__setattr__(self, "messages_per_second", rate)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def redrive(
    sqs: Any,
    pair: QueuePair,
    *,
    method: Method = "auto",
    max_messages: int | None = None,
    on_progress: ProgressCallback | None = None,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT,
    wait_seconds: int = DEFAULT_WAIT_SECONDS,
) -> RedriveSummary:
    """Move the messages of ``pair.dlq`` to ``pair.queue``: by a message move task when
    ``method`` allows and it can start, else by receive and re-send (see the module's
    docstring). ``max_messages`` moves at most that many, by receive and re-send (a move
    task has no count limit).

    Raises :class:`RedriveAborted` (with the summary so far) when a whole SQS call fails
    part way, :class:`MoveTaskUnavailable` for ``method="move-task"`` where no task can run.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    fallback_reason = None
    if max_messages is not None:
        if method == "move-task":
            raise MoveTaskUnavailable(
                "a message move task moves the whole dead-letter queue: --max needs the "
                "receive method"
            )
        fallback_reason = f"at most {max_messages} messages: a move task moves them all"
    elif method != "receive":
        try:
            return move_with_task(sqs, pair, on_progress=on_progress, poll_seconds=poll_seconds)
        except MoveTaskUnavailable as exc:
            if method == "move-task":
                raise
            fallback_reason = str(exc)
    else:
        fallback_reason = "the receive method was asked for"
    return move_by_receive(
        sqs,
        pair,
        max_messages=max_messages,
        on_progress=on_progress,
        visibility_timeout=visibility_timeout,
        wait_seconds=wait_seconds,
        fallback_reason=fallback_reason,
    )


# ----------------------------------------------------------------------------- move task


def move_with_task(
    sqs: Any,
    pair: QueuePair,
    *,
    on_progress: ProgressCallback | None = None,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> RedriveSummary:
    """Move every message by one ``StartMessageMoveTask`` and follow it to its end.

    :class:`MoveTaskUnavailable` when the task cannot start (nothing has moved then);
    :class:`RedriveError` when a task already runs on this DLQ (one at a time, SQS's rule).
    Interrupted (Ctrl-C), the task is cancelled: what moved stays moved.
    """
    dlq, where = pair.dlq, "dead-letter queue"
    if not hasattr(sqs, "start_message_move_task"):
        raise MoveTaskUnavailable("this botocore has no StartMessageMoveTask")
    started = time.monotonic()
    try:
        previous = sqs.list_message_move_tasks(SourceArn=dlq.arn, MaxResults=1).get("Results", [])
    except ClientError as exc:
        if error_code(exc) in QUEUE_MISSING_CODES:
            raise QueueNotFound(f"the {where} {dlq.url} does not exist") from exc
        raise MoveTaskUnavailable(f"ListMessageMoveTasks refused: {aws_reason(exc)}") from exc
    if previous and previous[0].get("Status") == "RUNNING":
        handle = previous[0].get("TaskHandle", "?")
        raise RedriveError(
            f"a message move task already runs on {queue_name(dlq.url)} (SQS allows one): "
            f"wait for it, or cancel it with `aws sqs cancel-message-move-task --task-handle "
            f"{handle}`"
        )
    try:
        handle = sqs.start_message_move_task(SourceArn=dlq.arn, DestinationArn=pair.queue.arn)[
            "TaskHandle"
        ]
    except ClientError as exc:
        if error_code(exc) in QUEUE_MISSING_CODES:
            raise QueueNotFound(f"the {where} {dlq.url} does not exist") from exc
        raise MoveTaskUnavailable(f"StartMessageMoveTask refused: {aws_reason(exc)}") from exc
    with sqs_errors(where, dlq.url):
        task = _follow_task(sqs, dlq.arn, handle, on_progress, poll_seconds, sleep)
    moved = int(task.get("ApproximateNumberOfMessagesMoved", 0))
    to_move = int(task.get("ApproximateNumberOfMessagesToMove", moved) or moved)
    status = str(task.get("Status"))
    reasons = () if status == "COMPLETED" else (str(task.get("FailureReason") or status),)
    return RedriveSummary(
        method="move-task",
        dlq_url=dlq.url,
        queue_url=pair.queue.url,
        moved=moved,
        failed=0 if status == "COMPLETED" else max(0, to_move - moved),
        seconds=time.monotonic() - started,
        failure_reasons=reasons,
        task_handle=handle,
        task_status=status,
    )


def _follow_task(
    sqs: Any,
    source_arn: str,
    handle: str,
    on_progress: ProgressCallback | None,
    poll_seconds: float,
    sleep: Callable[[float], None],
) -> Mapping[str, Any]:
    """Poll the latest move task of ``source_arn`` (ours: SQS runs one at a time) until it
    is no longer RUNNING or CANCELLING; cancel it if interrupted."""
    empty_polls = 0
    try:
        while True:
            sleep(poll_seconds)
            results = sqs.list_message_move_tasks(SourceArn=source_arn, MaxResults=1).get(
                "Results", []
            )
            if not results:
                empty_polls += 1
                if empty_polls >= MAX_EMPTY_POLLS:
                    raise RedriveError(
                        f"message move task {handle} is not listed for {queue_name(source_arn)}"
                    )
                continue
            task = results[0]
            if on_progress is not None:
                total = task.get("ApproximateNumberOfMessagesToMove")
                moved = int(task.get("ApproximateNumberOfMessagesMoved", 0))
                on_progress(moved, int(total) if total is not None else None)
            if task.get("Status") not in ("RUNNING", "CANCELLING"):
                return task
    except KeyboardInterrupt:
        with suppress(ClientError, BotoCoreError):
            sqs.cancel_message_move_task(TaskHandle=handle)
        raise


# ----------------------------------------------------------------------------- receive path


@dataclass
class _ReceiveState:
    """The bookkeeping that makes each message move once in a run."""

    #: MessageIds re-sent to the queue this run: never sent again
    sent: set[str] = field(default_factory=set)
    #: sent, delete not yet done: MessageId -> latest receipt handle
    undeleted: dict[str, str] = field(default_factory=dict)
    #: send failed, left in the DLQ: MessageId -> latest receipt handle (released at the end)
    kept: dict[str, str] = field(default_factory=dict)
    #: received, not yet sent (released if the run stops before sending them)
    pending: dict[str, str] = field(default_factory=dict)
    moved: int = 0
    reasons: list[str] = field(default_factory=list)

    def note(self, reason: str) -> None:
        if reason not in self.reasons and len(self.reasons) < 5:
            self.reasons.append(reason)


def move_by_receive(
    sqs: Any,
    pair: QueuePair,
    *,
    max_messages: int | None = None,
    on_progress: ProgressCallback | None = None,
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT,
    wait_seconds: int = DEFAULT_WAIT_SECONDS,
    fallback_reason: str | None = None,
) -> RedriveSummary:
    """Receive, re-send, delete what was re-sent, until a long-poll receive comes back
    empty or ``max_messages`` have moved or failed. See the module docstring for the
    exactly-once-per-run bookkeeping."""
    dlq_url, queue_url = pair.dlq.url, pair.queue.url
    total = pair.to_move if max_messages is None else min(max_messages, pair.to_move)
    state = _ReceiveState()
    started = time.monotonic()

    def summary() -> RedriveSummary:
        return RedriveSummary(
            method="receive",
            dlq_url=dlq_url,
            queue_url=queue_url,
            moved=state.moved,
            failed=len(state.kept),
            seconds=time.monotonic() - started,
            undeleted=len(state.undeleted),
            failure_reasons=tuple(state.reasons),
            fallback_reason=fallback_reason,
        )

    if on_progress is not None:
        on_progress(0, total)
    try:
        while True:
            want = MAX_BATCH_ENTRIES
            if max_messages is not None:
                want = min(want, max_messages - state.moved - len(state.kept))
                if want <= 0:
                    break
            try:
                messages = _receive(sqs, dlq_url, want, visibility_timeout, wait_seconds)
            except QueueError as exc:
                raise RedriveAborted(str(exc), summary()) from exc
            if not messages:
                break
            fresh, to_delete = [], []
            for message in messages:
                message_id, handle = message["MessageId"], message["ReceiptHandle"]
                if message_id in state.sent:  # its delete failed earlier: delete, never re-send
                    state.undeleted[message_id] = handle
                    to_delete.append(message_id)
                elif message_id in state.kept:  # its send failed: stays in the DLQ
                    state.kept[message_id] = handle
                else:
                    state.pending[message_id] = handle
                    fresh.append(message)
            for chunk in _chunks_by_size(fresh):
                to_delete += _send(sqs, queue_url, chunk, state, summary)
            _delete(sqs, dlq_url, to_delete, state, summary)
            if on_progress is not None:
                on_progress(state.moved, total)
    finally:
        # Messages received but never sent, and those kept by a failed send: visible again
        # now, so a new redrive (or a look with --peek) finds them without waiting.
        _release(sqs, dlq_url, {**state.pending, **state.kept})
    return summary()


def _receive(
    sqs: Any, dlq_url: str, count: int, visibility_timeout: int, wait_seconds: int
) -> list[dict[str, Any]]:
    with sqs_errors("dead-letter queue", dlq_url):
        answer = sqs.receive_message(
            QueueUrl=dlq_url,
            MaxNumberOfMessages=count,
            VisibilityTimeout=visibility_timeout,
            WaitTimeSeconds=wait_seconds,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["AWSTraceHeader", "MessageGroupId"],
        )
    return list(answer.get("Messages", []))


def _entry_size(message: Mapping[str, Any]) -> int:
    """The bytes a message counts against SendMessageBatch's payload limit: its body plus
    its attributes' names, types and values."""
    size = len(str(message.get("Body", "")).encode())
    for name, value in message.get("MessageAttributes", {}).items():
        size += len(name.encode()) + len(str(value.get("DataType", "")).encode())
        size += len(str(value.get("StringValue", "")).encode()) + len(value.get("BinaryValue", b""))
    return size


def _chunks_by_size(messages: Sequence[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """SendMessageBatch groups of at most ten entries and :data:`MAX_BATCH_BYTES` (a message
    bigger than that alone goes alone: SQS takes up to 1 MiB)."""
    chunk: list[dict[str, Any]] = []
    size = 0
    for message in messages:
        entry_size = _entry_size(message)
        if chunk and (len(chunk) >= MAX_BATCH_ENTRIES or size + entry_size > MAX_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(message)
        size += entry_size
    if chunk:
        yield chunk


def _send_entry(index: int, message: Mapping[str, Any], fifo: bool) -> dict[str, Any]:
    """A SendMessageBatch entry carrying the message as it was: body, message attributes,
    X-Ray trace header, and for a FIFO queue its group (deduplicated by the original id)."""
    entry: dict[str, Any] = {"Id": str(index), "MessageBody": message["Body"]}
    attributes = {
        name: {k: v for k, v in value.items() if k in ("DataType", "StringValue", "BinaryValue")}
        for name, value in message.get("MessageAttributes", {}).items()
    }
    if attributes:
        entry["MessageAttributes"] = attributes
    system = message.get("Attributes", {})
    if system.get("AWSTraceHeader"):
        entry["MessageSystemAttributes"] = {
            "AWSTraceHeader": {"DataType": "String", "StringValue": system["AWSTraceHeader"]}
        }
    if fifo:
        entry["MessageGroupId"] = system.get("MessageGroupId") or "redrive"
        entry["MessageDeduplicationId"] = message["MessageId"]
    return entry


def _send(
    sqs: Any,
    queue_url: str,
    chunk: Sequence[dict[str, Any]],
    state: _ReceiveState,
    summary: Callable[[], RedriveSummary],
) -> list[str]:
    """Send one chunk; record each message as sent (to delete) or kept (send failed).
    Returns the ids sent."""
    fifo = queue_url.endswith(".fifo")
    entries = [_send_entry(i, message, fifo) for i, message in enumerate(chunk)]
    try:
        answer = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
    except ClientError as exc:
        # A refusal: nothing of the batch was sent; the messages stay in the DLQ (pending,
        # released when the run ends).
        reason = aws_reason(exc)
        if error_code(exc) in QUEUE_MISSING_CODES:
            reason = f"the queue {queue_url} does not exist"
        raise RedriveAborted(
            f"SendMessageBatch to {queue_name(queue_url)}: {reason}", summary()
        ) from exc
    except BotoCoreError as exc:
        # No answer: the batch may have been sent. Never released early nor re-sent in this
        # run; a later redrive may deliver these twice (at least once).
        for message in chunk:
            state.pending.pop(message["MessageId"], None)
        raise RedriveAborted(
            f"SendMessageBatch to {queue_name(queue_url)} got no answer: {one_line(exc)}",
            summary(),
        ) from exc
    succeeded = {str(item["Id"]) for item in answer.get("Successful", [])}
    failures = {str(item["Id"]): item for item in answer.get("Failed", [])}
    sent = []
    for index, message in enumerate(chunk):
        message_id = message["MessageId"]
        handle = state.pending.pop(message_id)
        if str(index) in succeeded:
            state.sent.add(message_id)
            state.undeleted[message_id] = handle
            state.moved += 1
            sent.append(message_id)
        else:
            failure = failures.get(str(index), {})
            state.kept[message_id] = handle
            code = failure.get("Code", "no answer for the entry")
            state.note(f"{code}: {failure['Message']}" if failure.get("Message") else code)
    return sent


def _delete(
    sqs: Any,
    dlq_url: str,
    ids: Sequence[str],
    state: _ReceiveState,
    summary: Callable[[], RedriveSummary],
) -> None:
    """Delete from the DLQ the messages ``ids`` (sent, with a receipt handle from this
    receive), trying failed entries once more at once. What still fails stays in
    ``state.undeleted``: deleted when it reappears in this run, reported when the run ends."""
    todo = [message_id for message_id in ids if message_id in state.undeleted]
    for _attempt in range(2):
        failed: list[str] = []
        for start in range(0, len(todo), MAX_BATCH_ENTRIES):
            batch = todo[start : start + MAX_BATCH_ENTRIES]
            entries = [
                {"Id": str(i), "ReceiptHandle": state.undeleted[message_id]}
                for i, message_id in enumerate(batch)
            ]
            try:
                with sqs_errors("dead-letter queue", dlq_url):
                    answer = sqs.delete_message_batch(QueueUrl=dlq_url, Entries=entries)
            except QueueError as exc:
                # Deletes failing wholesale (a permission, an outage): stop before moving more
                # messages that would stay behind as duplicates.
                raise RedriveAborted(f"DeleteMessageBatch: {exc}", summary()) from exc
            done = {int(item["Id"]) for item in answer.get("Successful", [])}
            for i, message_id in enumerate(batch):
                if i in done:
                    state.undeleted.pop(message_id, None)
                else:
                    failed.append(message_id)
        if not failed:
            return
        todo = failed
