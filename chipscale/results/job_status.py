"""How far a job is, as one dictionary: the same report for ``chipscale status --db``, the
operations Lambda's ``status`` action behind ``--stack``, and the end of a local run.
"""

from __future__ import annotations

from typing import Any

from chipscale.errors import ChipscaleError
from chipscale.results import ResultStore
from chipscale.values import JobInfo


class JobNotFound(ChipscaleError):
    """The job named is not in the results store."""


def remaining(total: int, counts: dict[str, int]) -> int:
    """Tiles of a job still to do: ``error`` tiles count, since a resume tries them again.

    >>> remaining(10, {"ok": 6, "empty": 2, "error": 1})
    2
    """
    return max(0, total - counts["ok"] - counts["empty"])


def pushed_tiles(info: JobInfo) -> int | None:
    """Tiles the job's last push queued (``extra["pushed"]``, see
    :func:`chipscale.cloud.job_record.push_record`); None for a job no push recorded (a local run).

    Beside ``tiles`` (every tile of the job) it tells a push that stopped short, or a resume
    that skipped the done tiles, from a job still being worked through.

    >>> pushed_tiles(JobInfo("j", "s", extra={"pushed": 40, "push": {"state": "done"}}))
    40
    >>> pushed_tiles(JobInfo("j", "s")) is None
    True
    """
    pushed = info.extra.get("pushed") if isinstance(info.extra, dict) else None
    return pushed if isinstance(pushed, int) and not isinstance(pushed, bool) else None


def job_report(store: ResultStore, info: JobInfo) -> dict[str, Any]:
    """One job's counts. ``tiles`` is what was pushed or covered (the job record), or the
    rows stored when no record says; ``pushed`` the tiles its last push queued (None
    without a push); ``rejected`` counts messages refused for good."""
    counts = store.counts(info.job)
    total = info.tiles_total or counts["total"]
    return {
        "job": info.job,
        "source": info.source,
        "zoom": info.zoom,
        "model": f"{info.model_name} v{info.model_version}" if info.model_name else None,
        "tiles": total,
        "pushed": pushed_tiles(info),
        **{status: counts[status] for status in ("ok", "empty", "error")},
        "remaining": remaining(total, counts),
        "rejected": len(store.rejects(info.job)),
        "pushed_at": pushed_at(info),
    }


def pushed_at(info: JobInfo) -> str | None:
    """When the job's last push started (ISO-8601 UTC), None without a push: the start
    ``status --plan`` measures tiles/s and time so far from."""
    push = info.extra.get("push") if isinstance(info.extra, dict) else None
    at = push.get("at") if isinstance(push, dict) else None
    return at if isinstance(at, str) else None


def job_reports(store: ResultStore, job: str | None = None) -> list[dict[str, Any]]:
    """Reports of one job, or of every recorded job oldest first; JobNotFound names the
    known ones when ``job`` is not recorded."""
    if job is None:
        return [job_report(store, info) for info in store.jobs()]
    info = store.get_job(job)
    if info is None:
        if store.counts(job)["total"] == 0:
            known = ", ".join(repr(j.job) for j in store.jobs()) or "(none)"
            raise JobNotFound(f"job {job!r} is not in {store.url}: the jobs are {known}")
        info = JobInfo(job=job, source="?")  # results written by workers of an unrecorded job
    return [job_report(store, info)]
