"""The ResultStore port: what the worker, the runner and the exporters need from a results
database, and the helpers every adapter shares (status values, timestamps, JSON encoding).

Adapters: :mod:`chipscale.results.sqlite` (the embedded default) and
:mod:`chipscale.results.postgres` (RDS PostgreSQL in the cloud, any ``postgresql://`` URL).
Every adapter keeps one row per ``(job, z, x, y)`` and writes with idempotent upserts, so a
tile delivered twice is stored once, with ``attempts`` counting the writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, Self, runtime_checkable

import orjson
from mercantile import Tile

from chipscale.errors import JobConflict, StoreError
from chipscale.values import FeatureRow, JobInfo, Rejection, ResultRow, TileResult

#: A block of tiles of one zoom, inclusive on every side: ``(z, xmin, ymin, xmax, ymax)``.
TileWindow = tuple[int, int, int, int, int]

#: The values of ``results.status``, in the order counts and legends show them.
STATUSES: tuple[str, ...] = ("ok", "empty", "error")

#: Statuses that count as done for resume: ``error`` tiles are tried again.
DONE_STATUSES: tuple[str, ...] = ("ok", "empty")


@runtime_checkable
class ResultStore(Protocol):
    """Where results go: one row per ``(job, z, x, y)``, written by idempotent upserts.

    ``write`` may be called from several threads at once; each call is one transaction, so a
    crash leaves either all of a call's rows or none. ``iter_results`` streams (constant
    memory) in ``(job, z, x, y)`` order.
    """

    url: str

    def start_job(self, job: JobInfo) -> None:
        """Record a new job, or update a recorded one of the same source and model in place
        (its ``created_at`` is kept); :class:`JobConflict` for another source or model.

        The check and the write are one atomic step, so of two writers creating one job at
        once, one wins. A job without ``model_name`` keeps the recorded model and classes
        (push records jobs the workers score); a recorded job without one takes the first.
        """
        ...

    def write(self, results: Sequence[TileResult]) -> None:
        """Upsert results in one transaction; a re-written tile gets ``attempts + 1``."""
        ...

    def reject(self, rejections: Sequence[Rejection]) -> None:
        """Record messages that can never succeed, keyed by message id (a repeat is one row)."""
        ...

    def rejects(self, job: str | None = None) -> list[Rejection]:
        """The rejected messages (of one job), oldest first."""
        ...

    def done_tiles(self, job: str) -> set[Tile]:
        """The tiles of a job with status ``ok`` or ``empty``: what a resume skips."""
        ...

    def counts(self, job: str | None = None) -> dict[str, int]:
        """Rows per status, keys ``ok``, ``empty``, ``error`` and ``total`` always present."""
        ...

    def get_job(self, job: str) -> JobInfo | None:
        """The recorded job, or None."""
        ...

    def jobs(self) -> list[JobInfo]:
        """Every recorded job, oldest first."""
        ...

    def iter_results(
        self, job: str | None = None, *, status: str | None = None
    ) -> Iterator[ResultRow]:
        """Stream result rows ordered by ``(job, z, x, y)``, optionally of one status."""
        ...

    def iter_features(
        self,
        job: str,
        *,
        classes: Sequence[str] | None = None,
        background: bool = False,
        window: TileWindow | None = None,
    ) -> Iterator[FeatureRow]:
        """Stream a job's stored features ordered by ``(z, x, y, seq)`` (constant memory):
        only those of ``classes`` when given, background regions as well when ``background``,
        only tiles inside ``window`` when given (an indexed range scan)."""
        ...

    def has_features(self, job: str) -> bool:
        """True when any tile of the job stored a feature (a segmentation or detection job)."""
        ...

    def results_in(
        self, job: str, window: TileWindow, *, limit: int | None = None
    ) -> list[ResultRow]:
        """The result rows of the tiles inside ``window`` (an indexed range scan), at most
        ``limit`` of them, ordered by ``(x, y)``."""
        ...

    def close(self) -> None:
        """Release the connection(s); the store cannot be used afterwards."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc_info: object) -> None: ...


