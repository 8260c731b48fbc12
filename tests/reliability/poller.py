"""A local stand-in for Lambda's SQS event source, driving ``lambdas/sqs_worker.py``.

One poller process is one warm Lambda container: it imports the handler module once, as the
runtime does, then loops as the event source does for it: long-poll ``ReceiveMessage`` (ten
messages a call at most), gather up to ``--batch-size`` messages within
``--window`` seconds, hand the Lambda event built from the real ``ReceiveMessage`` output
(attributes included, so ``ApproximateReceiveCount`` is SQS's own count) to ``handler``,
delete the messages that succeeded and leave the ``batchItemFailures`` to reappear after the
queue's visibility timeout. An invocation that raises fails its whole batch, as in Lambda.

A process, not a thread: the handler module keeps one BatchProcessor and one worker per
container (not thread-safe, by design), and the fault tests need a PID to kill.

Everything a test needs to judge a run goes to a JSON-lines journal (``--journal``): one
line per invocation with each message's id, receive count and outcome, the failures'
exception text, and wall-clock times (``time.time()``, comparable across processes).

Test hook: with ``CHIPSCALE_TEST_HOLD_BEFORE_DELETE=PATH`` set, the first invocation that
succeeds for some message writes PATH (the messages it would delete) and then sleeps instead of
deleting: the window in which a real container can die after writing results and before
the event source deletes the messages. The test SIGKILLs the process there.

Runs with ``python tests/reliability/poller.py ARGS`` and the worker's environment; imports
nothing from the tests (no pytest in a "container").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # run as a script: the shared test helpers

from sqs_events import lambda_event  # noqa: E402

HOLD_ENV = "CHIPSCALE_TEST_HOLD_BEFORE_DELETE"
#: ReceiveMessage's limit per call.
MAX_RECEIVE = 10


class Context:
    """The Lambda context: remaining time counts down from the invocation's start, so the
    worker's deadline logic (no pack started without its margin) runs as in Lambda."""

    def __init__(self, function_name: str, timeout_s: float) -> None:
        self.function_name = function_name
        self.memory_limit_in_mb = 1024
        self.invoked_function_arn = (
            f"arn:aws:lambda:us-east-1:123456789012:function:{function_name}"
        )
        self.aws_request_id = uuid.uuid4().hex
        self._ends = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._ends - time.monotonic()) * 1000))


class Poller:
    def __init__(self, args: argparse.Namespace, journal: TextIO) -> None:
        import boto3
        from botocore.config import Config

        self.args = args
        self.journal = journal
        self.stopping = False
        self.parent = args.parent_pid
        # botocore's own retries stay on: the event source retries its SQS calls too.
        self.sqs = boto3.client("sqs", config=Config(retries={"mode": "standard"}))
        sys.path.insert(0, str(ROOT / "lambdas"))
        import sqs_worker  # the deployed module, imported as the Lambda runtime does

        self.module = sqs_worker
        self.hold = os.environ.get(HOLD_ENV) or None

    def write(self, **event: Any) -> None:
        self.journal.write(json.dumps({"pid": os.getpid(), **event}) + "\n")
        self.journal.flush()

    def should_stop(self) -> bool:
        """Stop on SIGTERM, on the stop file, or when the test process is gone (a pytest
        killed by its timeout must not leave containers polling forever)."""
        return self.stopping or Path(self.args.stop_file).exists() or os.getppid() != self.parent

    def receive(self, wait_s: int, count: int) -> list[dict[str, Any]]:
        answer = self.sqs.receive_message(
            QueueUrl=self.args.queue_url,
            MaxNumberOfMessages=min(MAX_RECEIVE, count),
            WaitTimeSeconds=wait_s,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        return list(answer.get("Messages", []))

    def gather(self) -> list[dict[str, Any]]:
        """Up to ``batch_size`` messages: the first long-polled, the rest within the window."""
        batch: list[dict[str, Any]] = []
        window_ends = 0.0
        while len(batch) < self.args.batch_size and not self.should_stop():
            if not batch:
                batch = self.receive(1, self.args.batch_size)
                window_ends = time.monotonic() + self.args.window
                continue
            if time.monotonic() >= window_ends:
                break
            more = self.receive(0, self.args.batch_size - len(batch))
            if more:
                batch.extend(more)
            else:
                time.sleep(0.1)
        return batch

    def invoke(self, batch: list[dict[str, Any]]) -> None:
        started = time.time()
        event = lambda_event(batch, self.args.queue_arn)
        context = Context("chipscale-worker", self.args.function_timeout)
        raised = None
        try:
            response = self.module.handler(event, context)
            failed = {item["itemIdentifier"] for item in response["batchItemFailures"]}
        except Exception as exc:  # the invocation failed: the whole batch comes back
            raised = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            failed = {m["MessageId"] for m in batch}
        errors = [
            f"{info[0].__name__}: {' '.join(str(info[1]).split())}"
            for info in self.module.processor.exceptions
            if info[0] is not None
        ]
        done = [m for m in batch if m["MessageId"] not in failed]
        records = [
            {
                "id": m["MessageId"],
                "md5": m["MD5OfBody"],
                "receive_count": int(m.get("Attributes", {}).get("ApproximateReceiveCount", 0)),
                "ok": m["MessageId"] not in failed,
            }
            for m in batch
        ]
        handled = time.time()
        if self.hold and done:
            held = {"pid": os.getpid(), "messages": {m["MessageId"]: m["Body"] for m in done}}
            Path(self.hold).write_text(json.dumps(held))
            self.write(event="hold", t0=started, t1=handled, records=records, errors=errors)
            while True:  # the test kills this process here, before any delete
                time.sleep(60)
        delete_failed = self.delete(done)
        self.write(
            event="batch",
            t0=started,
            t1=handled,
            deleted_at=time.time(),
            records=records,
            errors=errors,
            raised=raised,
            delete_failed=delete_failed,
        )

    def delete(self, done: list[dict[str, Any]]) -> list[str]:
        failed: list[str] = []
        for start in range(0, len(done), MAX_RECEIVE):
            chunk = done[start : start + MAX_RECEIVE]
            answer = self.sqs.delete_message_batch(
                QueueUrl=self.args.queue_url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(chunk)
                ],
            )
            failed.extend(chunk[int(f["Id"])]["MessageId"] for f in answer.get("Failed", []))
        return failed

    def run(self) -> None:
        self.write(event="start", t=time.time())
        while not self.should_stop():
            batch = self.gather()
            if batch:
                self.invoke(batch)
        self.module.worker().close()
        self.write(event="stop", t=time.time())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--queue-url", required=True)
    parser.add_argument("--queue-arn", required=True)
    parser.add_argument("--journal", required=True)
    parser.add_argument("--stop-file", required=True)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--window", type=float, default=0.5)
    parser.add_argument("--function-timeout", type=float, default=60.0)
    parser.add_argument("--parent-pid", type=int, required=True, help="exit when it is gone")
    args = parser.parse_args(argv)
    # chipscale's loggers at INFO (Lambda's default shows WARNING and up): the secret checks
    # read every line the worker can write.
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s"
    )
    with open(args.journal, "a", encoding="utf-8") as journal:
        poller = Poller(args, journal)

        def stop(signum: int, frame: Any) -> None:
            poller.stopping = True

        signal.signal(signal.SIGTERM, stop)
        poller.run()


if __name__ == "__main__":
    main()
