"""The ``chipscale`` command line.

Conventions of rasterio's ``rio``: data to stdout, diagnostics to stderr; exit 0 on success,
1 for a failed operation (one line saying why, no traceback), 2 for bad usage. ``-v`` shows
debug logs and tracebacks.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import click

from chipscale.atomic import atomic_write, refuse_overwrite
from chipscale.errors import ChipscaleError, one_line
from chipscale.grid.tilelist import (
    MAX_ZOOM,
    TileFormat,
    parse_tile,
    read_tile_list,
    write_tile_list,
)
from chipscale.pipes import die_of_sigpipe, reader_gone
from chipscale.redaction import RedactingFormatter, remember, scrub
from chipscale.safe_text import cell, markup, plural, printable

log = logging.getLogger("chipscale")

DEFAULT_OUT = "chipscale-out"


class ChipscaleGroup(click.Group):
    """Turns expected failures into one-line errors and exit code 1, and a reader that left
    the pipe (``| head``) into a quiet death by SIGPIPE (see chipscale.pipes)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # a reader gone shows here, not in Python's final flush
            return result
        except Exception as raised:
            if isinstance(raised, BrokenPipeError) and reader_gone():
                die_of_sigpipe()
            exc = _as_missing_extra(raised, ctx)
            if not _reported_in_one_line(exc):
                raise
            if log.isEnabledFor(logging.DEBUG):
                log.exception("failed")
            click.echo(f"Error: {printable(scrub(one_line(exc)))}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


def _as_missing_extra(exc: Exception, ctx: click.Context) -> Exception:
    """An optional module's ModuleNotFoundError as the error naming its extra (chipscale.extras)."""
    if isinstance(exc, ModuleNotFoundError):
        from chipscale.extras import from_import_error

        return from_import_error(exc, f"chipscale {ctx.invoked_subcommand}") or exc
    return exc


def _reported_in_one_line(exc: Exception) -> bool:
    """Whether ``exc`` is an expected failure: chipscale's, the system's, or rasterio's.

    rasterio is looked up, not imported: importing it (with boto3 and numpy behind it) costs
    about 50 MB and half a second, which commands that never open a raster (download,
    status, push from a tile list) need not pay, and they cannot raise its errors.
    """
    if isinstance(exc, ChipscaleError | OSError):
        return True
    rasterio_errors = sys.modules.get("rasterio.errors")
    return rasterio_errors is not None and isinstance(exc, rasterio_errors.RasterioError)


def _console() -> Any:
    """A rich console for tables on stdout; as wide as needed when not a terminal (a pipe or a
    log file), where rich would otherwise wrap every cell at 80 columns."""
    from chipscale.pipes import stdout_console

    return stdout_console() if sys.stdout.isatty() else stdout_console(width=160)


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object) -> None:
    """Warnings meant for the user (e.g. a slow strip-organised source), without source lines."""
    click.echo(f"Warning: {printable(str(message))}", err=True)


# ----------------------------------------------------------------------------- options


def _parse_bands(_ctx: click.Context, _param: click.Parameter, value: str | None):
    if value is None:
        return None
    try:
        bands = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of band numbers"
        ) from None
    if not bands or min(bands) < 1:
        raise click.BadParameter("band numbers start at 1")
    return bands


def _parse_job(_ctx: click.Context, _param: click.Parameter, value: str | None):
    """A --job the results stores and workers can keep (e.g. UTF-8 text), else bad usage."""
    if value is None:
        return None
    from chipscale.pipeline.messages import check_job

    try:
        return check_job(value)
    except ChipscaleError as exc:
        raise click.BadParameter(str(exc)) from None


def _parse_bbox(_ctx: click.Context, _param: click.Parameter, value: str | None):
    if value is None:
        return None
    from chipscale.grid.cover import parse_bbox

    try:
        return parse_bbox(value)
    except ChipscaleError as exc:
        raise click.BadParameter(str(exc)) from None


zoom_option = click.option(
    "--zoom", "-z", type=click.IntRange(0, MAX_ZOOM), required=True, help="Tile zoom level."
)
aoi_option = click.option(
    "--aoi",
    type=click.Path(dir_okay=False),
    help="GeoJSON Polygon/MultiPolygon area (EPSG:4326 unless its crs member says otherwise).",
)
bbox_option = click.option(
    "--bbox", callback=_parse_bbox, help="Area as W,S,E,N degrees; W > E crosses the antimeridian."
)
bands_option = click.option(
    "--bands", callback=_parse_bands, help="Source bands to read, 1-based, e.g. 1,2,3."
)
class_option = click.option(
    "--class",
    "class_name",
    help="Keep tiles whose top class is this one (with --min-score: scoring at least S in it).",
)
min_score_option = click.option(
    "--min-score",
    type=click.FloatRange(0, 1),
    help="Keep tiles scoring at least this (in --class, or in their top class).",
)


def _db_option(required: bool = False):
    return click.option(
        "--db",
        envvar="DATABASE_URL",
        required=required,
        callback=_remember_secrets,
        help="Results store: sqlite:///path.db or postgresql://... (env DATABASE_URL).",
    )


def _remember_secrets(_ctx: click.Context, _param: click.Parameter, value: str | None):
    """A database URL's password, noted so that no error or log line can print it."""
    return None if value is None else remember(value)


@contextmanager
def _output(path: str | None, mode: str = "w") -> Iterator[IO[Any]]:
    """stdout for no path or ``-``, else the file, written atomically."""
    if path is None or path == "-":
        yield sys.stdout
        return
    with atomic_write(path, mode) as handle:
        yield handle


# ----------------------------------------------------------------------------- group


@click.group(cls=ChipscaleGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-vv for GDAL too).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.version_option(package_name="chipscale")
def cli(verbose: int, quiet: bool) -> None:
    """Run a machine-learning model over every web-mercator tile of an area.

    \b
    Start here:  chipscale run --source image.tif --zoom 18
    Tiles are XYZ (x, y, z); one tile on the command line is written Z/X/Y.
    """
    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.WARNING
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    if not verbose:
        warnings.showwarning = _one_line_warning
    if verbose < 2:
        logging.getLogger("rasterio").setLevel(max(level, logging.INFO))


# ----------------------------------------------------------------------------- cover


@cli.command()
@click.option("--source", help="Raster (path, http(s) or s3:// URL) whose footprint to cover.")
@aoi_option
@bbox_option
@zoom_option
@click.option("-o", "--output", help="Tile-list file to write (default stdout).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["x-y-z", "z/x/y", "json"]),
    default="x-y-z",
    show_default=True,
    help="Line format of the tile list.",
)
def cover(
    source: str | None,
    aoi: str | None,
    bbox: tuple[float, float, float, float] | None,
    zoom: int,
    output: str | None,
    fmt: TileFormat,
) -> None:
    """Write the tiles at ZOOM that touch a source, an AOI or a bbox.

    Given together, the areas are intersected (e.g. the part of an AOI the image covers).
    """
    from chipscale.grid.cover import cover as cover_tiles

    if source is None and aoi is None and bbox is None:
        raise click.UsageError("give --source, --aoi or --bbox")
    tiles = cover_tiles(zoom, source=source, aoi=aoi, bbox=bbox)
    with _output(output) as handle:
        count = write_tile_list(tiles, handle, fmt)
    click.echo(f"{count} tiles at zoom {zoom}", err=True)