def utc_now() -> str:
    """Now as ISO-8601 UTC with milliseconds, e.g. ``2025-01-31T12:00:00.000Z``.

    The fixed width keeps text comparison equal to time order.
    """
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def check_status(status: str | None) -> None:
    """Raise :class:`StoreError` unless ``status`` is None or one of :data:`STATUSES`."""
    if status is not None and status not in STATUSES:
        raise StoreError(f"Unknown result status {status!r}: expected one of {', '.join(STATUSES)}")


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays (a model's scores) without importing numpy here.
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _finite(value: Any) -> Any:
    """NaN and infinities become None: they are not JSON (PostgreSQL's jsonb refuses them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def dump_json(value: Any) -> str | None:
    """Encode a model output (or job extra) as strict JSON text; None stays None.

    orjson first: it encodes a pack's scores about 8x faster than the standard library,
    which was the largest client cost of a PostgreSQL write (bench/store.py), and it already
    writes NaN and infinities as null. What it refuses (integers beyond 64 bits, keys that
    are not strings, lone surrogates) takes the standard library's path, which accepts them.
    """
    if value is None:
        return None
    try:
        return orjson.dumps(value, default=_json_default).decode()
    except orjson.JSONEncodeError:
        pass
    try:
        try:
            return json.dumps(value, default=_json_default, separators=(",", ":"), allow_nan=False)
        except ValueError:  # NaN or infinity somewhere: normalise, then null them
            plain = json.loads(json.dumps(value, default=_json_default))
            return json.dumps(_finite(plain), separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"Model output is not JSON serialisable: {exc}") from None


def load_json(text: str | None) -> Any:
    """Decode JSON text written by :func:`dump_json`; None stays None."""
    return None if text is None else json.loads(text)


def results_filter(job: str | None, status: str | None, placeholder: str) -> tuple[str, list[str]]:
    """The ``WHERE`` clause (or nothing) and its parameters selecting rows of one job
    and/or status (results; rejects by job), in the adapter's parameter style (``?`` for
    SQLite, ``%s`` for psycopg).

    >>> results_filter("j", None, "?")
    ('WHERE job = ?', ['j'])
    >>> results_filter(None, None, "%s")
    ('', [])
    """
    clauses, params = [], []
    if job is not None:
        clauses.append(f"job = {placeholder}")
        params.append(job)
    if status is not None:
        clauses.append(f"status = {placeholder}")
        params.append(status)
    return (f"WHERE {' AND '.join(clauses)}" if clauses else "", params)


def job_conflict(recorded: JobInfo, wanted: JobInfo) -> JobConflict | None:
    """Why ``wanted`` may not write into the ``recorded`` job of its name, or None when it may:
    a job's source and model are fixed at creation (a job that names no model, or whose
    record names none, agrees with any).

    >>> job_conflict(JobInfo("j", "a.tif"), JobInfo("j", "b.tif"))
    JobConflict("job 'j' reads a.tif, not b.tif: give this one its own job name (--job)")
    """
    if recorded.source != wanted.source:
        found, asked = recorded.source, wanted.source
        return JobConflict(
            f"job {recorded.job!r} reads {found}, not {asked}: "
            "give this one its own job name (--job)"
        )
    if recorded.model_name is None or wanted.model_name is None:
        return None
    if (recorded.model_name, recorded.model_version) == (wanted.model_name, wanted.model_version):
        return None
    return JobConflict(
        f"job {recorded.job!r} was scored by {recorded.model_name} v{recorded.model_version}, "
        f"not {wanted.model_name} v{wanted.model_version}: give this one its own job name (--job)"
    )


def validate_results(results: Sequence[TileResult]) -> None:
    """Check statuses and tiles before a write, naming the offending result."""
    for result in results:
        if result.status not in STATUSES:
            raise StoreError(
                f"Result for job {result.job!r} tile {tuple(result.tile)} has unknown status "
                f"{result.status!r}: expected one of {', '.join(STATUSES)}"
            )
        if not isinstance(result.job, str) or not result.job:
            raise StoreError(f"Result for tile {tuple(result.tile)} has no job id")
