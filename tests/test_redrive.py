"""`chipscale redrive` against a real moto server: a queue and its dead-letter queue made
directly, and the chipscale-shaped stack of test_stack_outputs for ``--stack``.

moto 5.2 has no message move task (``StartMessageMoveTask`` and ``ListMessageMoveTasks``
answer HTTP 500), so against moto the default method falls back to receive and re-send, and
the move-task path is checked with botocore's Stubber: AWS itself is the one thing that cannot
run here. Failures of single entries come from a client wrapper around the real moto client
that fails chosen entries, as SQS does for one entry of a batch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from click.testing import CliRunner, Result
from test_stack_outputs import chipscale_template, clean_env, deploy_stack

from chipscale.cli import cli
from chipscale.ops.dlq_peek import peek
from chipscale.ops.redrive import (
    MoveTaskUnavailable,
    QueuePair,
    RedriveError,
    inspect_pair,
    move_by_receive,
    move_with_task,
    redrive,
)
from chipscale.ops.sqs_queues import QueueDepth
from chipscale.ops.stack_outputs import resolve_stack

ROOT = Path(__file__).resolve().parents[1]
N = 250


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


@pytest.fixture
def sqs(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """boto3 pointed at moto through AWS_ENDPOINT_URL, as a user's environment would be."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    return boto3.client("sqs")


@pytest.fixture
def queues(sqs: Any) -> tuple[str, str]:
    """A fresh (dead-letter queue, queue) pair; the queue redrives into the DLQ."""
    name = uuid.uuid4().hex[:10]
    dlq = sqs.create_queue(QueueName=f"dlq-{name}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]
    policy = {"deadLetterTargetArn": arn["QueueArn"], "maxReceiveCount": "3"}
    queue = sqs.create_queue(
        QueueName=f"work-{name}", Attributes={"RedrivePolicy": json.dumps(policy)}
    )["QueueUrl"]
    return dlq, queue


@pytest.fixture
def stack(sqs: Any) -> str:
    return deploy_stack(chipscale_template())


def bodies(count: int, job: str = "roofs") -> list[str]:
    """Distinct chipscale message bodies, one tile each."""
    return [
        json.dumps({"v": 1, "job": job, "source": "s3://b/a.tif", "tiles": [[i, 7, 18]]})
        for i in range(count)
    ]


def fill(sqs: Any, url: str, texts: list[str], **attributes: Any) -> None:
    for start in range(0, len(texts), 10):
        entries = [
            {"Id": str(i), "MessageBody": text, **attributes}
            for i, text in enumerate(texts[start : start + 10])
        ]
        answer = sqs.send_message_batch(QueueUrl=url, Entries=entries)
        assert not answer.get("Failed"), answer


def drain(sqs: Any, url: str) -> list[dict[str, Any]]:
    """Every message of the queue, received (and hidden) once each."""
    got: list[dict[str, Any]] = []
    while True:
        messages = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            VisibilityTimeout=600,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
        ).get("Messages", [])
        if not messages:
            return got
        got += messages


def depth(sqs: Any, url: str) -> tuple[int, int]:
    attributes = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return (
        int(attributes["ApproximateNumberOfMessages"]),
        int(attributes["ApproximateNumberOfMessagesNotVisible"]),
    )


def stack_queues(stack: str) -> tuple[str, str]:
    outputs = resolve_stack(stack)
    return outputs.dlq_url, outputs.queue_url


# ----------------------------------------------------------------------------- moving


@pytest.mark.parametrize("method", ["auto", "receive"])
def test_redrive_stack_moves_every_message_exactly_once(sqs: Any, stack: str, method: str) -> None:
    dlq, queue = stack_queues(stack)
    texts = bodies(N)
    fill(sqs, dlq, texts, MessageAttributes={"origin": {"DataType": "String", "StringValue": "t"}})

    result = run("redrive", "--stack", stack, "--yes", "--json", "--method", method)

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["moved"], summary["failed"], summary["undeleted"]) == (N, 0, 0)
    assert summary["method"] == "receive"  # moto has no message move task
    if method == "auto":  # tried, refused by moto, said why
        assert "MessageMoveTask" in summary["fallback_reason"]
    assert f"dead-letter queue {dlq.rsplit('/', 1)[1]}: {N} messages" in result.stderr
    assert f"moved {N} messages" in result.stderr
    moved = drain(sqs, queue)
    assert Counter(m["Body"] for m in moved) == Counter(texts)
    assert {m["MessageAttributes"]["origin"]["StringValue"] for m in moved} == {"t"}
    assert depth(sqs, dlq) == (0, 0)


