"""The cloud worker: SQS messages in, their packs read and predicted, their rows stored once
per Lambda batch, metrics out.

:meth:`QueueWorker.predict` runs for each message (a message that can never succeed goes to
the ``rejects`` table and returns), reading the next message's pack while it predicts;
:meth:`QueueWorker.store_packs` writes the batch's rows.
``lambdas/sqs_worker.py`` wires it to :class:`chipscale.cloud.sqs_batch.PackBatchProcessor`.
Rejects, ``error`` rows, retries and the DLQ: docs/design.md, "The failure model".
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from chipscale import names
from chipscale.cloud.allowed_sources import check_prefix, pack_refusal
from chipscale.cloud.allowed_sources import source_refusal as source_refusal  # re-exported
from chipscale.cloud.job_record import WORKER_DEFAULT_SOURCE
from chipscale.errors import ChipscaleError, InvalidMessageError, TransientError
from chipscale.grid.packs import DEFAULT_MAX_TILES
from chipscale.models.predictors import Predictor
from chipscale.models.torchserve_client import ModelChanged
from chipscale.pipeline.messages import PackMessage, load_body, parse_message, storable
from chipscale.pipeline.process import (
    PackOutcome,
    PackResults,
    ReadPack,
    predict_read,
    read_pack,
)
from chipscale.pipeline.read_ahead import ReadAheadSlot
from chipscale.results import ResultStore
from chipscale.results.base import job_conflict
from chipscale.values import MAX_REJECTED_BODY, JobInfo, ModelInfo, Rejection

log = logging.getLogger(__name__)

#: Seconds of an invocation kept back from the model call: enough to write the pack's rows
#: and return the batch response before Lambda kills the invocation.
DEADLINE_MARGIN_S = 5.0


class WorkerConfigError(ChipscaleError):
    """The worker's environment is incomplete or malformed (a deploy error)."""


class OutOfTime(TransientError):
    """Too little of the invocation is left to start a pack: SQS delivers it again."""


class MetricsSink(Protocol):
    """What the worker needs of Powertools' ``Metrics``: one call per data point."""

    def add_metric(self, name: str, unit: Any, value: float) -> None: ...


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """The worker's configuration, set by the stack as environment variables (names.ENV_*)."""

    model_url: str
    max_tiles: int = DEFAULT_MAX_TILES
    default_job: str | None = None
    default_source: str | None = None
    #: ``s3://bucket/prefix/`` and ``http(s)://host/...`` prefixes the worker may read.
    allowed_sources: tuple[str, ...] = ()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> WorkerSettings:
        """Read the settings; a missing model URL or a malformed number is a deploy error."""
        model_url = environ.get(names.ENV_MODEL_URL, "").strip()
        if not model_url:
            raise WorkerConfigError(f"{names.ENV_MODEL_URL} is not set")
        raw_max = environ.get(names.ENV_MAX_TILES_PER_MESSAGE) or str(DEFAULT_MAX_TILES)
        try:
            max_tiles = int(raw_max)
        except ValueError:
            raise WorkerConfigError(
                f"{names.ENV_MAX_TILES_PER_MESSAGE}={raw_max!r} is not a number"
            ) from None
        allowed = tuple(
            p.strip() for p in environ.get(names.ENV_ALLOWED_SOURCES, "").split(",") if p.strip()
        )
        for prefix in allowed:
            try:
                check_prefix(prefix)
            except InvalidMessageError as exc:
                raise WorkerConfigError(f"{names.ENV_ALLOWED_SOURCES}: {exc}") from None
        return cls(
            model_url=model_url,
            max_tiles=max_tiles,
            default_job=environ.get(names.ENV_DEFAULT_JOB) or None,
            default_source=environ.get(names.ENV_DEFAULT_SOURCE) or None,
            allowed_sources=allowed,
        )


def message_refusal(message: PackMessage, allowed: Sequence[str]) -> str | None:
    """Why the worker must not read ``message``'s pack (its source, or every candidate asset
    of a mosaic pack: :func:`~chipscale.cloud.allowed_sources.pack_refusal`), or None."""
    return pack_refusal(message.source, [(a.id, a.href) for a in message.assets], allowed)