# ----------------------------------------------------------------------------- tile


@cli.command()
@click.argument("source")
@click.argument("tile")
@click.option("-o", "--output", required=True, help="out.npz (data and mask) or out.png.")
@click.option("--size", type=click.IntRange(1, 4096), default=256, show_default=True)
@bands_option
def tile(source: str, tile: str, output: str, size: int, bands: tuple[int, ...] | None) -> None:
    """Write one tile (TILE written Z/X/Y) of SOURCE, for debugging."""
    import numpy as np

    from chipscale.sources.cog import read_tile
    from chipscale.sources.images import to_png

    try:
        parsed = parse_tile(tile, order="zxy")
    except ChipscaleError as exc:
        raise click.BadParameter(str(exc), param_hint="TILE") from None
    suffix = Path(output).suffix.lower()
    if suffix not in (".npz", ".png"):
        raise click.BadParameter("output must end with .npz or .png", param_hint="-o")
    image = read_tile(source, parsed, size=size, bands=bands)
    with _output(output, "wb") as handle:
        if suffix == ".npz":
            np.savez_compressed(handle, data=image.data, mask=image.mask)
        else:
            handle.write(to_png(image))
    valid = float(image.mask.mean()) * 100
    click.echo(
        f"{parsed.z}/{parsed.x}/{parsed.y}: {image.data.shape[0]} bands {image.data.dtype}, "
        f"{valid:.1f}% valid -> {output}",
        err=True,
    )


# ----------------------------------------------------------------------------- run


@cli.command()
@click.option("--source", required=True, help="Raster to run over: path, http(s) or s3:// URL.")
@zoom_option
@aoi_option
@click.option(
    "--tiles",
    "tiles_file",
    type=click.Path(dir_okay=False),
    help="Tile-list file (x-y-z, z/x/y or [x, y, z] lines) instead of the source's cover.",
)
@click.option(
    "--model",
    help="Model file (TorchScript .pt or torch.export .pt2 with chipscale metadata); "
    "default: the bundled demo land-cover model.",
)
@bands_option
@click.option(
    "--job",
    help="Job name (default: SOURCE-NAME-zZOOM). Re-running a job resumes it.",
    callback=_parse_job,
)
@_db_option()
@click.option(
    "--out",
    "out_dir",
    default=DEFAULT_OUT,
    show_default=True,
    help="Directory for results.csv, results.geojson and preview.png.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=2,
    show_default=True,
    help="Worker threads; two or more overlap tile reads with inference.",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    help="Torch threads of the in-process model (default: all cores but one).",
)
@click.option("--no-preview", is_flag=True, help="Skip preview.png.")
def run(
    source: str,
    zoom: int,
    aoi: str | None,
    tiles_file: str | None,
    model: str | None,
    bands: tuple[int, ...] | None,
    job: str | None,
    db: str | None,
    out_dir: str,
    workers: int,
    threads: int | None,
    no_preview: bool,
) -> None:
    """Run a model over every tile of SOURCE at ZOOM and export the results.

    Covers the source (or --aoi within it, or the tiles of --tiles), reads packs of adjacent
    tiles, predicts, stores each tile's result, then writes OUT/results.csv,
    OUT/results.geojson and OUT/preview.png. Interrupt at will: re-running resumes.
    """
    from chipscale.cli.progress import tile_progress
    from chipscale.grid.cover import cover as cover_tiles
    from chipscale.models.predictors import open_predictor
    from chipscale.pipeline.runner import default_model_threads, run_local
    from chipscale.results import open_store, store_files
    from chipscale.results.export import export_results

    if aoi and tiles_file:
        raise click.UsageError("give --aoi or --tiles, not both")
    out = Path(out_dir)
    job = job or default_job_name(source, zoom)
    db = db or f"sqlite:///{out / 'results.db'}"
    written = ["results.csv", "results.geojson"] + ([] if no_preview else ["preview.png"])
    inputs = [source, tiles_file] if tiles_file else [source]
    refuse_overwrite([out / n for n in written], store=store_files(db), inputs=inputs)

    # The model first: a wrong model file fails before any work on the area.
    predictor = open_predictor(model, threads=threads or default_model_threads())
    if not no_preview:  # and what the end needs, before the work, not after
        from chipscale.extras import require

        require("matplotlib", "chipscale run's preview.png (--no-preview skips it)")
    if tiles_file:
        tiles = list(read_tile_list(tiles_file))
        other = {t.z for t in tiles} - {zoom}
        if other:
            raise click.BadParameter(
                f"{tiles_file} has tiles at zoom {sorted(other)}, not {zoom}", param_hint="--tiles"
            )
    else:
        tiles = list(cover_tiles(zoom, source=source, aoi=aoi))
    click.echo(printable(f"{plural(len(tiles), 'tile')} at zoom {zoom} over {source}"), err=True)
    with open_store(db) as store, tile_progress(markup(f"job {job}")) as progress:
        summary = run_local(
            job=job,
            source=source,
            tiles=tiles,
            zoom=zoom,
            predictor=predictor,
            store=store,
            bands=bands,
            workers=workers,
            on_start=progress.start,
            on_progress=progress.advance,
        )
        progress.stop()
        _print_summary(summary, store.counts(job), predictor.info.name, store.url)
        if summary.interrupted:
            click.echo("Interrupted: finished packs are stored; re-run to resume.", err=True)
            sys.exit(130)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("results.csv", "results.geojson"):
            export_results(store, job, out / name)
        if not no_preview:
            from chipscale.results.preview import render_preview

            classes = list(predictor.info.classes)
            render_preview(
                source,
                store.iter_results(job),
                classes,
                out / "preview.png",
                title=f"{job} - {predictor.info.name}",
            )
    click.echo(printable(f"Wrote {', '.join(str(out / n) for n in written)}"), err=True)


def default_job_name(source: str, zoom: int) -> str:
    """A stable job name from the source's file name, so a re-run resumes the same job.

    >>> default_job_name("s3://bucket/dir/scene.tif", 18)
    'scene-z18'
    """
    stem = Path(source.rstrip("/").rsplit("/", 1)[-1]).stem or "job"
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)}-z{zoom}"


