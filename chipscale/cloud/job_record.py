"""A pushed job's record in the results store: created or updated by each push (``--db``
directly, ``--stack`` through the operations Lambda), so status and resume know it."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from mercantile import Tile

from chipscale.results.base import ResultStore, utc_now
from chipscale.values import JobInfo

if TYPE_CHECKING:
    from chipscale.cloud.push import PushSummary

#: Recorded as a job's source when the messages carry none (the worker's default is used).
WORKER_DEFAULT_SOURCE = "(worker default source)"


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
    """Job records in a results store reached directly (``--db``): the same calls that
    :class:`chipscale.ops.operations_client.StackOperations` makes through a stack's operations
    Lambda (``--stack``), so a push records, resumes and reads back its job the same way in
    both."""

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

    def get_job(self, job: str) -> JobInfo | None:
        """The job as recorded (None when it is not, or when there is no store yet: the push
        creates it): a mosaic's frozen asset list is in its ``extra``."""
        from chipscale.errors import ChipscaleError
        from chipscale.results import open_store

        try:
            with open_store(self.url, create=False) as store:
                return store.get_job(job)
        except ChipscaleError:
            return None


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