def job_of(body: str) -> str | None:
    """The job named by a body that failed validation, if it is readable at all (for status)."""
    try:
        doc = load_body(body)
    except InvalidMessageError:
        return None
    job = doc.get("job") if isinstance(doc, dict) else None
    return job[:200] if isinstance(job, str) and storable(job) else None


class QueueWorker:
    """Handles one message at a time with connections kept across invocations.

    ``open_predictor`` and ``open_store`` are called on first use, so a container whose
    first message is malformed still records it, and a cold start does not fail on a model
    server that is still booting (the message is retried instead).
    """

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        open_predictor: Callable[[str], Predictor],
        open_store: Callable[[], ResultStore],
        metrics: MetricsSink | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._open_predictor = open_predictor
        self._open_store = open_store
        self._metrics = metrics
        self._clock = clock
        self._predictor: Predictor | None = None
        self._store: ResultStore | None = None
        self._jobs: dict[str, JobInfo] = {}  # recorded jobs seen (see job_refusal)
        self._ahead: ReadAheadSlot[tuple[PackMessage, ModelInfo], ReadPack] = ReadAheadSlot(
            lambda pair: read_pack(*pair)
        )

    @property
    def store(self) -> ResultStore:
        if self._store is None:
            self._store = self._open_store()
        return self._store

    @property
    def predictor(self) -> Predictor:
        if self._predictor is None:
            self._predictor = self._open_predictor(self.settings.model_url)
        return self._predictor

    def predict(
        self,
        message_id: str,
        body: str,
        *,
        remaining_s: float | None = None,
        then: tuple[str, str] | None = None,
    ) -> PackResults | None:
        """Validate one message and read and predict its pack, without storing the rows;
        None when the message was rejected for good (and recorded).

        ``remaining_s`` is the invocation's time left (Lambda's remaining time): the model
        call must end :data:`DEADLINE_MARGIN_S` before it, and a pack is not started at all
        without that margin, which also leaves the time to store the batch's rows.
        ``then`` (id, body) is the batch's next message, whose pack is read while this one
        is predicted (:meth:`read_ahead`).
        """
        ahead = self._ahead.take(message_id)
        try:
            message = self._parse(body)
        except InvalidMessageError as exc:
            self._reject(message_id, str(exc), body, job_of(body))
            return None
        refusal = message_refusal(message, self.settings.allowed_sources)
        refusal = refusal or self.job_refusal(message)
        if refusal is not None:
            self._reject(message_id, refusal, body, message.job)
            return None
        deadline = None
        if remaining_s is not None:
            if remaining_s <= DEADLINE_MARGIN_S:
                raise OutOfTime(f"{remaining_s:.1f} s left in the invocation: pack left for retry")
            deadline = self._clock() + remaining_s - DEADLINE_MARGIN_S
        try:
            info = self.predictor.info
            # Read ahead by the previous message: its exception is raised here, as ours.
            read = ahead() if ahead is not None else None
            if read is None or read.message != message or read.info != info:
                read = read_pack(message, info)
            if then is not None:
                self.read_ahead(*then)
            return predict_read(read, predictor=self.predictor, deadline=deadline)
        except ModelChanged:
            # Hosts rolled to another model: the next message starts on the new version.
            self._ahead.drop()
            self._drop_predictor()
            raise

    def read_ahead(self, message_id: str, body: str) -> None:
        """Start reading the pack of the batch's next message while this one is predicted.

        Only a message that parses and whose source is allowed is read (a refused source is
        never opened); its other checks run on its turn, which takes the read or drops it.
        """
        try:
            message = self._parse(body)
        except InvalidMessageError:
            return
        if message_refusal(message, self.settings.allowed_sources) is None:
            self._ahead.start(message_id, (message, self.predictor.info))

    def _parse(self, body: str) -> PackMessage:
        """The message of ``body`` with this worker's defaults and limit."""
        settings = self.settings
        return parse_message(
            body,
            default_job=settings.default_job,
            default_source=settings.default_source,
            max_tiles=settings.max_tiles,
        )

    def end_batch(self) -> None:
        """Drop a read no message took (its message failed before its turn)."""
        self._ahead.drop()

    def job_refusal(self, message: PackMessage) -> str | None:
        """Why ``message``'s rows may not go into its job, or None: a recorded job keeps the
        source and model it was created with (:func:`chipscale.results.base.job_conflict`).
        A job recorded by a push without a source reads the worker's default. A job no one
        recorded may be written. Recorded jobs are kept for the container's life (their
        source and model never change), so a job costs one lookup per container."""
        recorded = self._jobs.get(message.job)
        if recorded is None:
            recorded = self.store.get_job(message.job)
            if recorded is None:
                return None
            if recorded.source == WORKER_DEFAULT_SOURCE and self.settings.default_source:
                recorded = replace(recorded, source=self.settings.default_source)
            self._jobs[message.job] = recorded
        wanted = JobInfo(message.job, message.source)
        if recorded.model_name is not None:
            info = self.predictor.info
            wanted = replace(wanted, model_name=info.name, model_version=info.version)
        conflict = job_conflict(recorded, wanted)
        return None if conflict is None else str(conflict)

    def store_packs(self, packs: Sequence[PackResults]) -> list[PackOutcome | Exception]:
        """Store the rows of ``packs`` in one write; for each pack its outcome, or the
        exception that kept its rows out (its message must fail, so SQS delivers it again).

        One write for a batch's packs is one round trip and one commit where there were one
        per message (bench/store.py measures both). A transient failure (the database is
        unreachable) fails every pack, as it would have failed each alone. Any other failure
        may be one pack's doing, so each pack is then written alone, and only the packs that
        fail alone fail.
        """
        try:
            return list(self._store_together(packs))
        except TransientError as exc:
            return [exc] * len(packs)
        except Exception as exc:
            if len(packs) == 1:
                return [exc]
            log.warning("writing %d packs at once failed (%s): writing each alone", len(packs), exc)
            return [self._store_alone(pack) for pack in packs]

    def _store_alone(self, pack: PackResults) -> PackOutcome | Exception:
        try:
            (outcome,) = self._store_together([pack])
        except Exception as exc:  # this pack's message fails; the others go on
            return exc
        return outcome

    def _store_together(self, packs: Sequence[PackResults]) -> list[PackOutcome]:
        rows = [row for pack in packs for row in pack.results]
        start = time.perf_counter()
        self.store.write(rows)
        elapsed = time.perf_counter() - start
        # Each pack's share of the write by rows: the WriteSeconds sum stays the time written.
        outcomes = [pack.outcome(elapsed * len(pack.results) / max(1, len(rows))) for pack in packs]
        for outcome in outcomes:
            self._record(outcome)
        return outcomes

    def _reject(self, message_id: str, reason: str, body: str, job: str | None) -> None:
        log.warning("message %s rejected: %s", message_id, reason)
        rejection = Rejection(message_id, reason, body[:MAX_REJECTED_BODY], job)
        self.store.reject([rejection])
        self._add(names.METRIC_MESSAGES_REJECTED, "Count", 1)

    def _record(self, outcome: PackOutcome) -> None:
        self._add(names.METRIC_TILES_OK, "Count", outcome.ok)
        self._add(names.METRIC_TILES_EMPTY, "Count", outcome.empty)
        self._add(names.METRIC_TILES_ERROR, "Count", outcome.error)
        self._add(names.METRIC_READ_SECONDS, "Seconds", outcome.read_seconds)
        self._add(names.METRIC_PREDICT_SECONDS, "Seconds", outcome.predict_seconds)
        self._add(names.METRIC_WRITE_SECONDS, "Seconds", outcome.write_seconds)

    def _add(self, name: str, unit: str, value: float) -> None:
        if self._metrics is not None:
            self._metrics.add_metric(name=name, unit=unit, value=value)

    def _drop_predictor(self) -> None:
        predictor, self._predictor = self._predictor, None
        if predictor is not None:
            predictor.close()

    def close(self) -> None:
        """Release the connections (tests; a Lambda container just ends)."""
        self._ahead.close()
        self._drop_predictor()
        store, self._store = self._store, None
        if store is not None:
            store.close()