def test_a_queue_pair_without_a_stack_and_at_most_max(sqs: Any, queues: tuple[str, str]) -> None:
    dlq, queue = queues
    texts = bodies(40)
    fill(sqs, dlq, texts)

    result = run("redrive", "--dlq", dlq, "--queue", queue, "--yes", "--max", "15")

    assert result.exit_code == 0, result.output
    assert "moved 15 messages" in result.stderr and "at most 15" in result.stderr
    moved = [m["Body"] for m in drain(sqs, queue)]
    left = [m["Body"] for m in drain(sqs, dlq)]
    assert len(moved) == 15 and len(left) == 25
    assert Counter(moved + left) == Counter(texts)


def test_an_empty_dead_letter_queue_moves_nothing_without_asking(
    sqs: Any, queues: tuple[str, str]
) -> None:
    dlq, queue = queues
    result = run("redrive", "--dlq", dlq, "--queue", queue)
    assert result.exit_code == 0 and "Nothing to move." in result.stderr


def test_move_task_method_against_an_endpoint_without_it_is_one_line(
    sqs: Any, queues: tuple[str, str]
) -> None:
    dlq, queue = queues
    fill(sqs, dlq, bodies(3))
    result = run("redrive", "--dlq", dlq, "--queue", queue, "--yes", "--method", "move-task")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith("Error: ListMessageMoveTasks refused")
    assert "Traceback" not in result.output and "<html" not in result.output
    assert depth(sqs, dlq) == (3, 0) and depth(sqs, queue) == (0, 0)


def test_fifo_queues_keep_their_message_group(sqs: Any) -> None:
    name = uuid.uuid4().hex[:10]
    fifo = {"FifoQueue": "true", "ContentBasedDeduplication": "false"}
    dlq = sqs.create_queue(QueueName=f"dlq-{name}.fifo", Attributes=fifo)["QueueUrl"]
    queue = sqs.create_queue(QueueName=f"work-{name}.fifo", Attributes=fifo)["QueueUrl"]
    for i, text in enumerate(bodies(4)):
        sqs.send_message(
            QueueUrl=dlq,
            MessageBody=text,
            MessageGroupId=f"g{i % 2}",
            MessageDeduplicationId=str(i),
        )
    summary = move_by_receive(sqs, inspect_pair(sqs, dlq, queue))
    assert (summary.moved, summary.failed) == (4, 0)
    moved = drain(sqs, queue)
    assert Counter(m["Body"] for m in moved) == Counter(bodies(4))
    assert {m["Attributes"]["MessageGroupId"] for m in moved} == {"g0", "g1"}


# ----------------------------------------------------------------------------- confirmation


