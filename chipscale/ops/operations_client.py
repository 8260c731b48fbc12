"""The CLI's side of a stack's operations Lambda: :class:`StackOperations` invokes it with
``{"action": ...}`` (``db-setup``, ``status``, ``download``, ``push --stack``) and downloads
the large answers it leaves in the results bucket. What the Lambda runs is in
:mod:`chipscale.ops.operations_actions`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chipscale.errors import ChipscaleError
from chipscale.ops.aws import aws_reason

if TYPE_CHECKING:
    from mercantile import Tile

    from chipscale.values import JobInfo


class OperationError(ChipscaleError):
    """The operations Lambda refused or failed an action (the reason is its own)."""


def invoke(lambda_client: Any, function_name: str, action: str, **payload: Any) -> Any:
    """Run ``action`` in the operations Lambda and return its answer; the function's own
    error (an exception in the handler) becomes an OperationError with its message."""
    from botocore.exceptions import BotoCoreError, ClientError

    body = json.dumps({"action": action, **payload}).encode()
    try:
        response = lambda_client.invoke(FunctionName=function_name, Payload=body)
    except (ClientError, BotoCoreError) as exc:
        raise OperationError(f"operations Lambda {function_name}: {aws_reason(exc)}") from exc
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
        from chipscale.cloud.aws_session import aws_session
        from chipscale.ops.stack_outputs import resolve_stack

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

    def get_job(self, job: str) -> JobInfo | None:
        """The job as recorded (None when it is not): a mosaic's frozen asset list is in its
        ``extra``. A large record comes through the results bucket."""
        from chipscale.values import JobInfo

        try:
            answer = self.call("job", job=job)
        except OperationError as exc:
            if "unknown action 'job'" not in str(exc):
                raise
            raise OperationError(
                f"operations Lambda {self.function_name} cannot read a job's frozen asset list "
                "(it predates the 'job' action): deploy the stack again"
            ) from None
        if "key" in answer:
            body = self._s3.get_object(Bucket=answer["bucket"], Key=answer["key"])["Body"]
            answer = json.loads(body.read())
        record = answer["job"]
        if record is None:
            return None
        return JobInfo(**{**record, "classes": tuple(record.get("classes") or ())})

    def download(
        self,
        dest: str | os.PathLike[str],
        *,
        fmt: str,
        job: str | None = None,
        class_name: str | None = None,
        min_score: float | None = None,
        layer: str | None = None,
    ) -> dict[str, Any]:
        """Export in the VPC, then download the export to ``dest``; returns the answer
        (``rows``: how many ``unit`` s: rows, features or mask tiles)."""
        export = {"job": job, "class_name": class_name, "min_score": min_score, "layer": layer}
        if fmt in ("geoparquet", "flatgeobuf"):
            return self._download_converted(dest, fmt, export)
        answer = self.call("export", format=fmt, **export)
        download_object(self._s3, answer["bucket"], answer["key"], dest)
        return dict(answer)

    def _download_converted(
        self, dest: str | os.PathLike[str], fmt: str, export: dict[str, Any]
    ) -> dict[str, Any]:
        """The Lambda's bundle stays lean, without pyarrow or pyogrio: it exports tiles as CSV
        (thresholds applied) or merged features as full-precision GeoJSON, downloaded beside
        ``dest`` and converted here. The answer's ``rows`` are the converted file's."""
        from chipscale.results.export_csv import read_csv_rows
        from chipscale.results.export_features import read_features_geojson, write_features
        from chipscale.results.export_geoparquet import require_pyarrow, write_geoparquet

        require_pyarrow()  # before the export, not after its download
        if fmt == "flatgeobuf":
            from chipscale.extras import require

            require("pyogrio", "FlatGeobuf export")
        target = Path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, part = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        os.close(fd)
        try:
            answer = self.call("export", format="csv", convert_to=fmt, **export)
            download_object(self._s3, answer["bucket"], answer["key"], part)
            if answer.get("layer") == "features":
                written = write_features(read_features_geojson(part), target, fmt)
            else:
                classes, rows = read_csv_rows(part)
                try:
                    written = write_geoparquet(rows, target, classes)
                finally:
                    close = getattr(rows, "close", None)
                    if close is not None:
                        close()
        finally:
            with contextlib.suppress(OSError):
                os.unlink(part)
        return {**answer, "rows": written}
