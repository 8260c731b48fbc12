"""``chipscale push`` (chip-n-scale's ``sqs-push``): tiles to the queue, packed and batched.

The library is :mod:`chipscale.cloud.push`; this module only parses, resolves the queue and
prints.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from chipscale.cli.local_run import default_job_name
from chipscale.cli.mosaic_options import (
    MosaicChoice,
    area_of,
    job_mosaic,
    mosaic_options,
    pack_refs,
)
from chipscale.cli.options import aoi_option, bbox_option, db_option
from chipscale.cloud.push_send import DEFAULT_CONCURRENCY
from chipscale.errors import ChipscaleError
from chipscale.grid.packs import DEFAULT_MAX_TILES, MAX_TILES_PER_MESSAGE
from chipscale.grid.tilelist import MAX_ZOOM, read_tile_list
from chipscale.safe_text import markup, plural, printable

if TYPE_CHECKING:
    from mercantile import Tile

    from chipscale.cloud.job_record import StoreJobs
    from chipscale.cloud.push import PushSummary
    from chipscale.cloud.push_plan import PushPlan
    from chipscale.cloud.push_send import BatchSender
    from chipscale.ops.operations_client import StackOperations
    from chipscale.sources.mosaic_source import MosaicSource

F = TypeVar("F", bound=Callable[..., Any])


_SOURCE_OPTIONS = (
    click.option(
        "--source",
        help="What the worker reads: a COG (path, http(s) or s3:// URL), an XYZ tile URL "
        "template https://host/{z}/{x}/{y}.jpg, or a mosaic (a .txt COG list, a STAC .json "
        "collection; or --stac). Without TILES, its footprint is covered.",
    ),
    mosaic_options,
    click.option(
        "--worker-source",
        is_flag=True,
        help="Without --source, send messages with no source: the worker reads its configured "
        "default (CHIPSCALE_DEFAULT_SOURCE), as chip-n-scale did. On by default for sqs-push.",
    ),
)


def source_options(command: F) -> F:
    """``--source``, the mosaic options and ``--worker-source`` (push's and plan's); the
    command takes ``source``, ``worker_source`` and the mosaic options as ``**mosaic``."""
    for option in reversed(_SOURCE_OPTIONS):
        command = option(command)
    return command


def _push_inputs(tiles_file: str | None, queue_url: str | None) -> tuple[str | None, str | None]:
    """TILES is optional, so ``push https://sqs.../queue --bbox ...`` puts the URL in TILES:
    a lone http(s) argument that is no file is the queue."""
    if (
        queue_url is None
        and tiles_file is not None
        and tiles_file.lower().startswith(("http://", "https://"))
        and not Path(tiles_file).exists()
    ):
        return None, tiles_file
    return tiles_file, queue_url


def _push_tiles(
    tiles_file: str | None,
    *,
    zoom: int | None,
    source: str | None,
    aoi: str | None,
    bbox: tuple[float, float, float, float] | None,
    mosaic: MosaicSource | None = None,
) -> Iterable[Tile]:
    """The tiles to push: a tile list (``-`` is stdin), or the cover of the source's
    footprint (a mosaic's: the union of its assets'), the AOI and the bbox intersected (as
    ``chipscale cover`` does)."""
    from chipscale.cloud.push import is_xyz_template
    from chipscale.grid.tilelist import read_tile_stream

    if tiles_file is not None:
        if aoi or bbox:
            raise click.UsageError("give a tile list or --aoi/--bbox, not both")
        if tiles_file == "-":
            if sys.stdin is None:  # started with its standard input closed (<&-)
                raise click.UsageError("TILES is -, but standard input is closed")
            return read_tile_stream(sys.stdin.buffer, name="<stdin>")
        return read_tile_list(tiles_file)
    if mosaic is not None:
        if zoom is None:
            raise click.UsageError("--zoom is needed to cover an area")
        from chipscale.sources.mosaic_source import cover_mosaic

        return cover_mosaic(zoom, mosaic, aoi=aoi, bbox=bbox)
    footprint = source if source is not None and not is_xyz_template(source) else None
    if footprint is None and aoi is None and bbox is None:
        raise click.UsageError(
            "give TILES (a tile list), or --zoom with --aoi, --bbox or a --source raster to cover"
            + (" (an XYZ --source has no footprint)" if source else "")
        )
    if zoom is None:
        raise click.UsageError("--zoom is needed to cover an area")
    from chipscale.sources.footprint import cover as cover_tiles

    return cover_tiles(zoom, source=footprint, aoi=aoi, bbox=bbox)


def _push_source(
    source: str | None,
    mosaic: dict[str, Any],
    job: str | None,
    *,
    worker_source: bool,
    required: bool = True,
) -> tuple[MosaicChoice, str | None, str | None]:
    """``--source``, the mosaic options, ``--worker-source`` and ``--job`` checked (push's
    and plan's): the mosaic choice, the job's source text (a mosaic's label) and a mosaic's
    list or collection file as given (None for a search or a plain source). ``required``:
    no source at all is an error (without ``--worker-source``)."""
    from chipscale.cloud import push as push_lib

    choice = MosaicChoice.of(mosaic)
    if choice.stac is not None and (source is not None or worker_source):
        raise click.UsageError("give --source, --worker-source or --stac, not two of them")
    choice.check_plain(source)
    label = choice.label(source)  # a mosaic's job source; None otherwise
    listed = source if label is not None else None
    if label is not None:
        source = label
    elif source is not None:
        try:
            push_lib.validate_source(source)
        except ChipscaleError as exc:
            raise click.BadParameter(str(exc), param_hint="--source") from None
    elif required and not worker_source:
        raise click.UsageError(
            "give --source (the COG or XYZ URL the worker reads), or --worker-source to use "
            "the worker's configured default source"
        )
    if job is not None:
        try:
            push_lib.validate_job(job)
        except ChipscaleError as exc:
            raise click.BadParameter(str(exc), param_hint="--job") from None
    return choice, source, listed


def _push_mosaic(
    choice: MosaicChoice,
    listed: str | None,
    *,
    job: str | None,
    tiles_file: str | None,
    aoi: str | None,
    bbox: tuple[float, float, float, float] | None,
    zoom: int | None,
    db: str | None,
    jobs: StoreJobs | StackOperations | None = None,
) -> tuple[str | None, MosaicSource | None]:
    """A mosaic job's name and asset list: frozen with the job as ``jobs`` (else ``db``)
    records it, else resolved now (the search limited to the AOI and bbox); ``(job, None)``
    without a mosaic."""
    if choice.label(listed) is None:
        return job, None
    job = job or _push_job_name(listed or choice.collection, tiles_file, aoi, zoom)
    if jobs is None and db:
        from chipscale.cloud.job_record import StoreJobs

        jobs = StoreJobs(db)
    existing = jobs.get_job(job) if jobs is not None else None
    return job, job_mosaic(choice, listed, existing=existing, area=area_of(aoi, bbox))


def _push_queue(
    queue_url: str | None, stack: str | None, region: str | None, dry_run: bool
) -> tuple[str | None, str | None]:
    """The queue URL and the region of its client: from QUEUE_URL, or from the stack's
    outputs. A dry run needs neither and calls nothing."""
    if queue_url and stack:
        raise click.UsageError("give QUEUE_URL or --stack, not both")
    if dry_run:
        return queue_url, region
    if not queue_url and not stack:
        raise click.UsageError("give QUEUE_URL or --stack NAME (or --dry-run to count only)")
    if stack:
        from chipscale.cloud.aws_session import aws_session
        from chipscale.ops.stack_outputs import resolve_stack

        outputs = resolve_stack(stack, session=aws_session(region))
        return outputs.queue_url, outputs.region
    from chipscale.cloud.push import region_from_queue_url

    assert queue_url is not None
    return queue_url, region or region_from_queue_url(queue_url)


def _push_jobs(
    db: str | None, stack: str | None, region: str | None
) -> StoreJobs | StackOperations | None:
    """Where the push records its job and finds the done tiles of a resume: ``--db``
    directly, else the stack's operations Lambda (the database is private); None: nowhere."""
    if db:
        from chipscale.cloud.job_record import StoreJobs

        return StoreJobs(db)
    if stack:
        from chipscale.ops.operations_client import StackOperations

        return StackOperations.for_stack(stack, region=region)
    return None


def _push_summary_line(summary: PushSummary) -> str:
    """The end-of-push line: tiles, messages, requests and their rate per 1,000 tiles."""
    verb = "would push" if summary.dry_run else "pushed"
    tiles = summary.tiles if summary.dry_run else summary.tiles_sent
    messages = summary.messages if summary.dry_run else summary.messages_sent
    skipped = f" ({summary.skipped:,} skipped as done)" if summary.skipped else ""
    line = (
        f"job {summary.job}: {verb} {plural(tiles, 'tile')}{skipped} in "
        f"{plural(messages, 'message')} with {plural(summary.requests, 'SQS request')} "
        f"({summary.requests_per_1000_tiles:.2f} per 1,000 "
        f"tiles; chip-n-scale: 1,000), {summary.bytes:,} bytes, {summary.seconds:.1f} s"
    )
    if summary.dry_run:
        return line + "; nothing sent (dry run)"
    return line + f", {summary.failed_tiles:,} failed -> {summary.queue_url}"


def _record_push(
    jobs: StoreJobs | StackOperations | None,
    job: str,
    source: str | None,
    plan: PushPlan,
    summary: PushSummary | None,
    frozen: dict[str, Any] | None = None,
    /,
    **details: object,
) -> None:
    """Record the job (see chipscale.cloud.job_record.record_job), or say it was not;
    ``frozen`` (a mosaic's asset list) goes into its ``extra``."""
    from chipscale.cloud.job_record import push_record

    if jobs is None:
        if summary is not None:
            click.echo(
                f"job {job} not recorded in a results store (give --db or --stack)", err=True
            )
        return
    jobs.record_job(
        job=job,
        source=source,
        zoom=plan.zoom,
        tiles_total=plan.total,
        extra={**push_record(summary, **details), **(frozen or {})},
    )


@click.command()
@click.argument("tiles_file", metavar="[TILES]", required=False)
@click.argument("queue_url", metavar="[QUEUE_URL]", required=False)
@click.option("--stack", help="Push to this deployed stack's queue (from its outputs).")
@source_options
@aoi_option
@bbox_option
@click.option(
    "--zoom",
    "-z",
    type=click.IntRange(0, MAX_ZOOM),
    help="Tile zoom: needed to cover an area; with TILES, every tile must be at it.",
)
@click.option("--job", help="Job name (default: SOURCE-NAME-zZOOM, or the tile list's name).")
@click.option(
    "--max-tiles-per-message",
    type=click.IntRange(1, MAX_TILES_PER_MESSAGE),
    default=DEFAULT_MAX_TILES,
    show_default=True,
    help=f"Tiles a message carries; above {DEFAULT_MAX_TILES}, raise the worker's "
    "CHIPSCALE_MAX_TILES_PER_MESSAGE.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    help="SendMessageBatch calls in flight (chip-n-scale's PROMISE_THRESHOLD).",
)
@db_option()
@click.option(
    "--resume", is_flag=True, help="Skip tiles the job already has done (in --db or --stack)."
)
@click.option("--dry-run", is_flag=True, help="Count tiles, messages and requests; send nothing.")
@click.option("--region", help="AWS region (default: the queue URL's, then AWS_REGION).")
@click.option(
    "--endpoint-url",
    help="SQS endpoint (moto, localstack); boto3 also reads AWS_ENDPOINT_URL itself.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def push(
    tiles_file: str | None,
    queue_url: str | None,
    stack: str | None,
    source: str | None,
    worker_source: bool,
    aoi: str | None,
    bbox: tuple[float, float, float, float] | None,
    zoom: int | None,
    job: str | None,
    max_tiles_per_message: int,
    concurrency: int,
    db: str | None,
    resume: bool,
    dry_run: bool,
    region: str | None,
    endpoint_url: str | None,
    as_json: bool,
    **mosaic: Any,
) -> None:
    """Send tiles to the queue, packed: adjacent tiles share a message, ten messages share
    a request (chip-n-scale's sqs-push made one request per tile).

    \b
    TILES is a tile list (x-y-z, z/x/y or [x, y, z] lines; - reads stdin), or cover an area:
      chipscale push tiles.txt https://sqs.us-east-1.amazonaws.com/123456789012/q --source URL
      chipscale push --stack chipscale --source s3://bucket/scene.tif --zoom 18
      chipscale push --bbox W,S,E,N --zoom 18 --source URL --dry-run
    Every line is read and checked before the first message goes. Exits 1 when tiles
    could not be queued, naming the first reasons.
    """
    from chipscale.cloud import push as push_lib
    from chipscale.cloud.push_plan import plan_push
    from chipscale.cloud.push_send import BatchSender, sqs_client

    tiles_file, queue_url = _push_inputs(tiles_file, queue_url)
    choice, source, listed = _push_source(source, mosaic, job, worker_source=worker_source)
    if resume and not (db or stack):
        raise click.UsageError("--resume needs --db (or DATABASE_URL) or --stack: the results")
    queue_url, region = _push_queue(queue_url, stack, region, dry_run)
    jobs = _push_jobs(db, stack, region) if (resume or not dry_run) else None
    job, frozen = _push_mosaic(
        choice,
        listed,
        job=job,
        tiles_file=tiles_file,
        aoi=aoi,
        bbox=bbox,
        zoom=zoom,
        db=db,
        jobs=jobs,
    )
    tiles = _push_tiles(tiles_file, zoom=zoom, source=source, aoi=aoi, bbox=bbox, mosaic=frozen)
    if max_tiles_per_message > DEFAULT_MAX_TILES:
        click.echo(
            f"Note: messages of up to {max_tiles_per_message} tiles: the worker must run with "
            f"CHIPSCALE_MAX_TILES_PER_MESSAGE >= {max_tiles_per_message}",
            err=True,
        )
    name = "<stdin>" if tiles_file == "-" else tiles_file or "cover"
    with plan_push(tiles, zoom=zoom, name=name) as plan:
        job = job or _push_job_name(source, tiles_file, aoi, plan.zoom)
        if resume:
            assert jobs is not None  # --resume needs --db or --stack
            plan.skip_done(jobs.done_tiles(job))
        sender = None
        if not dry_run:
            assert queue_url is not None
            client = sqs_client(region=region, endpoint_url=endpoint_url, concurrency=concurrency)
            sender = BatchSender(client, queue_url)
            stored = None if frozen is None else frozen.frozen()
            _record_push(jobs, job, source, plan, None, stored, queue=queue_url)
        details = {"queue": queue_url, "max_tiles_per_message": max_tiles_per_message}
        try:
            summary = _run_push(
                plan, job, source, sender, max_tiles_per_message, concurrency, frozen
            )
        except push_lib.PushAborted as exc:  # record what did go before the one-line error
            _record_push(jobs, job, source, plan, exc.summary, state="aborted", **details)
            raise
        if not dry_run:
            _record_push(jobs, job, source, plan, summary, **details)
    click.echo(printable(_push_summary_line(summary)), err=True)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
    if not summary.ok:
        raise ChipscaleError(
            f"{plural(summary.failed_tiles, 'tile')} in "
            f"{plural(summary.failed_messages, 'message')} could not be queued: "
            f"{'; '.join(summary.failure_reasons)}"
        )


def _run_push(
    plan: PushPlan,
    job: str,
    source: str | None,
    sender: BatchSender | None,
    max_tiles: int,
    concurrency: int,
    frozen: MosaicSource | None = None,
) -> PushSummary:
    """Run the push under a progress bar; a push stopped by an error still reports what
    it sent before failing."""
    from chipscale.cli.progress import tile_progress
    from chipscale.cloud.push import PushAborted, run_push

    verb = "counting" if sender is None else "pushing"
    try:
        with tile_progress(markup(f"{verb} job {job}")) as progress:
            progress.start(plan.todo, plan.skipped)
            return run_push(
                plan,
                job=job,
                source=source,
                sender=sender,
                max_tiles_per_message=max_tiles,
                concurrency=concurrency,
                on_progress=progress.advance,
                candidates=None if frozen is None else pack_refs(frozen),
            )
    except PushAborted as exc:
        click.echo(_push_summary_line(exc.summary), err=True)
        raise


def _push_job_name(
    source: str | None, tiles_file: str | None, aoi: str | None, zoom: int | None
) -> str:
    """The default job: named after the source (as ``chipscale run`` names it, so a push and
    a local run of one source share a job), else after the tile list or the AOI file."""
    from chipscale.cloud.push import is_xyz_template

    name = source or (tiles_file if tiles_file != "-" else "stdin") or aoi or "bbox"
    if is_xyz_template(name):  # https://host/imagery/{z}/{x}/{y}.jpg -> imagery
        name = name.split("{", 1)[0].rstrip("/") or "tiles"
    if zoom is None:
        return default_job_name(name, 0).removesuffix("-z0")  # mixed zooms: no -zZOOM
    return default_job_name(name, zoom)
