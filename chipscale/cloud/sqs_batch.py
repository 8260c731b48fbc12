"""An SQS batch whose messages' rows are stored together, after every message has run.

:class:`PackBatchProcessor` is Powertools' BatchProcessor with one write per invocation: a
record whose rows that write could not store is reported failed, exactly as if its handler
had raised, so one message's failure never sends its neighbours back (docs/design.md,
"The failure model"). While a record is handled, :attr:`PackBatchProcessor.upcoming` is the
next one, whose pack the handler reads ahead; ``end`` runs when the batch is done.
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

    def __init__(
        self, store: StoreBatch, *, end: Callable[[], None] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(event_type=EventType.SQS, **kwargs)
        self._store = store
        self._end = end
        self._held: list[tuple[dict[str, Any], Any]] = []
        self._position = 0
        #: The record after the one being handled, if any: the handler reads its pack ahead.
        self.upcoming: SQSRecord | None = None

    def _prepare(self) -> None:
        super()._prepare()  # type: ignore[no-untyped-call]  # Powertools leaves it unannotated
        self._held = []
        self._position = 0
        self.upcoming = None

    def _process_record(self, record: dict[str, Any]) -> Any:
        # Powertools handles the records one after the other, in order.
        records: list[dict[str, Any]] = self.records
        self._position += 1
        nxt = records[self._position] if self._position < len(records) else None
        self.upcoming = None if nxt is None else SQSRecord(nxt)
        return super()._process_record(record)

    def success_handler(self, record: dict[str, Any], result: Any) -> Any:
        if result is not None:
            self._held.append((record, result))
        return super().success_handler(record, result)

    def _clean(self) -> None:
        self.upcoming = None
        if self._end is not None:
            self._end()
        held, self._held = self._held, []
        if held:
            outcomes = self._store([result for _, result in held])
            for (record, _), outcome in zip(held, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    self._fail_late(record, outcome)
        super()._clean()  # type: ignore[no-untyped-call]  # Powertools leaves it unannotated

    def _fail_late(self, record: dict[str, Any], exc: Exception) -> None:
        """Move a record that had succeeded to the failures."""
        # Powertools types these as record objects; they are the event's dicts.
        messages: list[Any] = self.success_messages
        messages[:] = [m for m in messages if m is not record]
        self.failure_handler(SQSRecord(record), (type(exc), exc, exc.__traceback__))
