"""Pushing tiles to the queue: chip-n-scale's ``sqs-push``, packed and batched.

chip-n-scale sent one message, and so one SQS request, per tile. chipscale packs adjacent
tiles into v1 messages (:func:`chipscale.grid.packs.pack_tiles`, up to ``max_tiles_per_message``)
and sends ten messages per ``SendMessageBatch``. With the default 100, the inside of an area
packs 64 tiles a message (one parent three zooms up), so a request carries about 640 tiles:
about 1.6 requests per 1,000 tiles instead of chip-n-scale's 1,000.

The pipeline, in bounded memory whatever the number of tiles::

    tiles (a tile list in any order, or a cover)
      -> plan_push: every tile becomes one 8-byte key; keys are sorted in runs of
         ``chunk_tiles`` (spilled to temporary files beyond the first run) and merged, so
         duplicates go and the order is quadkey order, which packs stream from. The whole
         input is read (and every line validated) before the first message is sent, so a
         bad line halfway down a list sends nothing, and the totals are known up front.
      -> skip_done (resume): tiles the results store has as done are filtered per block
      -> pack_tiles(presorted=True) -> message bodies -> batches (10 entries, 256 KiB)
      -> ``concurrency`` batches in flight, on threads sharing one boto3 client (boto3
         clients are thread-safe), failed entries retried with backoff and jitter.

Nothing here imports click or torch: the CLI (``chipscale push``, ``sqs-push``) wires it.
"""

from __future__ import annotations

import heapq
import json
import random
import re
import shutil
import tempfile
import time
from array import array
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from mercantile import Tile

from chipscale.errors import ChipscaleError, InvalidMessageError, TileListError, one_line
from chipscale.grid.packs import DEFAULT_MAX_TILES, pack_tiles
from chipscale.pipeline.messages import (
    SCHEMA_VERSION,
    PackMessage,
    check_job,
    check_source,
)
from chipscale.results.base import ResultStore, utc_now
from chipscale.values import JobInfo

#: SendMessageBatch takes at most ten entries.
MAX_BATCH_ENTRIES = 10
#: Payload limit of one message and of one SendMessageBatch: SQS now takes 1 MiB, but 256 KiB
#: is what older endpoints (and the documentation most users read) enforce: stay under both.
MAX_BATCH_BYTES = 256 * 1024
#: Largest pack the CLI accepts: a 32 x 32 tile window is already a heavy read for a worker.
MAX_TILES_PER_MESSAGE = 1024
#: Default batches in flight (chip-n-scale's PROMISE_THRESHOLD played the same role).
DEFAULT_CONCURRENCY = 8
#: Tiles sorted in memory at once; beyond that, sorted runs go to temporary files
#: (8 bytes a tile) and are merged. A million keys is 8 MB.
DEFAULT_CHUNK_TILES = 1_000_000
#: Keys decoded into tiles at a time while streaming.
BLOCK_KEYS = 65_536
#: Recorded as a job's source when the messages carry none (the worker's default is used).
WORKER_DEFAULT_SOURCE = "(worker default source)"
#: Distinct failure reasons kept for the report.
MAX_REASONS = 5

_TEMPLATE_FIELD = re.compile(r"\{([^{}]*)\}")
_XYZ_FIELDS = frozenset({"x", "y", "z"})
_QUEUE_URL_REGION = (
    re.compile(r"^https?://sqs[.-]([a-z]{2}(?:-[a-z]+)+-\d)\.amazonaws\.com", re.IGNORECASE),
    re.compile(r"^https?://([a-z]{2}(?:-[a-z]+)+-\d)\.queue\.amazonaws\.com", re.IGNORECASE),
)
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


class PushAborted(PushError):
    """A push stopped part-way by a :class:`PushError`; ``summary`` says what was sent."""

    def __init__(self, message: str, summary: PushSummary) -> None:
        super().__init__(message)
        self.summary = summary


# ----------------------------------------------------------------------------- sources


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


# ----------------------------------------------------------------------------- tile keys
# A tile is one uint64: (1 << 2z) | morton(x, y), with y's bit above x's at each level (the
# quadkey digit 2*y + x). Keys of one zoom fill [4**z, 2 * 4**z), so sorting keys sorts by
# zoom and then quadkey: the order in which the tiles of a pack lie together. 2z + 1 <= 61
# bits up to zoom 30.