def _print_summary(summary: Any, counts: dict[str, int], model_name: str, db: str) -> None:
    """The job as the store has it (a resumed run adds to earlier ones) and this run's share."""
    from rich.table import Table

    from chipscale.results.job_status import remaining

    table = Table(title=cell(f"job {summary.job} ({model_name})"), title_justify="left")
    columns = ("tiles", "ok", "empty", "error", "remaining", "this run", "tiles/s")
    for column in columns:
        table.add_column(column, justify="right")
    table.add_row(
        str(summary.total),
        str(counts["ok"]),
        str(counts["empty"]),
        str(counts["error"]),
        str(remaining(summary.total, counts)),
        str(summary.processed),
        f"{summary.tiles_per_second:.0f}",
    )
    _console().print(table)
    if summary.processed:
        click.echo(
            f"time: {summary.seconds:.1f} s (worker time read {summary.read_seconds:.1f} s, "
            f"predict {summary.predict_seconds:.1f} s, write {summary.write_seconds:.1f} s); "
            f"results in {printable(db)}",
            err=True,
        )
    elif summary.skipped:
        done = "the tile was" if summary.skipped == 1 else f"all {summary.skipped:,} tiles were"
        click.echo(f"Nothing to do: {done} done before.", err=True)


# ----------------------------------------------------------------------------- export


def _db_or_stack(db: str | None, stack: str | None) -> None:
    """Exactly one of ``--db`` and ``--stack``: where the results are."""
    if db and stack:
        raise click.UsageError("give --db or --stack, not both")
    if not db and not stack:
        raise click.UsageError("give --db URL (or DATABASE_URL) or --stack NAME")


stack_option = click.option(
    "--stack",
    help="A deployed stack: the work runs in its operations Lambda, inside the VPC.",
)
region_option = click.option("--region", help="AWS region of --stack (default: AWS_REGION).")


@cli.command("db-setup")
@_db_option()
@stack_option
@region_option
def db_setup(db: str | None, stack: str | None, region: str | None) -> None:
    """Create or migrate the results schema (jobs, results, rejects); safe to run again."""
    _db_or_stack(db, stack)
    if stack:
        from chipscale.ops.operations import StackOperations

        summary = StackOperations.for_stack(stack, region=region).db_setup()
    else:
        from chipscale.results import setup_store

        summary = setup_store(db)  # type: ignore[arg-type]
    click.echo(summary, err=True)


@cli.command()
@_db_option()
@stack_option
@region_option
@click.option("--job", help="Job to export (default: every job).", callback=_parse_job)
@click.option(
    "-o",
    "--output",
    required=True,
    help="results.csv, results.geojson or results.parquet (GeoParquet: the parquet extra).",
)
@class_option
@min_score_option
def download(
    db: str | None,
    stack: str | None,
    region: str | None,
    job: str | None,
    output: str,
    class_name: str | None,
    min_score: float | None,
) -> None:
    """Export results as CSV (one column per class), GeoJSON tile polygons or GeoParquet,
    streamed.

    With --stack the export is written in the VPC to the stack's results bucket, then
    downloaded here with a progress bar (GeoParquet: a CSV export, converted here).
    """
    from chipscale.results.export import export_results, format_for

    _db_or_stack(db, stack)
    from chipscale.results import open_store, store_files

    refuse_overwrite([output], store=store_files(db))
    fmt = format_for(output)
    if stack:
        from chipscale.ops.operations import StackOperations

        answer = StackOperations.for_stack(stack, region=region).download(
            output, fmt=fmt, job=job, class_name=class_name, min_score=min_score
        )
        where = f"s3://{answer['bucket']}/{answer['key']}"
        click.echo(
            printable(f"{plural(answer['rows'], 'row')} -> {output} (from {where})"), err=True
        )
        return
    with open_store(db, create=False) as store:  # type: ignore[arg-type]
        count = export_results(store, job, output, class_name=class_name, min_score=min_score)
    click.echo(printable(f"{plural(count, 'row')} -> {output}"), err=True)


@cli.command()
@_db_option()
@stack_option
@region_option
@click.option("--job", help="One job (default: every job in the store).", callback=_parse_job)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Machine-readable output: {"jobs": [...], "queue": null}, the queue\'s view in '
    '"queue" with --stack.',
)
def status(
    db: str | None, stack: str | None, region: str | None, job: str | None, as_json: bool
) -> None:
    """How far each job is: tiles, pushed, ok, empty, error, remaining and rejected messages.

    With --stack, the queue's view too: messages waiting and in flight in the work queue,
    and the dead-letter queue's depth (packs that failed every retry: see `chipscale redrive`).
    """
    _db_or_stack(db, stack)
    queue: dict[str, Any] | None = None
    if stack:
        from chipscale.ops.operations import StackOperations
        from chipscale.ops.redrive import queue_view
        from chipscale.ops.stack_outputs import aws_session, resolve_stack

        session = aws_session(region)
        outputs = resolve_stack(stack, session=session)
        operations = StackOperations(session, outputs.require("operations_function"))
        queue = queue_view(session.client("sqs"), outputs.queue_url, outputs.dlq_url)
        report = operations.status(job)
        where = f"stack {stack}"
    else:
        from chipscale.results import open_store
        from chipscale.results.job_status import job_reports

        with open_store(db, create=False) as store:  # type: ignore[arg-type]
            report = job_reports(store, job)
            where = store.url
    if as_json:
        # One shape for scripts: the queue is null when the results were read directly.
        click.echo(json.dumps({"jobs": report, "queue": queue}, indent=2))
        return
    from rich.table import Table

    columns = (
        "job", "zoom", "model", "tiles", "pushed", "ok", "empty", "error", "remaining", "rejected"
    )  # fmt: skip
    table = Table(title=cell(f"jobs in {where}"), title_justify="left")
    for column in columns:
        table.add_column(column, justify="left" if column in ("job", "model") else "right")
    for row in report:
        table.add_row(*(cell("-" if row.get(c) is None else row[c]) for c in columns))
    _console().print(table)
    if queue is not None:
        from chipscale.ops.redrive import describe_queue_view

        for line in describe_queue_view(queue, stack=stack):
            click.echo(line)  # whole lines: a console would wrap the redrive hint


@cli.command("convert-geojson")
@click.argument("csv_file", type=click.Path(dir_okay=False))
@click.argument("geojson_file", type=click.Path(dir_okay=False))
@class_option
@min_score_option
def convert_geojson(
    csv_file: str, geojson_file: str, class_name: str | None, min_score: float | None
) -> None:
    """Turn a downloaded results CSV into GeoJSON tile polygons (chip-n-scale's command)."""
    from chipscale.results.export import csv_to_geojson

    refuse_overwrite([geojson_file], inputs=[csv_file])
    count = csv_to_geojson(csv_file, geojson_file, class_name=class_name, min_score=min_score)
    click.echo(f"{count} features -> {geojson_file}", err=True)


# ----------------------------------------------------------------------------- model


@cli.group()
def model() -> None:
    """Inspect and package model files."""


@model.command("info")
@click.argument("path", type=click.Path(dir_okay=False))
def model_info(path: str) -> None:
    """Print the metadata a model file carries (name, version, classes, bands, scaling)."""
    from chipscale.models.predictors import read_model_metadata

    click.echo(json.dumps(read_model_metadata(path), indent=2))