def test_confirmation_declined_moves_nothing(
    sqs: Any, queues: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dlq, queue = queues
    fill(sqs, dlq, bodies(12))
    monkeypatch.setattr("chipscale.cli.dead_letters._can_prompt", lambda: True)

    declined = run("redrive", "--dlq", dlq, "--queue", queue, input="n\n")

    assert declined.exit_code == 1
    assert "Move 12 messages from" in declined.output and "Nothing moved." in declined.output
    assert depth(sqs, dlq) == (12, 0) and depth(sqs, queue) == (0, 0)

    accepted = run("redrive", "--dlq", dlq, "--queue", queue, input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert depth(sqs, dlq) == (0, 0) and depth(sqs, queue) == (12, 0)


def test_without_a_terminal_and_without_yes_it_refuses(sqs: Any, queues: tuple[str, str]) -> None:
    dlq, queue = queues
    fill(sqs, dlq, bodies(5))
    result = run("redrive", "--dlq", dlq, "--queue", queue)  # CliRunner's stdin is no TTY
    assert result.exit_code == 2
    assert "no terminal to confirm moving 5 messages: pass --yes" in result.stderr
    assert depth(sqs, dlq) == (5, 0) and depth(sqs, queue) == (0, 0)


# ----------------------------------------------------------------------------- failures


class FlakySqs:
    """The real moto client, with SendMessageBatch entries whose body ``fail_send`` picks
    failing once each (as SQS fails single entries), and DeleteMessageBatch entries whose
    message ``fail_delete`` picks failing ``delete_failures`` times each. A failed delete
    makes its message visible again at once, as the end of its visibility timeout would,
    so it comes back within the run."""

    def __init__(
        self,
        real: Any,
        *,
        fail_send: Callable[[str], bool] = lambda body: False,
        fail_delete: Callable[[str], bool] = lambda body: False,
        delete_failures: int = 1,
    ) -> None:
        self._real = real
        self._fail_send = fail_send
        self._fail_delete = fail_delete
        self._delete_failures = delete_failures
        self.send_failed: Counter[str] = Counter()
        self.delete_failed: Counter[str] = Counter()
        self.bodies: dict[str, str] = {}  # receipt handle -> body
        self.sent_bodies: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def receive_message(self, **kwargs: Any) -> dict[str, Any]:
        answer = self._real.receive_message(**kwargs)
        for message in answer.get("Messages", []):
            self.bodies[message["ReceiptHandle"]] = message["Body"]
        return answer

    def send_message_batch(self, *, QueueUrl: str, Entries: list[dict[str, Any]]) -> Any:
        failing = [
            e
            for e in Entries
            if self._fail_send(e["MessageBody"]) and not self.send_failed[e["MessageBody"]]
        ]
        for entry in failing:
            self.send_failed[entry["MessageBody"]] += 1
        passing = [e for e in Entries if e not in failing]
        answer: dict[str, Any] = {"Successful": [], "Failed": []}
        if passing:
            answer = self._real.send_message_batch(QueueUrl=QueueUrl, Entries=passing)
            self.sent_bodies += [e["MessageBody"] for e in passing]
        answer.setdefault("Failed", [])
        answer["Failed"] += [
            {"Id": e["Id"], "SenderFault": False, "Code": "InternalError", "Message": "try again"}
            for e in failing
        ]
        return answer

    def delete_message_batch(self, *, QueueUrl: str, Entries: list[dict[str, Any]]) -> Any:
        failing = []
        for entry in Entries:
            body = self.bodies[entry["ReceiptHandle"]]
            if self._fail_delete(body) and self.delete_failed[body] < self._delete_failures:
                self.delete_failed[body] += 1
                failing.append(entry)
        passing = [e for e in Entries if e not in failing]
        answer: dict[str, Any] = {"Successful": [], "Failed": []}
        if passing:
            answer = self._real.delete_message_batch(QueueUrl=QueueUrl, Entries=passing)
        answer.setdefault("Failed", [])
        for entry in failing:
            answer["Failed"].append(
                {"Id": entry["Id"], "SenderFault": False, "Code": "InternalError", "Message": "x"}
            )
            if self.delete_failed[self.bodies[entry["ReceiptHandle"]]] == 1:
                self._real.change_message_visibility(
                    QueueUrl=QueueUrl, ReceiptHandle=entry["ReceiptHandle"], VisibilityTimeout=0
                )
        return answer


def _index(body: str) -> int:
    return int(json.loads(body)["tiles"][0][0])


def test_failed_sends_stay_in_the_dead_letter_queue_and_are_not_duplicated(
    sqs: Any, queues: tuple[str, str]
) -> None:
    dlq, queue = queues
    texts = bodies(60)
    fill(sqs, dlq, texts)
    flaky = FlakySqs(sqs, fail_send=lambda body: _index(body) % 7 == 0)
    failing = [t for t in texts if _index(t) % 7 == 0]

    first = move_by_receive(flaky, inspect_pair(flaky, dlq, queue))

    assert (first.moved, first.failed, first.undeleted) == (60 - len(failing), len(failing), 0)
    assert first.failure_reasons == ("InternalError: try again",)
    assert depth(sqs, dlq) == (len(failing), 0)  # kept, and visible again at the end
    # A second run moves them (the wrapper fails each once); nothing arrives twice.
    second = move_by_receive(flaky, inspect_pair(flaky, dlq, queue))
    assert (second.moved, second.failed) == (len(failing), 0)
    assert Counter(m["Body"] for m in drain(sqs, queue)) == Counter(texts)
    assert depth(sqs, dlq) == (0, 0)


def test_failed_sends_exit_1_with_one_line_naming_them(
    sqs: Any, stack: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dlq, queue = stack_queues(stack)
    texts = bodies(30)
    fill(sqs, dlq, texts)
    real_client = boto3.session.Session.client

    def client(self: Any, service_name: str, *args: Any, **kwargs: Any) -> Any:
        made = real_client(self, service_name, *args, **kwargs)
        if service_name == "sqs":
            return FlakySqs(made, fail_send=lambda body: _index(body) < 4)
        return made

    monkeypatch.setattr(boto3.session.Session, "client", client)
    result = run("redrive", "--stack", stack, "--yes")

    assert result.exit_code == 1
    *_, summary_line, error = result.stderr.splitlines()
    assert summary_line.startswith("moved 26 messages") and ", 4 failed" in summary_line
    assert error == (
        f"Error: 4 messages could not be moved (still in {dlq.rsplit('/', 1)[1]}): "
        "InternalError: try again; run redrive again to retry them"
    )
    assert Counter(m["Body"] for m in drain(sqs, queue)) == Counter(texts[4:])
    assert Counter(m["Body"] for m in drain(sqs, dlq)) == Counter(texts[:4])


def test_a_message_sent_whose_delete_failed_is_never_sent_again_in_the_run(
    sqs: Any, queues: tuple[str, str]
) -> None:
    dlq, queue = queues
    texts = bodies(50)
    fill(sqs, dlq, texts)
    # Deletes of every fifth message fail twice (the immediate retry too); each comes back
    # into the DLQ's view during the run and must then be deleted, not sent again.
    flaky = FlakySqs(sqs, fail_delete=lambda body: _index(body) % 5 == 0, delete_failures=2)

    summary = move_by_receive(flaky, inspect_pair(flaky, dlq, queue))

    assert (summary.moved, summary.failed, summary.undeleted) == (50, 0, 0)
    assert sum(flaky.delete_failed.values()) == 20  # 10 messages, two failures each
    assert Counter(flaky.sent_bodies) == Counter(texts)  # each sent once
    assert Counter(m["Body"] for m in drain(sqs, queue)) == Counter(texts)
    assert depth(sqs, dlq) == (0, 0)


def test_a_delete_that_never_succeeds_is_reported_not_resent(
    sqs: Any, queues: tuple[str, str]
) -> None:
    dlq, queue = queues
    texts = bodies(20)
    fill(sqs, dlq, texts)
    flaky = FlakySqs(sqs, fail_delete=lambda body: _index(body) < 3, delete_failures=99)

    summary = move_by_receive(flaky, inspect_pair(flaky, dlq, queue))

    assert (summary.moved, summary.failed, summary.undeleted) == (20, 0, 3)
    assert Counter(flaky.sent_bodies) == Counter(texts)
    assert Counter(m["Body"] for m in drain(sqs, queue)) == Counter(texts)


# ----------------------------------------------------------------------------- move task


def _stubbed() -> tuple[Any, Stubber]:
    client = boto3.client(
        "sqs",
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        endpoint_url="https://sqs.us-east-1.amazonaws.com",
    )
    return client, Stubber(client)


PAIR = QueuePair(
    dlq=QueueDepth("https://sqs/123/dlq", "arn:aws:sqs:us-east-1:123:dlq", N, 0, 0),
    queue=QueueDepth("https://sqs/123/work", "arn:aws:sqs:us-east-1:123:work", 0, 0, 0),
)


def _task(status: str, moved: int, **extra: Any) -> dict[str, Any]:
    return {
        "Results": [
            {
                "Status": status,
                "SourceArn": PAIR.dlq.arn,
                "DestinationArn": PAIR.queue.arn,
                "ApproximateNumberOfMessagesMoved": moved,
                "ApproximateNumberOfMessagesToMove": N,
                **extra,
            }
        ]
    }


def test_the_move_task_is_started_and_followed_to_its_end() -> None:
    client, stub = _stubbed()
    listing = {"SourceArn": PAIR.dlq.arn, "MaxResults": 1}
    stub.add_response("list_message_move_tasks", {"Results": []}, listing)
    stub.add_response(
        "start_message_move_task",
        {"TaskHandle": "task-1"},
        {"SourceArn": PAIR.dlq.arn, "DestinationArn": PAIR.queue.arn},
    )
    stub.add_response("list_message_move_tasks", {"Results": []}, listing)  # not listed yet
    stub.add_response("list_message_move_tasks", _task("RUNNING", 100, TaskHandle="task-1"))
    stub.add_response("list_message_move_tasks", _task("COMPLETED", N))
    progress: list[tuple[int, int | None]] = []
    with stub:
        summary = move_with_task(
            client,
            PAIR,
            on_progress=lambda moved, total: progress.append((moved, total)),
            sleep=lambda _: None,
        )
        stub.assert_no_pending_responses()
    assert (summary.method, summary.moved, summary.failed) == ("move-task", N, 0)
    assert (summary.task_handle, summary.task_status) == ("task-1", "COMPLETED")
    assert progress == [(100, N), (N, N)]


def test_a_failed_move_task_counts_what_it_left() -> None:
    client, stub = _stubbed()
    stub.add_response("list_message_move_tasks", {"Results": []})
    stub.add_response("start_message_move_task", {"TaskHandle": "task-2"})
    stub.add_response(
        "list_message_move_tasks", _task("FAILED", 100, FailureReason="AccessDenied on work")
    )
    with stub:
        summary = move_with_task(client, PAIR, sleep=lambda _: None)
    assert (summary.moved, summary.failed) == (100, N - 100)
    assert summary.failure_reasons == ("AccessDenied on work",) and not summary.ok


def test_a_running_move_task_is_not_doubled() -> None:
    client, stub = _stubbed()
    stub.add_response("list_message_move_tasks", _task("RUNNING", 5, TaskHandle="other"))
    with stub, pytest.raises(RedriveError, match="cancel-message-move-task --task-handle other"):
        move_with_task(client, PAIR, sleep=lambda _: None)


def test_a_refused_start_is_unavailable_and_auto_falls_back(
    sqs: Any, queues: tuple[str, str]
) -> None:
    client, stub = _stubbed()
    stub.add_response("list_message_move_tasks", {"Results": []})
    stub.add_client_error("start_message_move_task", "AccessDenied", "not allowed", 403)
    with stub, pytest.raises(MoveTaskUnavailable, match="AccessDenied: not allowed"):
        move_with_task(client, PAIR, sleep=lambda _: None)
    # the same refusal from a real endpoint (moto's HTTP 500): auto moves by receive
    dlq, queue = queues
    fill(sqs, dlq, bodies(7))
    summary = redrive(sqs, inspect_pair(sqs, dlq, queue))
    assert (summary.method, summary.moved) == ("receive", 7)
    assert summary.fallback_reason and "HTTP 500" in summary.fallback_reason


# ----------------------------------------------------------------------------- peek


def test_peek_prints_messages_and_moves_nothing(sqs: Any, stack: str) -> None:
    dlq, queue = stack_queues(stack)
    fill(sqs, dlq, bodies(5, job="fields"))

    result = run("redrive", "--stack", stack, "--peek", "3")

    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 3 and len({m["message_id"] for m in lines}) == 3
    assert {(m["job"], m["tiles"], m["receives"]) for m in lines} == {("fields", 1, 1)}
    assert all(m["body"] in bodies(5, job="fields") and m["sent_at"] for m in lines)
    assert "3 of 5 messages" in result.stderr and "nothing moved" in result.stderr
    assert depth(sqs, dlq) == (5, 0) and depth(sqs, queue) == (0, 0)  # visible again at once
    assert len(peek(sqs, dlq, 10)) == 5


# ----------------------------------------------------------------------------- one-line errors


def test_a_missing_stack_is_one_line(sqs: Any) -> None:
    result = run("redrive", "--stack", "no-such-stack", "--yes")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: no CloudFormation stack 'no-such-stack' in us-east-1: check the name "
        "(`aws cloudformation list-stacks`) and AWS_REGION\n"
    )


def test_a_missing_queue_is_one_line(sqs: Any, queues: tuple[str, str]) -> None:
    dlq, queue = queues
    gone = dlq + "-gone"
    result = run("redrive", "--dlq", gone, "--queue", queue, "--yes")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: the dead-letter queue {gone} does not exist: check the URL (or the stack's "
        "outputs) and the region\n"
    )


def test_a_stack_whose_queue_was_deleted_is_one_line(sqs: Any, stack: str) -> None:
    _dlq, queue = stack_queues(stack)
    sqs.delete_queue(QueueUrl=queue)
    result = run("redrive", "--stack", stack, "--yes")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and f"the queue {queue} does not exist" in result.stderr


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chipscale.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("where", ["stack", "urls"])
def test_missing_credentials_are_one_line(moto_server: str, where: str) -> None:
    env = clean_env(AWS_REGION="us-east-1", AWS_ENDPOINT_URL=moto_server)
    url = f"{moto_server}/123456789012"
    target = (
        ["--stack", "anything"]
        if where == "stack"
        else ["--dlq", f"{url}/d", "--queue", f"{url}/q"]
    )
    done = _cli(["redrive", *target, "--yes"], env)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr  # one line, no traceback
    assert done.stderr.startswith("Error: no usable AWS credentials")
    assert "aws configure" in done.stderr


def test_stack_and_queue_urls_are_exclusive() -> None:
    both = run("redrive", "--stack", "s", "--dlq", "d", "--queue", "q")
    assert both.exit_code == 2 and "not both" in both.output
    neither = run("redrive", "--dlq", "d")
    assert neither.exit_code == 2 and "--dlq URL and --queue URL" in neither.output


def test_scripts_redrive_is_an_executable_entry() -> None:
    script = ROOT / "scripts" / "redrive"
    assert script.stat().st_mode & 0o111
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "dead-letter queue" in done.stdout
