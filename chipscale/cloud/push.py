"""Pushing tiles to the queue: chip-n-scale's ``sqs-push``, packed and batched, in bounded
memory. A push is checked (source, job), planned (:mod:`chipscale.cloud.push_plan`), packed
and sent ``concurrency`` batches at a time (:mod:`chipscale.cloud.push_send`); what it did is
a :class:`PushSummary`. Nothing here imports click or torch: the CLI wires it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from mercantile import Tile

from chipscale.cloud.push_plan import DEFAULT_CHUNK_TILES, PushPlan, plan_push
from chipscale.cloud.push_send import (
    DEFAULT_CONCURRENCY,
    BatchOutcome,
    BatchSender,
    Candidates,
    Entry,
    PushError,
    batch_entries,
    dry_send,
    pack_entries,
    sqs_client,
)
from chipscale.errors import InvalidMessageError
from chipscale.grid.packs import DEFAULT_MAX_TILES
from chipscale.pipeline.messages import check_job, check_source
from chipscale.retry import RetryPolicy

#: Distinct failure reasons kept for the report.
MAX_REASONS = 5

_TEMPLATE_FIELD = re.compile(r"\{([^{}]*)\}")
_XYZ_FIELDS = frozenset({"x", "y", "z"})
_QUEUE_URL_REGION = (
    re.compile(r"^https?://sqs[.-]([a-z]{2}(?:-[a-z]+)+-\d)\.amazonaws\.com", re.IGNORECASE),
    re.compile(r"^https?://([a-z]{2}(?:-[a-z]+)+-\d)\.queue\.amazonaws\.com", re.IGNORECASE),
)


class PushAborted(PushError):
    """A push stopped part-way by a :class:`PushError`; ``summary`` says what was sent."""

    def __init__(self, message: str, summary: PushSummary) -> None:
        super().__init__(message)
        self.summary = summary


def is_xyz_template(source: str) -> bool:
    """Whether a source is an XYZ tile endpoint (``https://host/{z}/{x}/{y}.jpg``), which has
    no footprint to cover: its tiles come from a tile list, an AOI or a bbox."""
    return "{" in source or "}" in source


def validate_job(job: str) -> str:
    """Return ``job`` if the workers can store it, else raise :class:`PushError` saying why
    (they would refuse every message of the push)."""
    return _message_text(job, "job", check_job)


def _message_text(value: str, field: str, check: Callable[[Any], str]) -> str:
    """``value`` checked as the workers check a message's ``field``, as a PushError."""
    if not value or not value.strip():
        raise PushError(f"{field} is empty")
    try:
        return check(value)
    except InvalidMessageError as exc:
        raise PushError(str(exc)) from None


def validate_source(source: str) -> str:
    """Return ``source`` if a worker can read it, else raise :class:`PushError` saying why.

    A COG is a path or URL; an XYZ endpoint must name ``{z}``, ``{x}`` and ``{y}`` and
    nothing else in braces, and be an http(s) URL. Checked here because a bad source would
    otherwise fail once per message, on the worker, for every message of the push.

    >>> validate_source("https://tiles.example/{z}/{x}/{y}.jpg")
    'https://tiles.example/{z}/{x}/{y}.jpg'
    """
    _message_text(source, "source", check_source)
    if not is_xyz_template(source):
        return source
    if _TEMPLATE_FIELD.sub("", source).count("{") or "}" in _TEMPLATE_FIELD.sub("", source):
        raise PushError(f"source {source!r} has unmatched braces")
    fields = set(_TEMPLATE_FIELD.findall(source))
    unknown = sorted(fields - _XYZ_FIELDS)
    missing = sorted(_XYZ_FIELDS - fields)
    if unknown or missing:
        wrong = [f"unknown {{{f}}}" for f in unknown] + [f"no {{{f}}}" for f in missing]
        raise PushError(
            f"source {source!r} is not an XYZ template ({', '.join(wrong)}): "
            "it must name {z}, {x} and {y}"
        )
    if not source.lower().startswith(("http://", "https://")):
        raise PushError(f"source {source!r}: an XYZ template must be an http(s) URL")
    return source


def region_from_queue_url(url: str) -> str | None:
    """The region an SQS queue URL names, so ``sqs-push tiles.txt URL`` needs no region set.

    >>> region_from_queue_url("https://sqs.eu-west-1.amazonaws.com/123456789012/tiles")
    'eu-west-1'
    >>> region_from_queue_url("http://127.0.0.1:5000/123456789012/tiles") is None
    True
    """
    for pattern in _QUEUE_URL_REGION:
        if match := pattern.match(url):
            return match.group(1).lower()
    return None


@dataclass(frozen=True, slots=True)
class PushSummary:
    """What a push did (or, with ``dry_run``, would do)."""

    job: str
    queue_url: str | None
    tiles_total: int  #: unique tiles given, including those a resume skipped
    skipped: int  #: tiles left out as already done
    tiles: int  #: tiles this push handled (sent or failed)
    tiles_sent: int
    messages: int
    messages_sent: int
    requests: int  #: SendMessageBatch calls, retries included
    bytes: int  #: message bodies, UTF-8
    seconds: float
    failed_tiles: int = 0
    failed_messages: int = 0
    failure_reasons: tuple[str, ...] = ()
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return self.failed_tiles == 0

    @property
    def requests_per_1000_tiles(self) -> float:
        """The figure to compare with chip-n-scale, which made 1,000."""
        return 1000.0 * self.requests / self.tiles if self.tiles else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["failure_reasons"] = list(self.failure_reasons)
        out["requests_per_1000_tiles"] = round(self.requests_per_1000_tiles, 3)
        out["seconds"] = round(self.seconds, 3)
        return out


@dataclass
class _Tally:
    tiles: int = 0
    tiles_sent: int = 0
    messages: int = 0
    messages_sent: int = 0
    requests: int = 0
    bytes: int = 0
    failed_tiles: int = 0
    failed_messages: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, outcome: BatchOutcome) -> None:
        self.requests += outcome.requests
        for entry in outcome.sent:
            self.messages_sent += 1
            self.tiles_sent += entry.tiles
        for entry, reason in outcome.failed:
            self.failed_messages += 1
            self.failed_tiles += entry.tiles
            if len(self.reasons) < MAX_REASONS and reason not in self.reasons:
                self.reasons.append(reason)
        entries = len(outcome.sent) + len(outcome.failed)
        self.messages += entries
        self.tiles += outcome.tiles
        self.bytes += sum(e.size for e in outcome.sent) + sum(e.size for e, _ in outcome.failed)