def _serving_options(fn: Any) -> Any:
    """The model-config knobs of a .mar (see chipscale.models.serving.ServingConfig)."""
    from chipscale.models.serving import ServingConfig

    d = ServingConfig()
    options = [
        click.option("--batch-size", type=click.IntRange(1), default=d.batch_size,
                     show_default=True, help="Requests TorchServe groups into one handler call."),
        click.option("--max-batch-delay", type=click.IntRange(0), default=d.max_batch_delay_ms,
                     show_default=True, help="Milliseconds TorchServe waits to fill a batch."),
        click.option("--workers", type=click.IntRange(1), default=d.workers, show_default=True,
                     help="Starting workers (GPU hosts scale to workers-per-GPU x GPUs)."),
        click.option("--response-timeout", type=click.IntRange(1),
                     default=d.response_timeout_s, show_default=True,
                     help="Seconds before TorchServe gives up on a handler call."),
        click.option("--sub-batch", type=click.IntRange(1), default=d.sub_batch,
                     show_default=True, help="Tiles the handler runs through the model at once."),
        click.option("--threads", type=click.IntRange(1), default=d.threads, show_default=True,
                     help="Torch CPU threads per worker (no GPU)."),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


def _serving_config(options: dict[str, Any]) -> Any:
    from chipscale.models.serving import ServingConfig

    return ServingConfig(
        batch_size=options["batch_size"],
        max_batch_delay_ms=options["max_batch_delay"],
        workers=options["workers"],
        response_timeout_s=options["response_timeout"],
        sub_batch=options["sub_batch"],
        threads=options["threads"],
    )


@model.command("package")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", help="TorchServe model name, only if the file has none.")
@click.option("--version", "version", help="Model version, only if the file has none.")
@click.option("-o", "--out-dir", type=click.Path(file_okay=False), default=".",
              show_default=True, help="Where to write NAME.mar.")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace an existing archive.")
@_serving_options
def model_package(
    path: str, name: str | None, version: str | None, out_dir: str, force: bool, **knobs: Any
) -> None:
    """Build a TorchServe archive (.mar) of a model file for the GPU hosts.

    The archive holds the chipscale handler, the model runtime, the model (its metadata
    inside: the file is the source of truth, --name and --version only fill gaps) and a
    model-config with the knobs below, set for one GPU by default.
    """
    from chipscale.models.serving import package_model

    config = _serving_config(knobs)
    mar = package_model(path, out_dir, name=name, version=version, config=config, force=force)
    click.echo(str(mar))
    click.echo(config.to_yaml().rstrip(), err=True)


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address inference and metrics listen on (management stays on loopback).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True,
              help="Inference port (management and metrics take the next two).")  # fmt: skip
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="Logs, pid file and sockets (default .chipscale/serve/TIME).")  # fmt: skip
@_serving_options
def serve(model_path: str, host: str, port: int, run_dir: str | None, **knobs: Any) -> None:
    """Serve MODEL (a .mar, or a .pt/.pt2 file packaged on the fly) with a local TorchServe.

    Started with model_server/config.properties, the GPU hosts' file; returns control only
    once every worker is READY; Ctrl-C, SIGTERM and SIGHUP stop TorchServe and its workers.
    Ports already in use are refused.
    """
    from chipscale.models.serving import (
        TorchServe,
        default_run_dir,
        exit_on_termination,
        package_model,
    )

    run = Path(run_dir) if run_dir else default_run_dir()
    mar = Path(model_path)
    if mar.suffix != ".mar":
        config = _serving_config(knobs)
        mar = package_model(mar, run / "packaged", config=config, force=True)
    server = TorchServe(
        mar, run, host=host, inference_port=port, management_port=port + 1, metrics_port=port + 2
    )
    click.echo(f"Starting TorchServe for {mar.name} (logs in {run / 'logs'})...", err=True)
    with exit_on_termination():
        try:
            server.start()
            click.echo(f"Ready: {server.predictions_url}", err=True)
            click.echo(f"  chipscale run --model {server.predictions_url} ...", err=True)
            click.echo(f"  metrics: {server.metrics_url}/metrics   Ctrl-C stops.", err=True)
            assert server.process is not None
            code = server.process.wait()
            raise ChipscaleError(f"TorchServe stopped (launcher exit {code}); see {run / 'logs'}")
        finally:
            server.stop()


# ----------------------------------------------------------------------------- verify


@cli.command()
@click.option("--stack", help="Deployed stack to check (its CloudFormation outputs name it all).")
@click.option("--endpoint", help="Check this predictions URL directly (a tunnel, a local serve).")
@click.option(
    "--db",
    callback=_remember_secrets,
    help="Check this postgresql:// database directly (a tunnel, local runs).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify(stack: str | None, endpoint: str | None, db: str | None, as_json: bool) -> None:
    """Smoke-test a deployment: queue, dead-letter queue, event source, worker function, GPU
    fleet, vCPU and Lambda quotas, model endpoint (one real-size tile scored) and database
    schema. Exits 1 naming each failed check.

    \b
    With --stack, the endpoint and database checks run inside the VPC through the stack's
    operations Lambda, unless --endpoint / --db say where to reach them from here.
    """
    from rich.table import Table

    from chipscale.ops.stack_outputs import aws_session, resolve_stack
    from chipscale.ops.verify import direct_checks, failures, run_checks, stack_checks

    if not (stack or endpoint or db):
        raise click.UsageError("give --stack, or --endpoint and/or --db")
    if stack:
        session = aws_session()
        outputs = resolve_stack(stack, session=session)
        checks = stack_checks(outputs, session, endpoint_url=endpoint, db_url=db)
    else:
        checks = direct_checks(endpoint, db)
    results = run_checks(checks)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        table = Table(title=f"verify {stack or 'direct'}", title_justify="left")
        for column in ("check", "ok", "detail"):
            table.add_column(column)
        for r in results:
            table.add_row(r.name, "ok" if r.ok else "[red]FAIL[/red]", cell(r.detail))
        _console().print(table)
    failed = failures(results)
    if failed:
        raise ChipscaleError(f"verify failed: {', '.join(failed)}")


# ----------------------------------------------------------------------------- push
# `chipscale push` and chip-n-scale's `sqs-push` (sqs_push_main). The library is
# chipscale.cloud.push; this section only parses, resolves the queue and prints.


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
) -> Any:
    """The tiles to push: a tile list (``-`` is stdin), or the cover of the source's
    footprint, the AOI and the bbox intersected (as ``chipscale cover`` does)."""
    from chipscale.cloud.push import is_xyz_template
    from chipscale.grid.tilelist import read_tile_stream

    if tiles_file is not None:
        if aoi or bbox:
            raise click.UsageError("give a tile list or --aoi/--bbox, not both")
        if tiles_file == "-":
            return read_tile_stream(click.get_binary_stream("stdin"), name="<stdin>")
        return read_tile_list(tiles_file)
    footprint = source if source is not None and not is_xyz_template(source) else None
    if footprint is None and aoi is None and bbox is None:
        raise click.UsageError(
            "give TILES (a tile list), or --zoom with --aoi, --bbox or a --source raster to cover"
            + (" (an XYZ --source has no footprint)" if source else "")
        )
    if zoom is None:
        raise click.UsageError("--zoom is needed to cover an area")
    from chipscale.grid.cover import cover as cover_tiles

    return cover_tiles(zoom, source=footprint, aoi=aoi, bbox=bbox)


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
        from chipscale.ops.stack_outputs import aws_session, resolve_stack

        outputs = resolve_stack(stack, session=aws_session(region))
        return outputs.queue_url, outputs.region
    from chipscale.cloud.push import region_from_queue_url

    assert queue_url is not None
    return queue_url, region or region_from_queue_url(queue_url)


