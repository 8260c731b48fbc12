"""Commands on a results store: ``db-setup``, ``download``, ``status`` and
``convert-geojson`` (directly with ``--db``, or through a stack's operations Lambda)."""

from __future__ import annotations

import json
from typing import Any

import click

from chipscale.atomic import refuse_overwrite
from chipscale.cli.options import (
    class_option,
    console,
    db_option,
    min_score_option,
    parse_job,
    region_option,
    stack_option,
)
from chipscale.safe_text import cell, plural, printable


def _db_or_stack(db: str | None, stack: str | None) -> None:
    """Exactly one of ``--db`` and ``--stack``: where the results are."""
    if db and stack:
        raise click.UsageError("give --db or --stack, not both")
    if not db and not stack:
        raise click.UsageError("give --db URL (or DATABASE_URL) or --stack NAME")


@click.command("db-setup")
@db_option()
@stack_option
@region_option
def db_setup(db: str | None, stack: str | None, region: str | None) -> None:
    """Create or migrate the results schema (jobs, results, rejects); safe to run again."""
    _db_or_stack(db, stack)
    if stack:
        from chipscale.ops.operations_client import StackOperations

        summary = StackOperations.for_stack(stack, region=region).db_setup()
    else:
        from chipscale.results import setup_store

        assert db is not None  # _db_or_stack: no --stack, so a --db
        summary = setup_store(db)
    click.echo(summary, err=True)


@click.command()
@db_option()
@stack_option
@region_option
@click.option("--job", help="Job to export (default: every job).", callback=parse_job)
@click.option(
    "-o",
    "--output",
    required=True,
    help="results.csv, .geojson, .parquet (GeoParquet), .fgb (FlatGeobuf; these two: the "
    "parquet extra), or mask.tif (a segmentation job's class mask as a COG).",
)
@click.option(
    "--layer",
    type=click.Choice(["tiles", "features"]),
    help="tiles: one row per tile; features: one polygon per region merged across tiles "
    "(the default for a segmentation job, except CSV).",
)
@class_option
@min_score_option
def download(
    db: str | None,
    stack: str | None,
    region: str | None,
    job: str | None,
    output: str,
    layer: str | None,
    class_name: str | None,
    min_score: float | None,
) -> None:
    """Export results as CSV (one column per class), GeoJSON tile polygons or GeoParquet,
    streamed; for a segmentation job, its regions merged across tile borders (GeoJSON,
    GeoParquet, FlatGeobuf) or its class mask (a .tif COG).

    With --stack the export is written in the VPC to the stack's results bucket, then
    downloaded here with a progress bar (GeoParquet and FlatGeobuf: converted here).
    """
    from chipscale.results.export import export_job, format_for

    _db_or_stack(db, stack)
    from chipscale.results import open_store, store_files

    refuse_overwrite([output], store=store_files(db))
    fmt = format_for(output)
    if stack:
        from chipscale.ops.operations_client import StackOperations

        answer = StackOperations.for_stack(stack, region=region).download(
            output, fmt=fmt, job=job, class_name=class_name, min_score=min_score, layer=layer
        )
        where = f"s3://{answer['bucket']}/{answer['key']}"
        what = str(answer.get("unit", "row"))
        click.echo(
            printable(f"{plural(answer['rows'], what)} -> {output} (from {where})"), err=True
        )
        return
    assert db is not None  # _db_or_stack: no --stack, so a --db
    with open_store(db, create=False) as store:
        count, what = export_job(
            store, job, output, layer=layer, class_name=class_name, min_score=min_score
        )
    click.echo(printable(f"{plural(count, what)} -> {output}"), err=True)


@click.command()
@db_option()
@stack_option
@region_option
@click.option("--job", help="One job (default: every job in the store).", callback=parse_job)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Machine-readable output: {"jobs": [...], "queue": null}, the queue\'s view in '
    '"queue" with --stack.',
)
@click.option(
    "--plan",
    "plan_file",
    type=click.Path(dir_okay=False, exists=True),
    help="A `chipscale plan --json` file: show the job's actual against planned (with --job).",
)
def status(
    db: str | None,
    stack: str | None,
    region: str | None,
    job: str | None,
    as_json: bool,
    plan_file: str | None = None,
) -> None:
    """How far each job is: tiles, pushed, ok, empty, error, remaining and rejected messages.

    With --stack, the queue's view too: messages waiting and in flight in the work queue,
    and the dead-letter queue's depth (packs that failed every retry: see `chipscale redrive`).
    """
    _db_or_stack(db, stack)
    queue: dict[str, Any] | None = None
    if stack:
        from chipscale.cloud.aws_session import aws_session
        from chipscale.ops.operations_client import StackOperations
        from chipscale.ops.sqs_queues import queue_view
        from chipscale.ops.stack_outputs import resolve_stack

        session = aws_session(region)
        outputs = resolve_stack(stack, session=session)
        operations = StackOperations(session, outputs.require("operations_function"))
        queue = queue_view(session.client("sqs"), outputs.queue_url, outputs.dlq_url)
        report = operations.status(job)
        where = f"stack {stack}"
    else:
        from chipscale.results import open_store
        from chipscale.results.job_status import job_reports

        assert db is not None  # _db_or_stack: no --stack, so a --db
        with open_store(db, create=False) as store:
            report = job_reports(store, job)
            where = store.url
    versus = _versus_plan(plan_file, job, report)
    if as_json:
        # One shape for scripts: the queue is null when the results were read directly.
        body = {"jobs": report, "queue": queue}
        if versus is not None:
            body["planned"] = versus
        click.echo(json.dumps(body, indent=2))
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
    console().print(table)
    if versus is not None:
        from chipscale.cli.plan import versus_lines

        for line in versus_lines(versus):
            click.echo(line)
    if queue is not None:
        from chipscale.ops.sqs_queues import describe_queue_view

        for line in describe_queue_view(queue, stack=stack):
            click.echo(line)  # whole lines: a console would wrap the redrive hint


def _versus_plan(
    plan_file: str | None, job: str | None, report: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """The job's actual against the plan in ``plan_file`` (None without one)."""
    if plan_file is None:
        return None
    if job is None or len(report) != 1:
        raise click.UsageError("--plan needs --job: the plan is of one job")
    from datetime import UTC, datetime

    from chipscale.ops.plan import actual_vs_planned, read_plan

    return actual_vs_planned(report[0], read_plan(plan_file), datetime.now(UTC))


@click.command("convert-geojson")
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
