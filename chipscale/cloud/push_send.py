"""Sending a push: tiles packed into v1 message bodies, bodies grouped into SendMessageBatch
calls (10 entries, 256 KiB), and one batch sent with retries (full-jitter backoff, see
:mod:`chipscale.retry`) of the entries and calls a later try may get through."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from mercantile import Tile

from chipscale.errors import ChipscaleError, one_line
from chipscale.grid.packs import DEFAULT_MAX_TILES, pack_tiles
from chipscale.pipeline.messages import SCHEMA_VERSION, AssetRef, PackMessage
from chipscale.retry import Backoff, RetryPolicy

#: Default batches in flight (chip-n-scale's PROMISE_THRESHOLD played the same role).
DEFAULT_CONCURRENCY = 8

#: SendMessageBatch takes at most ten entries.
MAX_BATCH_ENTRIES = 10
#: Payload limit of one message and of one SendMessageBatch: SQS now takes 1 MiB, but 256 KiB
#: is what older endpoints (and the documentation most users read) enforce: stay under both.
MAX_BATCH_BYTES = 256 * 1024
#: How a batch is retried: 8 tries, waits up to 0.1, 0.2, 0.4 ... 10 s.
SEND_RETRY_POLICY: Final = RetryPolicy(max_attempts=8, base_delay=0.1, max_delay=10.0)
#: Error codes of a whole SendMessageBatch call that a later try may get through.
_RETRYABLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "AWS.SimpleQueueService.RequestThrottled",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "SlowDown",
        "ServiceUnavailable",
        "AWS.SimpleQueueService.ServiceUnavailable",
        "InternalError",
        "InternalFailure",
        "RequestTimeout",
        "RequestTimeoutException",
        "KmsThrottled",
    }
)


class PushError(ChipscaleError):
    """A push cannot go on (no such queue, no credentials, access denied): every batch would
    fail the same way, so it stops at once."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One message to send: its JSON body, the tiles it carries and its size in bytes."""

    body: str
    tiles: int
    size: int


#: A mosaic pack's candidate assets, in priority order (what its message carries).
Candidates = Callable[[tuple[Tile, ...]], tuple[AssetRef, ...]]


def message_body(
    job: str, source: str | None, tiles: Sequence[Tile], assets: Sequence[AssetRef] = ()
) -> str:
    """The v1 JSON body of a pack. Without a source the ``source`` key is left out, so the
    worker uses its configured default (chip-n-scale's way: the imagery is the stack's).
    A mosaic pack carries its candidate ``assets``."""
    if source is not None:
        message = PackMessage(job=job, source=source, tiles=tuple(tiles), assets=tuple(assets))
        return message.to_json()
    body = {"v": SCHEMA_VERSION, "job": job, "tiles": [[t.x, t.y, t.z] for t in tiles]}
    return json.dumps(body, separators=(",", ":"))


def pack_entries(
    tiles: Iterable[Tile],
    *,
    job: str,
    source: str | None,
    max_tiles: int = DEFAULT_MAX_TILES,
    candidates: Candidates | None = None,
) -> Iterator[Entry]:
    """Sorted tiles as message entries, one pack each (see
    :func:`chipscale.grid.packs.pack_tiles`). A mosaic pack carries its ``candidates``; one
    whose message would pass SQS's limit is split in halves (in tile order, so each half
    stays together) until it fits."""
    for pack in pack_tiles(tiles, max_tiles, presorted=True):
        yield from _entries(tuple(pack), job, source, candidates)


def _entries(
    pack: tuple[Tile, ...], job: str, source: str | None, candidates: Candidates | None
) -> Iterator[Entry]:
    assets = candidates(pack) if candidates is not None else ()
    body = message_body(job, source, pack, assets)
    size = len(body.encode("utf-8"))
    if size <= MAX_BATCH_BYTES:
        yield Entry(body=body, tiles=len(pack), size=size)
        return
    if assets and len(pack) > 1:
        half = len(pack) // 2
        yield from _entries(pack[:half], job, source, candidates)
        yield from _entries(pack[half:], job, source, candidates)
        return
    if assets:
        tile = pack[0]
        raise PushError(
            f"tile {tile.z}/{tile.x}/{tile.y} has {len(assets):,} candidate assets, a "
            f"{size:,}-byte message, over SQS's {MAX_BATCH_BYTES:,}-byte limit: use a higher "
            "zoom or fewer assets (--max-items, --aoi)"
        )
    raise PushError(
        f"a message of {len(pack)} tiles is {size:,} bytes, over SQS's "
        f"{MAX_BATCH_BYTES:,}-byte limit: lower --max-tiles-per-message"
    )