def run_push(
    plan: PushPlan,
    *,
    job: str,
    source: str | None,
    sender: BatchSender | None,
    max_tiles_per_message: int = DEFAULT_MAX_TILES,
    concurrency: int = DEFAULT_CONCURRENCY,
    on_progress: Callable[[int], None] | None = None,
    candidates: Candidates | None = None,
) -> PushSummary:
    """Pack, batch and send the plan's tiles; ``sender=None`` is a dry run (no AWS at all),
    packed the same way, so its counts are the push's. ``candidates``: a mosaic pack's
    candidate assets, which its message carries.

    Raises :class:`PushAborted` (with the summary so far) when a batch meets an error that
    no retry fixes; entries that failed for good are counted in the summary, not raised.
    """
    started = time.monotonic()
    tally = _Tally()
    entries = pack_entries(
        plan.tiles(),
        job=job,
        source=source,
        max_tiles=max_tiles_per_message,
        candidates=candidates,
    )
    batches = batch_entries(entries)
    progress = on_progress or (lambda _tiles: None)

    def summary() -> PushSummary:
        return PushSummary(
            job=job,
            queue_url=None if sender is None else sender.queue_url,
            tiles_total=plan.total,
            skipped=plan.skipped,
            tiles=tally.tiles,
            tiles_sent=tally.tiles_sent,
            messages=tally.messages,
            messages_sent=tally.messages_sent,
            requests=tally.requests,
            bytes=tally.bytes,
            seconds=time.monotonic() - started,
            failed_tiles=tally.failed_tiles,
            failed_messages=tally.failed_messages,
            failure_reasons=tuple(tally.reasons),
            dry_run=sender is None,
        )

    if sender is None:
        for batch in batches:
            outcome = dry_send(batch)
            tally.add(outcome)
            progress(outcome.tiles)
        return summary()
    error = _send_all(batches, sender, concurrency, tally, progress)
    if error is not None:
        done = summary()
        raise PushAborted(f"{error} ({done.tiles_sent} tiles were sent before)", done)
    return summary()


def _send_all(
    batches: Iterator[tuple[Entry, ...]],
    sender: BatchSender,
    concurrency: int,
    tally: _Tally,
    progress: Callable[[int], None],
) -> PushError | None:
    """Keep ``concurrency`` batches in flight; on a fatal error stop submitting, let the
    batches in flight finish (their outcome counts), and return the error."""
    in_flight: set[Future[BatchOutcome]] = set()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="sqs-push") as pool:
        for batch in batches:
            if len(in_flight) >= concurrency:
                finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                error = _collect(finished, tally, progress)
                if error is not None:
                    _collect(wait(in_flight).done, tally, progress)
                    return error
            in_flight.add(pool.submit(sender.send, batch))
        return _collect(wait(in_flight).done, tally, progress)


def _collect(
    futures: Iterable[Future[BatchOutcome]], tally: _Tally, progress: Callable[[int], None]
) -> PushError | None:
    error: PushError | None = None
    for future in futures:
        try:
            outcome = future.result()
        except PushError as exc:
            error = error or exc
            continue
        tally.add(outcome)
        progress(outcome.tiles)
    return error


def push(
    tiles: Iterable[Tile],
    *,
    job: str,
    source: str | None,
    queue_url: str | None = None,
    client: Any = None,
    max_tiles_per_message: int = DEFAULT_MAX_TILES,
    concurrency: int = DEFAULT_CONCURRENCY,
    done: Collection[Tile] = (),
    zoom: int | None = None,
    chunk_tiles: int = DEFAULT_CHUNK_TILES,
    dry_run: bool = False,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_progress: Callable[[int], None] | None = None,
) -> PushSummary:
    """Plan and run a push in one call (the CLI runs the two steps itself, to record the
    job in between). ``client`` defaults to :func:`sqs_client`; a dry run makes none."""
    if source is not None:
        validate_source(source)
    with plan_push(tiles, zoom=zoom, chunk_tiles=chunk_tiles) as plan:
        if done:
            plan.skip_done(done)
        sender = None
        if not dry_run:
            if queue_url is None:
                raise PushError("no queue URL to push to")
            client = client or sqs_client(
                region=region_from_queue_url(queue_url), concurrency=concurrency
            )
            sender = BatchSender(client, queue_url, policy=policy, sleep=sleep)
        return run_push(
            plan,
            job=job,
            source=source,
            sender=sender,
            max_tiles_per_message=max_tiles_per_message,
            concurrency=concurrency,
            on_progress=on_progress,
        )
