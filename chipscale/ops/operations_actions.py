"""The operations Lambda's actions: the operator's work on the stack's private resources
(database, model endpoint), run inside the VPC by ``lambdas/operations.py``.

:func:`run_action` dispatches one ``{"action": ...}`` event. Large answers (an export, the
done tiles of a job, a job's record with a large frozen asset list) go to the results bucket
and the answer names the object; small ones come back in the payload. The CLI's side is
:mod:`chipscale.ops.operations_client`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chipscale.ops.operations_client import OperationError

#: Export formats the ``export`` action writes, by the suffix the CLI asked for (``mask``: a
#: segmentation job's class-mask COG).
EXPORT_FORMATS = ("csv", "geojson", "mask")
#: Formats the CLI converts from an export (this bundle has neither pyarrow nor pyogrio).
CONVERTED_FORMATS = ("geoparquet", "flatgeobuf")
#: Key prefixes in the results bucket (the stack may expire them with a lifecycle rule).
EXPORT_PREFIX = "exports/"
DONE_TILES_PREFIX = "resume/"
#: An answer over this many bytes goes to the results bucket (a synchronous Lambda answer is
#: at most 6 MB; a job's frozen asset list of 10,000 NAIP-like items is about 3 MB).
INLINE_ANSWER_BYTES = 1 << 20


@dataclass
class OperationsEnvironment:
    """What the actions reach: the database (URL fetched on first use: the secret is read
    only by actions that need it), the model endpoint and the results bucket."""

    db_url: Callable[[], str]
    model_url: str | None = None
    results_bucket: str | None = None
    s3: Any = None

    def bucket(self) -> str:
        if not self.results_bucket:
            raise OperationError("this operations function has no results bucket configured")
        return self.results_bucket


def run_action(event: Mapping[str, Any], env: OperationsEnvironment) -> Any:
    """Dispatch one ``{"action": ...}`` event; an unknown action is a ValueError naming the
    known ones (the caller's mistake, not an outage)."""
    action = event.get("action")
    handler = ACTIONS.get(str(action))
    if handler is None:
        raise ValueError(
            f"unknown action {action!r}: this operations Lambda knows "
            + ", ".join(repr(name) for name in ACTIONS)
        )
    return handler(event, env)


def _verify(event: Mapping[str, Any], env: OperationsEnvironment) -> Any:
    from chipscale.ops.private_checks import verify_action

    return verify_action(env.model_url, env.db_url())


def _db_setup(event: Mapping[str, Any], env: OperationsEnvironment) -> dict[str, Any]:
    from chipscale.results import setup_store

    return {"summary": setup_store(env.db_url())}


def _status(event: Mapping[str, Any], env: OperationsEnvironment) -> dict[str, Any]:
    from chipscale.results import open_store
    from chipscale.results.job_status import job_reports

    with open_store(env.db_url(), create=False) as store:
        return {"jobs": job_reports(store, event.get("job"))}


def _export(event: Mapping[str, Any], env: OperationsEnvironment) -> dict[str, Any]:
    """Tiles, merged features or the class mask (:func:`~chipscale.results.export.export_job`)
    into the results bucket. ``convert_to`` (GeoParquet, FlatGeobuf) picks the layer for that
    format and writes what the CLI converts: tiles as CSV, features as full-precision GeoJSON."""
    from chipscale.results import open_store
    from chipscale.results.export import choose_layer, export_job

    fmt, convert_to = event.get("format", "csv"), event.get("convert_to")
    if fmt not in EXPORT_FORMATS or (
        convert_to is not None and convert_to not in CONVERTED_FORMATS
    ):
        # This bundle has no pyarrow: `chipscale download --stack` asks for csv and converts.
        hint = (
            "; GeoParquet is converted from a csv export by the CLI" if fmt == "geoparquet" else ""
        )
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}{hint}")
    job = event.get("job")
    bucket = env.bucket()
    with tempfile.TemporaryDirectory() as tmp:  # Lambda's /tmp: ephemeral storage
        with open_store(env.db_url(), create=False) as store:
            layer = choose_layer(store, job, convert_to or fmt, event.get("layer"))
            suffix = {"features": "geojson", "mask": "tif"}.get(layer, "csv" if convert_to else fmt)
            path = Path(tmp) / f"results.{suffix}"
            rows, unit = export_job(
                store,
                job,
                path,
                layer=None if layer == "mask" else layer,
                class_name=event.get("class_name"),
                min_score=event.get("min_score"),
                precision=None if convert_to else 7,
            )
        key = f"{EXPORT_PREFIX}{safe_key_part(job or 'all-jobs')}/{_stamp()}.{suffix}"
        size = path.stat().st_size
        env.s3.upload_file(str(path), bucket, key)
    return {
        "bucket": bucket, "key": key, "rows": rows, "bytes": size, "layer": layer, "unit": unit
    }  # fmt: skip