def batch_entries(
    entries: Iterable[Entry],
    *,
    max_entries: int = MAX_BATCH_ENTRIES,
    max_bytes: int = MAX_BATCH_BYTES,
) -> Iterator[tuple[Entry, ...]]:
    """Group entries into SendMessageBatch calls: at most ``max_entries`` and ``max_bytes``."""
    batch: list[Entry] = []
    size = 0
    for entry in entries:
        if batch and (len(batch) >= max_entries or size + entry.size > max_bytes):
            yield tuple(batch)
            batch, size = [], 0
        batch.append(entry)
        size += entry.size
    if batch:
        yield tuple(batch)


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What became of one batch: entries delivered, entries given up on with a reason each."""

    sent: tuple[Entry, ...]
    failed: tuple[tuple[Entry, str], ...] = ()
    requests: int = 1

    @property
    def tiles(self) -> int:
        return sum(e.tiles for e in self.sent) + sum(e.tiles for e, _ in self.failed)


class BatchSender:
    """Sends one batch with SendMessageBatch, retrying what a later try may get through.

    Retried: entries in ``Failed`` without ``SenderFault`` (SQS's own trouble), and whole
    calls that failed with throttling, a 5xx or a broken connection. Not retried: entries
    with ``SenderFault`` (the message itself is wrong). A whole call refused for a reason no
    retry fixes (no such queue, access denied, no credentials) raises :class:`PushError`.
    Entry ids are the entries' positions in the batch, so they are unique within it and
    stay the same across retries. A call retried after a timeout may have been queued the
    first time: SQS standard queues deliver at least once anyway, and the worker's upserts
    make a repeated tile harmless. ``sleep`` and ``rng`` are injectable for tests.
    """

    def __init__(
        self,
        client: Any,
        queue_url: str,
        *,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.queue_url = queue_url
        self.policy = policy or SEND_RETRY_POLICY
        self.sleep = sleep
        self._backoff = Backoff(self.policy, rng)  # shared by the push's sending threads

    def send(self, batch: Sequence[Entry]) -> BatchOutcome:
        pending = {str(i): entry for i, entry in enumerate(batch)}
        sent: list[Entry] = []
        failed: list[tuple[Entry, str]] = []
        reason = ""
        requests = 0
        for attempt in range(self.policy.max_attempts):
            if attempt:
                self.sleep(self._backoff.delay(attempt))
            requests += 1
            try:
                response = self._call(pending)
            except _Retry as exc:
                reason = str(exc)
                continue
            retry: dict[str, Entry] = {}
            for item in response.get("Successful", []):
                if (entry := pending.pop(str(item.get("Id")), None)) is not None:
                    sent.append(entry)
            for item in response.get("Failed", []):
                entry = pending.pop(str(item.get("Id")), None)
                if entry is None:
                    continue
                why = f"{item.get('Code', 'Failed')}: {item.get('Message', '')}".rstrip(": ")
                if item.get("SenderFault"):
                    failed.append((entry, why))
                else:
                    retry[str(item["Id"])] = entry
                    reason = why
            retry.update(pending)  # in neither list: not known to be queued, so send again
            pending = retry
            if not pending:
                break
        gave_up = f"{reason} (gave up after {requests} tries)"
        failed.extend((entry, gave_up) for entry in pending.values())
        return BatchOutcome(sent=tuple(sent), failed=tuple(failed), requests=requests)

    def _call(self, pending: dict[str, Entry]) -> dict[str, Any]:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        entries = [{"Id": key, "MessageBody": entry.body} for key, entry in pending.items()]
        try:
            return self.client.send_message_batch(QueueUrl=self.queue_url, Entries=entries)
        except ClientError as exc:
            if _retryable(exc):
                raise _Retry(one_line(exc)) from exc
            raise PushError(f"SQS refused the batch for {self.queue_url}: {one_line(exc)}") from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            from chipscale.cloud.aws_session import CREDENTIALS_HELP

            raise PushError(
                f"no usable AWS credentials to send to SQS: {CREDENTIALS_HELP}"
            ) from exc
        except (ConnectionError, HTTPClientError) as exc:
            raise _Retry(one_line(exc)) from exc
        except BotoCoreError as exc:
            raise PushError(f"cannot send to {self.queue_url}: {one_line(exc)}") from exc


class _Retry(Exception):
    """A whole SendMessageBatch call failed in a way a later try may not."""


def _retryable(exc: Any) -> bool:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return error.get("Code") in _RETRYABLE_CODES or status == 429 or status >= 500


def dry_send(batch: Sequence[Entry]) -> BatchOutcome:
    """What ``--dry-run`` does with a batch: count it as one request, send nothing."""
    return BatchOutcome(sent=tuple(batch))


def sqs_client(
    *, region: str | None = None, endpoint_url: str | None = None, concurrency: int = 8
) -> Any:
    """One boto3 SQS client for every sending thread, its connection pool sized to them.

    botocore's own retries are off: :class:`BatchSender` retries, so each try is counted
    and failed entries, which botocore would not retry, get the same treatment.
    ``endpoint_url`` None leaves boto3 to read ``AWS_ENDPOINT_URL`` (moto, localstack).
    """
    from botocore.config import Config
    from botocore.exceptions import NoRegionError

    from chipscale.cloud.aws_session import aws_session

    config = Config(
        max_pool_connections=max(10, concurrency),
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=10,
        read_timeout=60,
    )
    try:
        return aws_session(region).client("sqs", endpoint_url=endpoint_url, config=config)
    except NoRegionError:
        raise PushError(
            "no AWS region for SQS: pass --region, set AWS_REGION, or give a queue URL "
            "that names its region (https://sqs.REGION.amazonaws.com/...)"
        ) from None