def _push_jobs(db: str | None, stack: str | None, region: str | None) -> Any:
    """Where the push records its job and finds the done tiles of a resume: ``--db``
    directly, else the stack's operations Lambda (the database is private); None: nowhere."""
    if db:
        from chipscale.cloud.push import StoreJobs

        return StoreJobs(db)
    if stack:
        from chipscale.ops.operations import StackOperations

        return StackOperations.for_stack(stack, region=region)
    return None


def _push_summary_line(summary: Any) -> str:
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
    jobs: Any, job: str, source: str | None, plan: Any, summary: Any, **details: Any
) -> None:
    """Record the job (see chipscale.cloud.push.record_job), or say it was not."""
    from chipscale.cloud.push import push_record

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
        extra=push_record(summary, **details),
    )


@cli.command()
@click.argument("tiles_file", metavar="[TILES]", required=False)
@click.argument("queue_url", metavar="[QUEUE_URL]", required=False)
@click.option("--stack", help="Push to this deployed stack's queue (from its outputs).")
@click.option(
    "--source",
    help="What the worker reads: a COG (path, http(s) or s3:// URL) or an XYZ tile URL "
    "template https://host/{z}/{x}/{y}.jpg. Without TILES, a COG's footprint is covered.",
)
@click.option(
    "--worker-source",
    is_flag=True,
    help="Without --source, send messages with no source: the worker reads its configured "
    "default (CHIPSCALE_DEFAULT_SOURCE), as chip-n-scale did. On by default for sqs-push.",
)
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
    type=click.IntRange(1, 1024),
    default=100,
    show_default=True,
    help="Tiles a message carries; above 100, raise the worker's CHIPSCALE_MAX_TILES_PER_MESSAGE.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    default=8,
    show_default=True,
    help="SendMessageBatch calls in flight (chip-n-scale's PROMISE_THRESHOLD).",
)
@_db_option()
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

    tiles_file, queue_url = _push_inputs(tiles_file, queue_url)
    if source is not None:
        try:
            push_lib.validate_source(source)
        except ChipscaleError as exc:
            raise click.BadParameter(str(exc), param_hint="--source") from None
    elif not worker_source:
        raise click.UsageError(
            "give --source (the COG or XYZ URL the worker reads), or --worker-source to use "
            "the worker's configured default source"
        )
    if job is not None:
        try:
            push_lib.validate_job(job)
        except ChipscaleError as exc:
            raise click.BadParameter(str(exc), param_hint="--job") from None
    if resume and not (db or stack):
        raise click.UsageError("--resume needs --db (or DATABASE_URL) or --stack: the results")
    tiles = _push_tiles(tiles_file, zoom=zoom, source=source, aoi=aoi, bbox=bbox)
    queue_url, region = _push_queue(queue_url, stack, region, dry_run)
    jobs = _push_jobs(db, stack, region) if (resume or not dry_run) else None
    if max_tiles_per_message > push_lib.DEFAULT_MAX_TILES:
        click.echo(
            f"Note: messages of up to {max_tiles_per_message} tiles: the worker must run with "
            f"CHIPSCALE_MAX_TILES_PER_MESSAGE >= {max_tiles_per_message}",
            err=True,
        )
    name = "<stdin>" if tiles_file == "-" else tiles_file or "cover"
    with push_lib.plan_push(tiles, zoom=zoom, name=name) as plan:
        job = job or _push_job_name(source, tiles_file, aoi, plan.zoom)
        if resume:
            plan.skip_done(jobs.done_tiles(job))
        sender = None
        if not dry_run:
            assert queue_url is not None
            client = push_lib.sqs_client(
                region=region, endpoint_url=endpoint_url, concurrency=concurrency
            )
            sender = push_lib.BatchSender(client, queue_url)
            _record_push(jobs, job, source, plan, None, queue=queue_url)
        details = {"queue": queue_url, "max_tiles_per_message": max_tiles_per_message}
        try:
            summary = _run_push(plan, job, source, sender, max_tiles_per_message, concurrency)
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
    plan: Any, job: str, source: str | None, sender: Any, max_tiles: int, concurrency: int
) -> Any:
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


def sqs_push_main(argv: Sequence[str] | None = None) -> None:
    """chip-n-scale's ``sqs-push TILES QUEUE_URL``: ``chipscale push`` with
    ``--worker-source`` on, so a call without --source works as it did (the worker reads its
    configured imagery)."""
    args = list(argv) if argv is not None else sys.argv[1:]
    cli.main(
        args=["push", *args],
        prog_name="chipscale",
        default_map={"push": {"worker_source": True}},
    )


# ----------------------------------------------------------------------------- redrive
# `chipscale redrive`: the dead-letter queue's messages back into the work queue. The
# library is chipscale.ops.redrive; this section resolves the queues, counts, asks and prints.


def _can_prompt() -> bool:
    """Whether someone can answer a confirmation: stdin is a terminal."""
    return sys.stdin.isatty()


def _redrive_queues(
    stack: str | None, dlq_url: str | None, queue_url: str | None, region: str | None
) -> tuple[Any, str, str]:
    """An SQS client and the (dead-letter queue, queue) URLs: the stack's outputs, or the
    two URLs given (the region then defaults to the one the DLQ's URL names)."""
    from chipscale.ops.redrive import sqs_errors
    from chipscale.ops.stack_outputs import aws_session, resolve_stack

    if stack and (dlq_url or queue_url):
        raise click.UsageError("give --stack, or --dlq and --queue, not both")
    if stack:
        session = aws_session(region)
        outputs = resolve_stack(stack, session=session)
        return session.client("sqs"), outputs.dlq_url, outputs.queue_url
    if not (dlq_url and queue_url):
        raise click.UsageError("give --stack NAME, or --dlq URL and --queue URL")
    from chipscale.cloud.push import region_from_queue_url

    session = aws_session(region or region_from_queue_url(dlq_url))
    with sqs_errors("dead-letter queue", dlq_url):  # no region: one line, not a traceback
        return session.client("sqs"), dlq_url, queue_url