def _record_job(event: Mapping[str, Any], env: OperationsEnvironment) -> dict[str, Any]:
    from chipscale.cloud.job_record import record_job
    from chipscale.results import open_store

    job, tiles_total = event.get("job"), event.get("tiles_total")
    if not isinstance(job, str) or not job or not isinstance(tiles_total, int):
        raise ValueError("record-job needs a job name and tiles_total")
    with open_store(env.db_url(), create=False) as store:
        info = record_job(
            store,
            job=job,
            source=event.get("source"),
            zoom=event.get("zoom"),
            tiles_total=tiles_total,
            extra=dict(event.get("extra") or {}),
        )
    return {"job": info.job, "tiles_total": info.tiles_total}


def _done_tiles(event: Mapping[str, Any], env: OperationsEnvironment) -> dict[str, Any]:
    from chipscale.results import open_store

    job = event.get("job")
    if not job:
        raise ValueError("done-tiles needs a job")
    bucket = env.bucket()
    key = f"{DONE_TILES_PREFIX}{safe_key_part(job)}/{_stamp()}.txt"
    with open_store(env.db_url(), create=False) as store:
        tiles = store.done_tiles(job)
    body = "".join(f"{t.x}-{t.y}-{t.z}\n" for t in sorted(tiles)).encode()
    env.s3.put_object(Bucket=bucket, Key=key, Body=body)
    return {"bucket": bucket, "key": key, "tiles": len(tiles)}


def _job(event: Mapping[str, Any], env: OperationsEnvironment) -> dict[str, Any]:
    """The job as recorded (``{"job": None}`` when it is not): its source and ``extra``,
    which holds a mosaic's frozen asset list, so ``push --stack`` reads that list back as
    ``push --db`` does. Reads the database only; a record over :data:`INLINE_ANSWER_BYTES`
    is left under ``resume/`` of the results bucket and the answer names it."""
    from chipscale.results import open_store

    job = event.get("job")
    if not isinstance(job, str) or not job:
        raise ValueError("job needs a job name")
    with open_store(env.db_url(), create=False) as store:
        info = store.get_job(job)
    answer = {"job": None if info is None else dataclasses.asdict(info)}
    body = json.dumps(answer, separators=(",", ":")).encode()
    if len(body) <= INLINE_ANSWER_BYTES:
        return answer
    bucket = env.bucket()
    key = f"{DONE_TILES_PREFIX}{safe_key_part(job)}/{_stamp()}-job.json"
    env.s3.put_object(Bucket=bucket, Key=key, Body=body)
    return {"bucket": bucket, "key": key, "bytes": len(body)}


def _scrape_metrics(event: Mapping[str, Any], env: OperationsEnvironment) -> dict[str, Any]:
    from chipscale.ops.prometheus import scrape_action

    return scrape_action(event, env)


ACTIONS: dict[str, Callable[[Mapping[str, Any], OperationsEnvironment], Any]] = {
    "verify": _verify,
    "db-setup": _db_setup,
    "status": _status,
    "export": _export,
    "record-job": _record_job,
    "done-tiles": _done_tiles,
    "job": _job,
    "scrape-metrics": _scrape_metrics,
}


def safe_key_part(text: str) -> str:
    """A job name as one S3 key segment (jobs may hold slashes, spaces or quotes).

    >>> safe_key_part("roofs/2024 'north'")
    'roofs_2024__north_'
    """
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", text)[:200] or "_"


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
