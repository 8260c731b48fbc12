"""An SQS batch whose messages' rows are stored together, after every message has run.

Powertools' BatchProcessor settles a record when its handler returns. The worker's handler
returns rows to store instead (:meth:`chipscale.cloud.queue_worker.QueueWorker.predict`), and
:class:`PackBatchProcessor` stores the rows of the whole batch in one write once the last
record has run: one round trip and one commit on the database per invocation, not one per
message. A record whose rows that write could not store is reported failed then, exactly as
if its handler had raised, so partial batch failures keep their meaning: one message's
failure never sends its neighbours back, and a batch where every record failed raises, so
Lambda returns all of it to the queue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

#: Stores what the handlers returned, in one write; per result, anything, or the exception
#: that kept it from being stored (its record then fails).
StoreBatch = Callable[[Sequence[Any]], Sequence[object]]


class PackBatchProcessor(BatchProcessor):
    """Powertools' SQS BatchProcessor that hands the handlers' results to ``store`` at the
    end of the batch; a handler that returns None (a message rejected for good) has nothing
    to store."""

    def __init__(self, store: StoreBatch, **kwargs: Any) -> None:
        super().__init__(event_type=EventType.SQS, **kwargs)
        self._store = store
        self._held: list[tuple[dict[str, Any], Any]] = []

    def _prepare(self) -> None:
        super()._prepare()
        self._held = []

    def success_handler(self, record: dict[str, Any], result: Any) -> Any:
        if result is not None:
            self._held.append((record, result))
        return super().success_handler(record, result)

    def _clean(self) -> None:
        held, self._held = self._held, []
        if held:
            outcomes = self._store([result for _, result in held])
            for (record, _), outcome in zip(held, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    self._fail_late(record, outcome)
        super()._clean()

    def _fail_late(self, record: dict[str, Any], exc: Exception) -> None:
        """Move a record that had succeeded to the failures."""
        self.success_messages[:] = [m for m in self.success_messages if m is not record]
        self.failure_handler(SQSRecord(record), (type(exc), exc, exc.__traceback__))
