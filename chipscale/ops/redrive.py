"""``chipscale redrive``: moving a dead-letter queue's messages back to the work queue, by
SQS's message move task when it can start, else by receive, re-send and delete; exactly once
within a run, at least once across runs (the worker's upserts make a repeat harmless). The
two methods and their bookkeeping: docs/design.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from botocore.exceptions import BotoCoreError, ClientError

from chipscale.cloud.push_send import MAX_BATCH_BYTES, MAX_BATCH_ENTRIES
from chipscale.errors import one_line
from chipscale.ops.aws import aws_reason, error_code, queue_name
from chipscale.ops.sqs_queues import (
    DEFAULT_WAIT_SECONDS,
    QUEUE_MISSING_CODES,
    QueueDepth,
    QueueError,
    QueueNotFound,
    queue_depth,
    release_messages,
    sqs_errors,
)

Method = Literal["auto", "move-task", "receive"]


METHODS: tuple[Method, ...] = ("auto", "move-task", "receive")


#: Seconds a received message stays hidden while it is re-sent and deleted; long, since the
#: messages whose send failed are held until the run ends (then made visible again).
DEFAULT_VISIBILITY_TIMEOUT = 900


#: Seconds between two ``ListMessageMoveTasks`` polls of a running move task.
DEFAULT_POLL_SECONDS = 2.0


#: Polls that may find no task at all before the task counts as lost (the list is
#: eventually consistent just after the start).
MAX_EMPTY_POLLS = 30


class RedriveError(QueueError):
    """A redrive could not start or went wrong on the way."""


class MoveTaskUnavailable(RedriveError):
    """SQS's message move task cannot be used here (endpoint, permission or queue set-up)."""


class RedriveAborted(RedriveError):
    """A redrive stopped part way; ``summary`` says what had moved by then."""

    def __init__(self, message: str, summary: RedriveSummary) -> None:
        super().__init__(message)
        self.summary = summary


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
    exactly-once-per-run bookkeeping (and docs/design.md)."""
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
        release_messages(sqs, dlq_url, {**state.pending, **state.kept})
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
