"""The operator's private work, run by the operations Lambda inside the VPC, and the CLI's
way of asking for it (DESIGN.md, "Reaching a private stack").

The results database lives in isolated subnets, so ``chipscale db-setup | status | download
--stack NAME`` (and ``push --stack`` recording its job or resuming) invoke the stack's
operations function with ``{"action": ..., ...}``. Large answers (an export, the done tiles of
a job) are written to the stack's results bucket and the answer names the object; the CLI
downloads it with a progress bar. Small answers come back in the invocation's payload.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mercantile import Tile

from chipscale.errors import ChipscaleError

#: Export formats the ``export`` action writes, by the suffix the CLI asked for.
EXPORT_FORMATS = ("csv", "geojson")
#: Key prefixes in the results bucket (the stack may expire them with a lifecycle rule).
EXPORT_PREFIX = "exports/"
DONE_TILES_PREFIX = "resume/"


class OperationError(ChipscaleError):
    """The operations Lambda refused or failed an action (the reason is its own)."""


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


# ----------------------------------------------------------------------------- the Lambda side


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
    from chipscale.ops.verify import verify_action

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
    from chipscale.results import open_store
    from chipscale.results.export import export_results

    fmt = event.get("format", "csv")
    if fmt not in EXPORT_FORMATS:
        # This bundle has no pyarrow: `chipscale download --stack` asks for csv and converts.
        hint = (
            "; GeoParquet is converted from a csv export by the CLI" if fmt == "geoparquet" else ""
        )
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}{hint}")
    job = event.get("job")
    bucket = env.bucket()
    key = f"{EXPORT_PREFIX}{safe_key_part(job or 'all-jobs')}/{_stamp()}.{fmt}"
    with tempfile.TemporaryDirectory() as tmp:  # Lambda's /tmp: ephemeral storage
        path = Path(tmp) / f"results.{fmt}"
        with open_store(env.db_url(), create=False) as store:
            rows = export_results(
                store,
                job,
                path,
                class_name=event.get("class_name"),
                min_score=event.get("min_score"),
            )
        size = path.stat().st_size
        env.s3.upload_file(str(path), bucket, key)
    return {"bucket": bucket, "key": key, "rows": rows, "bytes": size}


def _record_job(event: Mapping[str, Any], env: OperationsEnvironment) -> dict[str, Any]:
    from chipscale.cloud.push import record_job
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


# ----------------------------------------------------------------------------- the CLI side


def invoke(lambda_client: Any, function_name: str, action: str, **payload: Any) -> Any:
    """Run ``action`` in the operations Lambda and return its answer; the function's own
    error (an exception in the handler) becomes an OperationError with its message."""
    from botocore.exceptions import BotoCoreError, ClientError

    body = json.dumps({"action": action, **payload}).encode()
    try:
        response = lambda_client.invoke(FunctionName=function_name, Payload=body)
    except (ClientError, BotoCoreError) as exc:
        raise OperationError(f"operations Lambda {function_name}: {exc}") from exc
    raw = response["Payload"].read()
    try:
        answer = json.loads(raw) if raw else None
    except ValueError:
        raise OperationError(f"operations Lambda {function_name} answered {raw[:200]!r}") from None
    if response.get("FunctionError"):
        if isinstance(answer, dict):
            reason = f"{answer.get('errorType', 'Error')}: {answer.get('errorMessage', '')}"
        else:
            reason = str(answer)[:300]
        raise OperationError(f"operations Lambda {function_name} failed {action}: {reason}")
    return answer


def download_object(s3_client: Any, bucket: str, key: str, dest: str | os.PathLike[str]) -> int:
    """Download ``s3://bucket/key`` to ``dest`` (atomically) with a progress bar on stderr;
    returns its size in bytes."""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    from chipscale.atomic import atomic_write

    size = int(s3_client.head_object(Bucket=bucket, Key=key)["ContentLength"])
    columns = (*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn())
    with (
        Progress(*columns, transient=True) as progress,
        atomic_write(dest, "wb") as handle,
    ):
        task = progress.add_task(f"s3://{bucket}/{key}", total=size)
        s3_client.download_fileobj(
            bucket, key, handle, Callback=lambda n: progress.advance(task, n)
        )
    return size


def read_tiles_object(s3_client: Any, bucket: str, key: str) -> set[Tile]:
    """The tiles of a ``done-tiles`` answer (x-y-z lines)."""
    from chipscale.grid.tilelist import iter_tile_lines

    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return set(iter_tile_lines(body.splitlines(), name=f"s3://{bucket}/{key}"))


class StackOperations:
    """The operator's side of a deployed stack's operations function: one method per action,
    the answers' S3 objects fetched with the operator's own credentials."""

    def __init__(self, session: Any, function_name: str) -> None:
        self.function_name = function_name
        self._lambda = session.client("lambda")
        self._s3 = session.client("s3")

    @classmethod
    def for_stack(cls, name: str, *, region: str | None = None) -> StackOperations:
        """Resolve stack ``name``'s operations function (one-line errors when it is missing)."""
        from chipscale.ops.stack_outputs import aws_session, resolve_stack

        session = aws_session(region)
        outputs = resolve_stack(name, session=session)
        return cls(session, outputs.require("operations_function"))

    def call(self, action: str, **payload: Any) -> Any:
        return invoke(self._lambda, self.function_name, action, **payload)

    def db_setup(self) -> str:
        return str(self.call("db-setup")["summary"])

    def status(self, job: str | None = None) -> list[dict[str, Any]]:
        return list(self.call("status", job=job)["jobs"])

    def record_job(self, **fields: Any) -> None:
        self.call("record-job", **fields)

    def done_tiles(self, job: str) -> set[Tile]:
        answer = self.call("done-tiles", job=job)
        return read_tiles_object(self._s3, answer["bucket"], answer["key"])

    def download(
        self,
        dest: str | os.PathLike[str],
        *,
        fmt: str,
        job: str | None = None,
        class_name: str | None = None,
        min_score: float | None = None,
    ) -> dict[str, Any]:
        """Export in the VPC, then download the export to ``dest``; returns the answer."""
        export = {"job": job, "class_name": class_name, "min_score": min_score}
        if fmt == "geoparquet":
            return self._download_geoparquet(dest, export)
        answer = self.call("export", format=fmt, **export)
        download_object(self._s3, answer["bucket"], answer["key"], dest)
        return dict(answer)

    def _download_geoparquet(
        self, dest: str | os.PathLike[str], export: dict[str, Any]
    ) -> dict[str, Any]:
        """The Lambda's bundle stays lean, without pyarrow: it exports CSV (thresholds
        applied), downloaded beside ``dest`` and converted here. The answer's ``rows`` are
        the GeoParquet's."""
        from chipscale.results.export import read_csv_rows, require_pyarrow, write_geoparquet

        require_pyarrow()  # before the export, not after its download
        target = Path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, csv_path = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".csv.part"
        )
        os.close(fd)
        try:
            answer = self.call("export", format="csv", **export)
            download_object(self._s3, answer["bucket"], answer["key"], csv_path)
            classes, rows = read_csv_rows(csv_path)
            try:
                written = write_geoparquet(rows, target, classes)
            finally:
                close = getattr(rows, "close", None)
                if close is not None:
                    close()
        finally:
            with contextlib.suppress(OSError):
                os.unlink(csv_path)
        return {**answer, "rows": written}