@contextmanager
def _redrive_progress(description: str) -> Iterator[Any]:
    """A progress bar on stderr fed ``(moved, total)``; gone when the redrive ends."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(
        *columns,
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,  # no stray blank line in a log or a pipe
    ) as progress:
        task = progress.add_task(description, total=None)

        def update(moved: int, total: int | None) -> None:
            progress.update(task, completed=moved, total=total)

        yield update


def _redrive_summary_line(summary: Any) -> str:
    """The end-of-redrive line: moved, failed, seconds, and the way they moved."""
    from chipscale.ops.redrive import queue_name

    if summary.method == "move-task":
        how = f"SQS message move task {summary.task_status}"
    else:
        how = "received and re-sent" + (
            f" ({summary.fallback_reason})" if summary.fallback_reason else ""
        )
    return (
        f"moved {plural(summary.moved, 'message')} from {queue_name(summary.dlq_url)} to "
        f"{queue_name(summary.queue_url)}, {summary.failed:,} failed, {summary.seconds:.1f} s; "
        f"{how}"
    )


@cli.command("redrive")
@click.option("--stack", help="Redrive this deployed stack's dead-letter queue into its queue.")
@click.option(
    "--dlq", "dlq_url", metavar="URL", help="Dead-letter queue URL (with --queue; no stack)."
)
@click.option(
    "--queue", "queue_url", metavar="URL", help="Queue URL the messages go back to (with --dlq)."
)
@click.option("--region", help="AWS region (default: the one --dlq's URL names, then AWS_REGION).")
@click.option("--yes", "-y", is_flag=True, help="Move without asking (scripts, no terminal).")
@click.option(
    "--max",
    "max_messages",
    type=click.IntRange(1),
    metavar="N",
    help="Move at most N messages (by receive and re-send: a move task moves them all).",
)
@click.option(
    "--peek",
    "peek_count",
    type=click.IntRange(1, 1000),
    metavar="N",
    help="Print N dead-letter messages as JSON lines (id, sent, receives, job, tiles, body) "
    "and move nothing.",
)
@click.option(
    "--method",
    type=click.Choice(["auto", "move-task", "receive"]),
    default="auto",
    show_default=True,
    help="move-task: SQS's StartMessageMoveTask (server-side, keeps message ids); receive: "
    "receive, re-send, delete what was re-sent; auto: move-task, else receive.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def redrive_command(
    stack: str | None,
    dlq_url: str | None,
    queue_url: str | None,
    region: str | None,
    yes: bool,
    max_messages: int | None,
    peek_count: int | None,
    method: str,
    as_json: bool,
) -> None:
    """Move the dead-letter queue's messages back to the work queue, once the cause of
    their failures is fixed.

    \b
    Counts the dead-letter queue, then asks (--yes for scripts):
      chipscale redrive --stack chipscale --peek 5     # look first: moves nothing
      chipscale redrive --stack chipscale
      chipscale redrive --dlq URL --queue URL --yes --max 100
    SQS's own message move task does the work where it can; otherwise messages are
    received, re-sent and deleted once re-sent (a failed send stays in the dead-letter
    queue). Each message moves once per run; a message whose delete failed may be sent
    again by a later run, which the worker's idempotent writes absorb. Exits 1 when
    messages could not be moved.
    """
    from chipscale.ops.redrive import RedriveAborted, inspect_pair, peek, queue_name, redrive

    if method == "move-task" and max_messages is not None:
        raise click.UsageError("--max needs --method receive (or auto): a move task moves all")
    sqs, dlq, queue = _redrive_queues(stack, dlq_url, queue_url, region)
    pair = inspect_pair(sqs, dlq, queue)
    dlq_name, queue_name_ = queue_name(dlq), queue_name(queue)
    if peek_count is not None:
        messages = peek(sqs, dlq, peek_count)
        for message in messages:
            click.echo(json.dumps(message.to_dict()))
        click.echo(
            f"{len(messages)} of {plural(pair.dlq.visible, 'message')} of {dlq_name} shown; "
            "nothing moved",
            err=True,
        )
        return
    in_flight = f" ({pair.dlq.in_flight:,} more in flight)" if pair.dlq.in_flight else ""
    click.echo(
        f"dead-letter queue {dlq_name}: {plural(pair.to_move, 'message')}{in_flight}; "
        f"queue {queue_name_}: {pair.queue.visible:,} waiting",
        err=True,
    )
    if pair.to_move == 0:
        click.echo("Nothing to move.", err=True)
        return
    count = min(pair.to_move, max_messages) if max_messages else pair.to_move
    if not yes:
        if not _can_prompt():
            raise click.UsageError(
                f"no terminal to confirm moving {plural(count, 'message')}: pass --yes to move them"
            )
        if not click.confirm(
            f"Move {plural(count, 'message')} from {dlq_name} back to {queue_name_}?", err=True
        ):
            click.echo("Nothing moved.", err=True)
            raise click.exceptions.Exit(1)
    try:
        with _redrive_progress(f"redrive {dlq_name}") as progress:
            summary = redrive(
                sqs,
                pair,
                method=method,  # type: ignore[arg-type]
                max_messages=max_messages,
                on_progress=progress,
            )
    except RedriveAborted as exc:
        click.echo(_redrive_summary_line(exc.summary), err=True)
        raise
    click.echo(_redrive_summary_line(summary), err=True)
    if summary.undeleted:
        click.echo(
            f"Warning: {plural(summary.undeleted, 'message')} went to {queue_name_} but their "
            "delete "
            f"from {dlq_name} failed: a later redrive sends them again (harmless: the worker's "
            "writes are idempotent)",
            err=True,
        )
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
    if not summary.ok:
        raise ChipscaleError(
            f"{plural(summary.failed, 'message')} could not be moved (still in {dlq_name}): "
            f"{'; '.join(summary.failure_reasons)}; run redrive again to retry them"
        )


# ----------------------------------------------------------------------------- monitor and tune
# `chipscale monitor` (chip-n-scale's gpu-monitor) and `chipscale tune`. The library is
# chipscale.ops.monitor (what is read), chipscale.ops.diagnosis (the regimes) and
# chipscale.ops.tune (the per-GPU concurrency); this section resolves the stack, renders and
# writes.


def _monitor_stack(stack: str, region: str | None) -> tuple[Any, Any, Any]:
    """(session, stack outputs, clients): one-line errors for a missing stack or
    credentials come from chipscale.ops.stack_outputs."""
    from chipscale.ops.monitor import Clients
    from chipscale.ops.stack_outputs import aws_session, resolve_stack

    session = aws_session(region)
    outputs = resolve_stack(stack, session=session)
    return session, outputs, Clients.from_session(session)


def _fmt(value: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _duration(seconds: float | None) -> str:
    """12 s, 14 min, 3 h 05 min, 2 d 4 h."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    hours, rest = divmod(int(minutes), 60)
    return f"{hours} h {rest:02d} min" if hours < 48 else f"{hours // 24} d {hours % 24} h"