_SPREAD = (
    (16, 0x0000FFFF0000FFFF),
    (8, 0x00FF00FF00FF00FF),
    (4, 0x0F0F0F0F0F0F0F0F),
    (2, 0x3333333333333333),
    (1, 0x5555555555555555),
)
_COMPACT = (
    (1, 0x3333333333333333),
    (2, 0x0F0F0F0F0F0F0F0F),
    (4, 0x00FF00FF00FF00FF),
    (8, 0x0000FFFF0000FFFF),
    (16, 0x00000000FFFFFFFF),
)


def _spread_bits(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.uint64)
    for shift, mask in _SPREAD:
        v = (v | (v << np.uint64(shift))) & np.uint64(mask)
    return v


def _compact_bits(values: np.ndarray) -> np.ndarray:
    v = values & np.uint64(0x5555555555555555)
    for shift, mask in _COMPACT:
        v = (v | (v >> np.uint64(shift))) & np.uint64(mask)
    return v


def encode_tiles(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Sortable uint64 keys of tiles given as arrays of x, y and z.

    >>> encode_tiles(np.array([1]), np.array([2]), np.array([3])).tolist()
    [73]
    """
    zoom_bit = np.left_shift(np.uint64(1), np.asarray(z).astype(np.uint64) * np.uint64(2))
    return zoom_bit | _spread_bits(np.asarray(x)) | (_spread_bits(np.asarray(y)) << np.uint64(1))


def decode_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, y and z arrays of keys made by :func:`encode_tiles`."""
    keys = np.asarray(keys, dtype=np.uint64)
    # float64 rounds a key near 2 * 4**z up to 2 * 4**z at worst: still zoom z, never z + 1.
    z = (np.floor(np.log2(keys.astype(np.float64))).astype(np.int64) // 2).astype(np.uint64)
    morton = keys ^ np.left_shift(np.uint64(1), z * np.uint64(2))
    return _compact_bits(morton), _compact_bits(morton >> np.uint64(1)), z


def tiles_to_keys(tiles: Iterable[Tile]) -> np.ndarray:
    """Sorted unique keys of a collection of tiles (e.g. the done tiles of a resume)."""
    x, y, z = array("I"), array("I"), array("B")
    for tile in tiles:
        x.append(tile.x)
        y.append(tile.y)
        z.append(tile.z)
    if not x:
        return np.empty(0, dtype=np.uint64)
    keys = encode_tiles(
        np.frombuffer(x, np.uint32), np.frombuffer(y, np.uint32), np.frombuffer(z, np.uint8)
    )
    return _sorted_unique(keys)


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    """Sort ``keys`` in place and return them without repeats.

    Not ``np.unique``: in numpy 2.4 it peaks at about six times the input's size (50 MB for
    a million keys), where an in-place sort and a mask cost one byte a key more.
    """
    keys.sort()
    if len(keys) < 2:
        return keys
    keep = np.empty(len(keys), dtype=bool)
    keep[0] = True
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    return keys if keep.all() else keys[keep]


def keys_to_tiles(keys: np.ndarray) -> Iterator[Tile]:
    """The tiles of a block of keys, in key order."""
    x, y, z = decode_keys(keys)
    return map(Tile, x.tolist(), y.tolist(), z.tolist())


# ----------------------------------------------------------------------------- planning


@dataclass
class PushPlan:
    """The unique tiles of a push as sorted keys, in memory or in one temporary file.

    ``total`` counts every unique tile given; ``skipped`` those a resume leaves out (see
    :meth:`skip_done`); ``todo`` the rest, which :meth:`tiles` yields in pack order. Close it
    (or use it as a context manager) to remove its temporary files.
    """

    total: int
    zooms: frozenset[int]
    _keys: np.ndarray | None = None
    _path: Path | None = None
    _workdir: Path | None = None
    _done: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    skipped: int = 0

    @property
    def todo(self) -> int:
        return self.total - self.skipped

    @property
    def zoom(self) -> int | None:
        """The zoom of every tile, or None for an empty or mixed-zoom push."""
        return next(iter(self.zooms)) if len(self.zooms) == 1 else None

    def blocks(self, size: int = BLOCK_KEYS) -> Iterator[np.ndarray]:
        """Every key, sorted, ``size`` at a time (read from disk when spilled)."""
        if self._keys is not None:
            for start in range(0, len(self._keys), size):
                yield self._keys[start : start + size]
            return
        if self._path is None:
            return
        with self._path.open("rb") as handle:
            while len(block := np.fromfile(handle, dtype=np.uint64, count=size)):
                yield block

    def skip_done(self, done: Collection[Tile]) -> int:
        """Leave out the tiles a results store has as done; returns how many of ours those are.

        The store's set is turned into sorted keys (8 bytes a tile) and filtered against per
        block, so a large done set costs one pass, not a lookup per tile in Python.
        """
        self._done = tiles_to_keys(done)
        self.skipped = 0
        if len(self._done):
            for block in self.blocks():
                self.skipped += int(_member(block, self._done).sum())
        return self.skipped

    def tiles(self) -> Iterator[Tile]:
        """The tiles to push, sorted by zoom then quadkey: what packs stream from."""
        for block in self.blocks():
            if len(self._done):
                block = block[~_member(block, self._done)]
            yield from keys_to_tiles(block)

    def close(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> PushPlan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Which of ``keys`` are in ``sorted_keys``: a binary search each, so a block costs
    O(block log done), not a sort of the whole done set as ``np.isin`` does."""
    at = np.searchsorted(sorted_keys, keys)
    at[at == len(sorted_keys)] = 0
    return sorted_keys[at] == keys


class _RunWriter:
    """Collects tiles and turns each ``chunk_tiles`` of them into a sorted, deduplicated run
    of keys (kept in memory until a second run spills both to files).

    Tiles are encoded ``BLOCK_KEYS`` at a time into one growing array of 8-byte keys, so the
    numpy temporaries of the encoding stay small whatever the chunk size.
    """

    def __init__(self, chunk_tiles: int, workdir: str | Path | None) -> None:
        self.chunk_tiles = max(1, chunk_tiles)
        self._parent = workdir
        self.workdir: Path | None = None
        self.runs: list[Path] = []
        self.first: np.ndarray | None = None
        self.zooms: set[int] = set()
        self._keys = array("Q")
        self._reset_block()

    def _reset_block(self) -> None:
        self.x, self.y, self.z = array("I"), array("I"), array("B")

    def add(self, tile: Tile) -> None:
        self.x.append(tile.x)
        self.y.append(tile.y)
        self.z.append(tile.z)
        if len(self.x) >= BLOCK_KEYS or len(self._keys) + len(self.x) >= self.chunk_tiles:
            self._encode_block()
            if len(self._keys) >= self.chunk_tiles:
                self.flush()

    def _encode_block(self) -> None:
        if not self.x:
            return
        z = np.frombuffer(self.z, np.uint8)
        self.zooms.update(np.flatnonzero(np.bincount(z)).tolist())
        keys = encode_tiles(np.frombuffer(self.x, np.uint32), np.frombuffer(self.y, np.uint32), z)
        self._keys.frombytes(keys.tobytes())
        self._reset_block()

    def flush(self) -> None:
        self._encode_block()
        if not self._keys:
            return
        keys = _sorted_unique(np.array(self._keys, dtype=np.uint64))
        self._keys = array("Q")
        if self.first is None and not self.runs:
            self.first = keys
            return
        if self.first is not None:
            self._spill(self.first)
            self.first = None
        self._spill(keys)

    def _spill(self, keys: np.ndarray) -> None:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="chipscale-push-", dir=self._parent))
        path = self.workdir / f"run-{len(self.runs):05d}.u64"
        keys.tofile(path)
        self.runs.append(path)


def plan_push(
    tiles: Iterable[Tile],
    *,
    zoom: int | None = None,
    chunk_tiles: int = DEFAULT_CHUNK_TILES,
    workdir: str | Path | None = None,
    name: str = "tiles",
) -> PushPlan:
    """Read every tile, check its zoom, and sort the unique ones into pack order.

    Memory stays bounded by ``chunk_tiles`` (about 24 bytes a tile while a chunk is sorted);
    larger inputs are sorted in runs on disk and merged. A tile at another zoom than
    ``zoom`` (when given) is an error naming ``name``, raised before anything is sent.
    """
    runs = _RunWriter(chunk_tiles, workdir)
    try:
        for tile in tiles:
            if zoom is not None and tile.z != zoom:
                raise TileListError(
                    f"{name}: tile {tile.z}/{tile.x}/{tile.y} is at zoom {tile.z}, not {zoom}"
                )
            runs.add(tile)
        runs.flush()
        zooms = frozenset(runs.zooms)
        if runs.first is not None or not runs.runs:
            keys = runs.first if runs.first is not None else np.empty(0, dtype=np.uint64)
            return PushPlan(total=len(keys), zooms=zooms, _keys=keys)
        assert runs.workdir is not None
        merged = runs.workdir / "tiles.u64"
        total = (
            _merge_runs(runs.runs, merged) if len(runs.runs) > 1 else _adopt(runs.runs[0], merged)
        )
        return PushPlan(total=total, zooms=zooms, _path=merged, _workdir=runs.workdir)
    except BaseException:
        if runs.workdir is not None:
            shutil.rmtree(runs.workdir, ignore_errors=True)
        raise


def _adopt(run: Path, out: Path) -> int:
    run.rename(out)
    return out.stat().st_size // 8


def _iter_run(path: Path) -> Iterator[int]:
    with path.open("rb") as handle:
        while len(block := np.fromfile(handle, dtype=np.uint64, count=BLOCK_KEYS)):
            yield from block.tolist()


def _merge_runs(runs: Sequence[Path], out: Path) -> int:
    """Merge sorted runs into one sorted file without duplicates; returns the key count."""
    count = 0
    last = -1
    buffer: list[int] = []
    with out.open("wb") as handle:
        for key in heapq.merge(*(_iter_run(path) for path in runs)):
            if key == last:
                continue
            last = key
            buffer.append(key)
            if len(buffer) >= BLOCK_KEYS:
                np.array(buffer, dtype=np.uint64).tofile(handle)
                count += len(buffer)
                buffer.clear()
        np.array(buffer, dtype=np.uint64).tofile(handle)
        count += len(buffer)
    for path in runs:
        path.unlink()
    return count


# ----------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Entry:
    """One message to send: its JSON body, the tiles it carries and its size in bytes."""

    body: str
    tiles: int
    size: int


def message_body(job: str, source: str | None, tiles: Sequence[Tile]) -> str:
    """The v1 JSON body of a pack. Without a source the ``source`` key is left out, so the
    worker uses its configured default (chip-n-scale's way: the imagery is the stack's)."""
    if source is not None:
        return PackMessage(job=job, source=source, tiles=tuple(tiles)).to_json()
    body = {"v": SCHEMA_VERSION, "job": job, "tiles": [[t.x, t.y, t.z] for t in tiles]}
    return json.dumps(body, separators=(",", ":"))


def pack_entries(
    tiles: Iterable[Tile], *, job: str, source: str | None, max_tiles: int = DEFAULT_MAX_TILES
) -> Iterator[Entry]:
    """Sorted tiles as message entries, one pack each (see
    :func:`chipscale.grid.packs.pack_tiles`)."""
    for pack in pack_tiles(tiles, max_tiles, presorted=True):
        body = message_body(job, source, pack)
        size = len(body.encode("utf-8"))
        if size > MAX_BATCH_BYTES:
            raise PushError(
                f"a message of {len(pack)} tiles is {size:,} bytes, over SQS's "
                f"{MAX_BATCH_BYTES:,}-byte limit: lower --max-tiles-per-message"
            )
        yield Entry(body=body, tiles=len(pack), size=size)


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


# ----------------------------------------------------------------------------- sending


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter (AWS's advice for many clients at once):
    try ``n`` waits a random time in ``[0, min(max_delay, base_delay * 2**(n-1))]``."""

    max_attempts: int = 8
    base_delay: float = 0.1
    max_delay: float = 10.0

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        return rng.uniform(0.0, min(self.max_delay, self.base_delay * 2 ** (retry - 1)))


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
        self.policy = policy or RetryPolicy()
        self.sleep = sleep
        self.rng = rng or random.Random()

    def send(self, batch: Sequence[Entry]) -> BatchOutcome:
        pending = {str(i): entry for i, entry in enumerate(batch)}
        sent: list[Entry] = []
        failed: list[tuple[Entry, str]] = []
        reason = ""
        requests = 0
        for attempt in range(self.policy.max_attempts):
            if attempt:
                self.sleep(self.policy.delay(attempt, self.rng))
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
            from chipscale.ops.stack_outputs import CREDENTIALS_HELP

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

    from chipscale.ops.stack_outputs import aws_session

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


# ----------------------------------------------------------------------------- the push


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
) -> PushSummary:
    """Pack, batch and send the plan's tiles; ``sender=None`` is a dry run (no AWS at all).

    Raises :class:`PushAborted` (with the summary so far) when a batch meets an error that
    no retry fixes; entries that failed for good are counted in the summary, not raised.
    """
    started = time.monotonic()
    tally = _Tally()
    entries = pack_entries(plan.tiles(), job=job, source=source, max_tiles=max_tiles_per_message)
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


# ----------------------------------------------------------------------------- the job record


def record_job(
    store: ResultStore,
    *,
    job: str,
    source: str | None,
    zoom: int | None,
    tiles_total: int,
    extra: dict[str, Any],
) -> JobInfo:
    """Record a pushed job in the results store, keeping what an earlier record knows.

    The model fields (name, version, classes) are the worker's to fill, so an existing
    record's are kept, as are its other ``extra`` keys. ``tiles_total`` is every tile of the
    job, those a resume skipped included, so ``chipscale status`` counts what remains. A
    job recorded with another source (messages without one read the worker's default:
    :data:`WORKER_DEFAULT_SOURCE`) is refused with :class:`~chipscale.errors.JobConflict`.

    This is the hook for ``--stack`` pushes too: there the database sits inside the VPC, and
    the operations Lambda will call this with the same arguments.
    """
    existing = store.get_job(job)
    if existing is None:
        info = JobInfo(
            job=job,
            source=source or WORKER_DEFAULT_SOURCE,
            zoom=zoom,
            tiles_total=tiles_total,
            extra=dict(extra),
        )
    else:
        info = replace(
            existing,
            source=source or WORKER_DEFAULT_SOURCE,
            zoom=zoom if zoom is not None else existing.zoom,
            tiles_total=tiles_total,
            extra={**existing.extra, **extra},
        )
    store.start_job(info)
    return info


class StoreJobs:
    """Job records in a results store reached directly (``--db``): the same two calls that
    :class:`chipscale.ops.operations.StackOperations` makes through a stack's operations Lambda
    (``--stack``), so a push records and resumes its job the same way in both."""

    def __init__(self, url: str) -> None:
        self.url = url

    def record_job(self, **fields: Any) -> None:
        from chipscale.results import open_store

        with open_store(self.url) as store:
            record_job(store, **fields)

    def done_tiles(self, job: str) -> set[Tile]:
        from chipscale.results import open_store

        # A resume reads: a mistyped store is an error, not an empty one (all pushed again).
        with open_store(self.url, create=False) as store:
            return store.done_tiles(job)


def push_record(summary: PushSummary | None, **details: Any) -> dict[str, Any]:
    """The ``extra`` a push writes on its job: ``pushed`` (tiles queued by the last push)
    and ``push`` (when, where, how, and its state: sending, done, failed or aborted; a
    ``state`` in ``details`` wins)."""
    state = details.pop("state", None)
    push_info: dict[str, Any] = {"at": utc_now(), **details}
    if summary is None:
        return {"pushed": 0, "push": {**push_info, "state": state or "sending"}}
    push_info.update(
        state=state or ("done" if summary.ok else "failed"),
        skipped=summary.skipped,
        messages=summary.messages_sent,
        requests=summary.requests,
        failed_tiles=summary.failed_tiles,
    )
    return {"pushed": summary.tiles_sent, "push": push_info}