_REGIME_STYLE = {
    "far-above": "bold red",
    "failing": "bold red",
    "slightly-above": "bold yellow",
    "below": "bold yellow",
    "no-gpu": "bold yellow",
    "balanced": "bold green",
    "idle": "bold cyan",
}


def render_monitor(snapshot: Any, diagnosis: Any, recommendation: Any = None) -> Any:
    """The monitor's view as one rich renderable: per-GPU rows, queue, Lambda, TorchServe
    (when read), the diagnosis with its numbers and action, the tune line and warnings."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    window = snapshot.window
    span = f"{window.start:%H:%M}-{window.end:%H:%M} UTC, {window.seconds / 60:.0f} min"
    fleet = snapshot.fleet
    gpus = Table(
        title=(
            f"GPUs: {fleet.gpus_in_service} in service on {fleet.instances_in_service} of "
            f"{len(fleet.instances)} instances (group {fleet.min_size}-{fleet.max_size}, "
            f"desired {fleet.desired})"
        ),
        title_justify="left",
    )
    for column in ("instance", "gpu", "type", "state", "util %", "last %", "mem %", "mem MiB"):
        gpus.add_column(
            column,
            justify="left" if column in ("instance", "type", "state") else "right",
            no_wrap=True,
        )
    gpus.add_column("source")
    for gpu in snapshot.gpus:
        state = gpu.state or "-"
        if not gpu.in_service:
            state = f"[dim]{state}[/dim]"
        memory = _fmt(gpu.memory_used_mb)
        if gpu.memory_total_mb:
            memory += f" / {gpu.memory_total_mb:,.0f}"
        gpus.add_row(
            gpu.instance_id,
            str(gpu.index),
            gpu.instance_type or "-",
            state,
            _fmt(gpu.utilization, ".0f"),
            _fmt(gpu.utilization_last, ".0f"),
            _fmt(gpu.memory_utilization, ".0f"),
            memory,
            gpu.source or "-",
        )
    queue, worker = snapshot.queue, snapshot.worker
    figures = Table(title="queue and worker Lambda", title_justify="left", show_header=False)
    figures.add_column("queue", style="bold")
    figures.add_column("", justify="right")
    figures.add_column("Lambda", style="bold")
    figures.add_column("", justify="right")
    remaining = _fmt(queue.remaining_tiles)
    if queue.remaining_source:
        remaining += f" ({queue.remaining_source})"
    dlq = _fmt(queue.dlq_depth)
    if queue.dlq_growth:
        dlq += f" ({queue.dlq_growth:+,.0f})"
    limit = _fmt(worker.maximum_concurrency)
    if worker.reserved_concurrency:
        limit += f" (reserved {worker.reserved_concurrency})"
    errors = f"{worker.errors:,.0f} / {worker.throttles:,.0f}"
    p50, p95 = _seconds(worker.duration_p50_ms), _seconds(worker.duration_p95_ms)
    mean = _seconds(worker.duration_mean_ms)
    percentiles = f"{_fmt(p50, '.1f')} / {_fmt(p95, '.1f')} s"
    timing = f"{_fmt(mean, '.1f')} / {_fmt(worker.timeout_s)} s"
    concurrency = f"{_fmt(worker.concurrency_max)} / {_fmt(worker.concurrency_mean)}"
    per_gpu = _fmt(worker.per_gpu_concurrency)
    rows = [
        ("visible", _fmt(queue.visible), "mapping", worker.mapping_state or "-"),
        ("in flight", _fmt(queue.in_flight), "MaximumConcurrency", limit),
        ("oldest message", _duration(queue.oldest_age_s), "per-GPU", per_gpu),
        ("dead letters", dlq, "concurrency max / mean", concurrency),
        ("tiles/s", _fmt(queue.tiles_per_s, ",.1f"), "invocations", _fmt(worker.invocations)),
        ("tiles/message", _fmt(queue.tiles_per_message, ",.1f"), "errors / throttles", errors),
        ("remaining tiles", remaining, "duration p50 / p95", percentiles),
        ("ETA", _duration(queue.eta_s), "duration mean / timeout", timing),
    ]
    for row in rows:
        figures.add_row(*row)
    parts: list[Any] = [
        Text(f"chipscale monitor: stack {snapshot.stack} ({snapshot.region}), {span}"),
        gpus,
        figures,
    ]
    if snapshot.torchserve:
        served = Table(title="TorchServe (Prometheus)", title_justify="left")
        for column in (
            "target",
            "instance",
            "requests",
            "inference ms",
            "queue ms",
            "5xx",
            "error",
        ):
            served.add_column(column)
        for m in snapshot.torchserve:
            served.add_row(
                m.target,
                m.instance_id or "-",
                _fmt(m.requests),
                _fmt(m.mean_inference_ms, ",.1f"),
                _fmt(m.mean_queue_ms, ",.1f"),
                _fmt(m.responses.get("5xx")),
                m.error or "",
            )
        parts.append(served)
    regime = str(diagnosis.regime)
    body = Text()
    body.append(f"{diagnosis.title}\n", style=_REGIME_STYLE.get(regime, "bold"))
    body.append(f"why:    {diagnosis.reason}\n")
    body.append(f"action: {diagnosis.action}")
    for note in diagnosis.notes:
        body.append(f"\nnote:   {note}", style="dim")
    if recommendation is not None:
        target = recommendation.target
        body.append(
            f"\ntune:   per-GPU {target.per_gpu} (now {target.current_per_gpu}), "
            f"MaximumConcurrency {_fmt(target.maximum_concurrency)} "
            f"(now {_fmt(target.current_maximum_concurrency)})"
        )
    parts.append(Panel(body, title=f"diagnosis: {regime}", title_align="left"))
    for warning in snapshot.warnings:
        parts.append(Text(f"warning: {warning}", style="yellow"))
    return Group(*parts)


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def _tune_quietly(snapshot: Any) -> Any:
    """The tune recommendation when the window allows one (the monitor shows it), else None."""
    from chipscale.ops.tune import NotEnoughData, recommend

    try:
        return recommend(snapshot)
    except NotEnoughData:
        return None


def _monitor_document(snapshot: Any, diagnosis: Any, recommendation: Any) -> dict[str, Any]:
    return {
        "snapshot": snapshot.to_dict(),
        "diagnosis": diagnosis.to_dict(),
        "tune": recommendation.to_dict() if recommendation is not None else None,
    }


def since_option(help_text: str) -> Any:
    """``--since MINUTES``: the CloudWatch window monitor and tune read."""
    return click.option(
        "--since",
        type=click.IntRange(1, 24 * 60),
        default=15,
        show_default=True,
        metavar="MINUTES",
        help=help_text,
    )


@cli.command()
@click.option("--stack", required=True, help="The deployed stack to watch (from its outputs).")
@region_option
@since_option("Window the figures cover, in 1-minute periods.")
@click.option(
    "--watch",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Refresh in place every SECONDS (Ctrl-C stops).",
)
@click.option(
    "--json", "as_json", is_flag=True,
    help="One JSON document (snapshot, diagnosis, tune) on stdout; one a line with --watch.",
)  # fmt: skip
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    metavar="FILE.png",
    help="Also draw GPU utilisation per GPU and tiles/s over the last --plot-hours.",
)
@click.option(
    "--plot-hours",
    type=click.FloatRange(0.1, 24 * 14),
    default=3.0,
    show_default=True,
    metavar="HOURS",
    help="Hours --plot covers.",
)
@click.option("--job", help="Count the ETA from this job's remaining tiles (operations Lambda).")
@click.option(
    "--scrape",
    type=click.Choice(["off", "direct", "lambda"]),
    default="off",
    show_default=True,
    help="Also read TorchServe's Prometheus metrics of the hosts: 'direct' from inside the "
    "VPC, 'lambda' through the stack's operations Lambda.",
)
@click.option(
    "--metrics-url",
    multiple=True,
    metavar="[INSTANCE=]URL",
    help="Also read this TorchServe metrics endpoint (a tunnel, a local serve); INSTANCE= "
    "ties its GPU figures to that instance. Repeatable.",
)
@click.option("--iterations", type=click.IntRange(min=1), hidden=True)
def monitor(
    stack: str,
    region: str | None,
    since: int,
    watch: float | None,
    as_json: bool,
    plot: str | None,
    plot_hours: float,
    job: str | None,
    scrape: str,
    metrics_url: tuple[str, ...],
    iterations: int | None,
) -> None:
    """GPU use, queue and worker Lambdas of a deployed stack, and what to tune.

    \b
    Names the regime (concurrency far above / slightly above / below GPU capacity,
    balanced, idle, no GPU in service, failing) with the numbers behind it and the action.
    Data on stdout; exit 0 whatever the regime (it is a view, not a check).
    \b
      chipscale monitor --stack chipscale --watch 30
      chipscale monitor --stack chipscale --json | jq .diagnosis.regime
    """
    import time
    from datetime import timedelta

    from chipscale.ops.diagnosis import diagnose
    from chipscale.ops.monitor import collect, collect_history, scraper_for, since_previous
    from chipscale.ops.monitor import plot as draw

    session, outputs, clients = _monitor_stack(stack, region)
    scraper = scraper_for(
        scrape,
        metrics_url,
        lambda_client=clients.lambda_client,
        operations_function=outputs.operations_function,
    )
    remaining = None
    if job:
        from chipscale.ops.operations import StackOperations

        operations = StackOperations(session, outputs.require("operations_function"))
        rows = operations.status(job)
        if not rows:
            raise ChipscaleError(f"no job {job!r} in stack {stack}'s results")
        remaining = float(rows[0]["remaining"])

    def view(previous: Any) -> tuple[Any, Any, Any]:
        snapshot = collect(
            outputs,
            clients,
            since=timedelta(minutes=since),
            remaining_tiles=remaining,
            scraper=scraper,
        )
        snapshot = since_previous(snapshot, previous)
        return snapshot, diagnose(snapshot), _tune_quietly(snapshot)

    snapshot, diagnosis, recommendation = view(None)
    if plot:
        history = collect_history(outputs, clients, snapshot.fleet, hours=plot_hours)
        draw(history, plot, title=f"chipscale {stack}: last {plot_hours:g} h")
        click.echo(f"plot -> {plot}", err=True)
    console = _console()
    if watch is None:
        if as_json:
            click.echo(json.dumps(_monitor_document(snapshot, diagnosis, recommendation), indent=2))
        else:
            console.print(render_monitor(snapshot, diagnosis, recommendation))
        return
    done = 0
    live = None
    if not as_json and console.is_terminal:
        from rich.live import Live

        live = Live(console=console, auto_refresh=False, transient=False)
        live.start()
    try:
        while True:
            if as_json:
                document = _monitor_document(snapshot, diagnosis, recommendation)
                click.echo(json.dumps(document))
            elif live is not None:
                live.update(render_monitor(snapshot, diagnosis, recommendation), refresh=True)
            else:  # a pipe or a log file: one view after the other
                console.rule()
                console.print(render_monitor(snapshot, diagnosis, recommendation))
            done += 1
            if iterations is not None and done >= iterations:
                return
            time.sleep(watch)
            snapshot, diagnosis, recommendation = view(snapshot)
    finally:
        if live is not None:
            live.stop()


@cli.command()
@click.option("--stack", required=True, help="The deployed stack to tune (from its outputs).")
@region_option
@since_option("Window to measure, in 1-minute periods.")
@click.option(
    "--per-gpu",
    type=click.IntRange(1, 1000),
    help="Set this per-GPU concurrency instead of computing it.",
)
@click.option(
    "--apply", "apply_", is_flag=True,
    help="Write the SSM per-GPU parameter and the mapping's MaximumConcurrency now.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def tune(
    stack: str,
    region: str | None,
    since: int,
    per_gpu: int | None,
    apply_: bool,
    as_json: bool,
) -> None:
    """The per-GPU Lambda concurrency that keeps the GPUs fed without overload.

    \b
    Little's law on the measured run: Lambdas per GPU = tiles/s of a saturated GPU x the
    seconds a Lambda spends per tile (TorchServe's queue wait taken out) x 1.2 headroom.
    The fleet controller multiplies it by the GPUs in service. Without --apply nothing is
    written; with it, the SSM parameter (the controller's source of truth) and the event
    source mapping's MaximumConcurrency (2..1000, at most the reserved concurrency).
    """
    from datetime import timedelta

    from chipscale.ops.monitor import collect
    from chipscale.ops.tune import apply, recommend, target_for, target_lines

    _session, outputs, clients = _monitor_stack(stack, region)
    snapshot = collect(outputs, clients, since=timedelta(minutes=since))
    recommendation = None
    if per_gpu is not None:
        target = target_for(per_gpu, snapshot)
        lines = target_lines(target)
    else:
        recommendation = recommend(snapshot)
        target = recommendation.target
        lines = recommendation.lines()
    applied = apply(target, outputs, clients) if apply_ else None
    if as_json:
        from dataclasses import asdict

        document = {
            "stack": stack,
            "recommendation": recommendation.to_dict() if recommendation else None,
            "target": asdict(target),
            "applied": applied.to_dict() if applied else None,
        }
        click.echo(json.dumps(document, indent=2))
    else:
        for line in lines:
            click.echo(line)
        for line in applied.lines() if applied else ():
            click.echo(line)
    if applied is None:
        click.echo("nothing written: --apply writes the parameter and the mapping", err=True)


# ----------------------------------------------------------------------------- entry points


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="chipscale")


if __name__ == "__main__":
    main()
