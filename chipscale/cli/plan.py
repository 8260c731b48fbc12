"""``chipscale plan`` (tiles, requests, hours and dollars before a run) and ``chipscale
profile`` (this machine's per-stage rates). The library: :mod:`chipscale.ops.plan`,
:mod:`chipscale.ops.system_model`, :mod:`chipscale.ops.profile`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from chipscale.cli.options import aoi_option, bbox_option, console, db_option
from chipscale.cli.sqs_push import source_options
from chipscale.grid.packs import DEFAULT_MAX_TILES, MAX_TILES_PER_MESSAGE
from chipscale.grid.tilelist import MAX_ZOOM
from chipscale.safe_text import cell

if TYPE_CHECKING:
    from chipscale.ops.plan import Counts, Plan


def push_counts(
    tiles_file: str | None,
    *,
    source: str | None,
    aoi: str | None,
    bbox: tuple[float, float, float, float] | None,
    zoom: int | None,
    job: str | None,
    max_tiles_per_message: int,
    worker_source: bool = False,
    db: str | None = None,
    mosaic: dict[str, Any] | None = None,
) -> Counts:
    """What ``push --dry-run`` counts for the same inputs: push's own checks, mosaic
    resolution (a list, a collection or a search, frozen in ``db``'s job when it has one),
    cover, packing (a mosaic pack's candidates in its message) and batching, with no sender.
    No source at all counts messages without one (as ``--worker-source``)."""
    from chipscale.cli.sqs_push import (
        _push_job_name,
        _push_mosaic,
        _push_source,
        _push_tiles,
        _run_push,
    )
    from chipscale.cloud.push_plan import plan_push
    from chipscale.cloud.push_send import DEFAULT_CONCURRENCY
    from chipscale.ops.plan import Counts

    choice, source, listed = _push_source(
        source, mosaic or {}, job, worker_source=worker_source, required=False
    )
    job, frozen = _push_mosaic(
        choice, listed, job=job, tiles_file=tiles_file, aoi=aoi, bbox=bbox, zoom=zoom, db=db
    )
    tiles = _push_tiles(tiles_file, zoom=zoom, source=source, aoi=aoi, bbox=bbox, mosaic=frozen)
    name = "<stdin>" if tiles_file == "-" else tiles_file or "cover"
    with plan_push(tiles, zoom=zoom, name=name) as plan:
        job = job or _push_job_name(source, tiles_file, aoi, plan.zoom)
        summary = _run_push(
            plan, job, source, None, max_tiles_per_message, DEFAULT_CONCURRENCY, frozen
        )
    return Counts(
        tiles=summary.tiles,
        messages=summary.messages,
        requests=summary.requests,
        zoom=plan.zoom,
        bytes=summary.bytes,
    )


@click.command()
@click.argument("tiles_file", metavar="[TILES]", required=False)
@source_options
@aoi_option
@bbox_option
@click.option("--zoom", "-z", type=click.IntRange(0, MAX_ZOOM), help="Tile zoom (as push's).")
@click.option("--job", help="Job name (as push's; only the message sizes depend on it).")
@db_option()
@click.option(
    "--max-tiles-per-message",
    type=click.IntRange(1, MAX_TILES_PER_MESSAGE),
    default=DEFAULT_MAX_TILES,
    show_default=True,
)
@click.option(
    "--cdk-json",
    type=click.Path(dir_okay=False),
    help="The stack config to read the fleet from (default: ./cdk.json when there is one).",
)
@click.option("--instance-type", help="GPU instance type (default: cdk.json's instanceType).")
@click.option("--instances", type=click.IntRange(1), help="GPU instances (cdk.json: maxInstances).")
@click.option("--gpus-per-instance", type=click.IntRange(1), help="(default: the price table's).")
@click.option("--per-gpu-concurrency", type=click.IntRange(1), help="Worker Lambdas per GPU.")
@click.option("--workers-per-gpu", type=click.IntRange(1), help="TorchServe workers per GPU.")
@click.option("--batch-size", type=click.IntRange(1), help="SQS messages per invocation.")
@click.option("--profile", "profile_file", type=click.Path(dir_okay=False), help="Rates file.")
@click.option("--prices", type=click.Path(dir_okay=False), help="Price table (default: bundled).")
@click.option(
    "--boot-seconds",
    type=click.FloatRange(0),
    default=None,
    help="Seconds an instance bills before it serves (default 420, assumed; 0: fleet warm).",
)
@click.option("--json", "as_json", is_flag=True, help="The plan as JSON on stdout.")
def plan(
    tiles_file: str | None,
    source: str | None,
    worker_source: bool,
    aoi: str | None,
    bbox: tuple[float, float, float, float] | None,
    zoom: int | None,
    job: str | None,
    db: str | None,
    max_tiles_per_message: int,
    cdk_json: str | None,
    instance_type: str | None,
    instances: int | None,
    gpus_per_instance: int | None,
    per_gpu_concurrency: int | None,
    workers_per_gpu: int | None,
    batch_size: int | None,
    profile_file: str | None,
    prices: str | None,
    boot_seconds: float | None,
    as_json: bool,
    **mosaic: Any,
) -> None:
    """Tiles, messages, requests, GPU-hours, Lambda GB-seconds, wall time, the bottleneck
    and the cost of a run, before it starts: the inputs of `chipscale push`, the fleet of
    cdk.json (or flags) and the rates of `chipscale profile` (or documented defaults).

    \b
      chipscale plan --bbox W,S,E,N --zoom 18 --source s3://bucket/scene.tif
      chipscale plan tiles.txt --source URL --instances 4 --profile profile.json --json
      chipscale plan --source naip.json --zoom 17 --instance-type g5.2xlarge
    """
    from chipscale.ops import plan as plan_lib
    from chipscale.ops.prices import load_prices

    table = load_prices(prices)
    context: dict[str, Any] = {}
    if cdk_json is not None:
        context = plan_lib.load_context(cdk_json)
    elif Path("cdk.json").is_file():
        context = plan_lib.load_context("cdk.json")
    fleet = plan_lib.fleet_from_context(
        context,
        table,
        instance_type=instance_type,
        instances=instances,
        gpus_per_instance=gpus_per_instance,
        per_gpu_concurrency=per_gpu_concurrency,
        workers_per_gpu=workers_per_gpu,
        batch_size=batch_size,
        tiles_per_message=max_tiles_per_message,
    )
    table.instance(fleet.instance_type)  # an unknown type fails before the tiles are read
    profile = plan_lib.load_profile(profile_file) if profile_file else plan_lib.default_profile()
    counts = push_counts(
        tiles_file,
        source=source,
        aoi=aoi,
        bbox=bbox,
        zoom=zoom,
        job=job,
        max_tiles_per_message=max_tiles_per_message,
        worker_source=worker_source,
        db=db,
        mosaic=mosaic,
    )
    result = plan_lib.make_plan(
        counts,
        fleet,
        profile,
        table,
        db_instance_class=str(context.get("dbInstanceClass", "t4g.medium")),
        boot_s=plan_lib.DEFAULT_BOOT_S if boot_seconds is None else boot_seconds,
    )
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    _print_plan(result)


def _print_plan(p: Plan) -> None:
    from rich.table import Table

    s, f = p.solution, p.fleet
    title = (
        f"plan: {f.instances} x {f.instance_type} ({f.gpus} GPU), {s.concurrency} Lambdas "
        f"({f.per_gpu_concurrency} per GPU), rates: {p.profile}"
    )
    table = Table(title=cell(title), title_justify="left")
    table.add_column("what")
    table.add_column("planned", justify="right")
    rows: list[tuple[str, str]] = [
        ("tiles", f"{p.counts.tiles:,}"),
        ("messages", f"{p.counts.messages:,} ({p.counts.bytes:,} bytes)"),
        (
            "SQS requests",
            f"{p.sqs_requests['total']:,} ({p.sqs_requests['send']:,} send, "
            f"{p.sqs_requests['receive_delete']:,} receive/delete)",
        ),
        ("Lambda invocations", f"{p.lambda_invocations:,}"),
        ("Lambda GB-seconds", f"{p.lambda_gb_seconds:,.0f}"),
        ("GPU-hours", f"{p.gpu_hours:,.2f}"),
        ("PostgreSQL writes", f"{p.db_writes['rows']:,} rows in {p.db_writes['transactions']:,}"),
        ("tiles/s", f"{s.tiles_per_s:,.0f}"),
        ("wall time", _duration(p.wall_s)),
        ("bottleneck", s.bottleneck),
        (
            "per-GPU concurrency",
            f"{f.per_gpu_concurrency} (model: {s.recommended_per_gpu} keeps a GPU busy; "
            f"timeouts above {s.max_per_gpu_without_timeout})",
        ),
    ]
    rows += [(f"cost: {k.replace('_', ' ')}", _usd(v)) for k, v in p.costs.items()]
    rows.append(("cost: total", _usd(p.total_usd)))
    for what, value in rows:
        table.add_row(cell(what), cell(value))
    console().print(table)
    prices = p.prices
    click.echo(f"prices: {prices['region']} on-demand of {prices['date']} ({prices['table']})")
    for note in s.notes:
        click.echo(f"Note: {note}", err=True)


def _usd(value: float) -> str:
    return f"${value:,.2f}" if value >= 1 else f"${value:.4f}"


def _duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}h {rest // 60:02d}m {rest % 60:02d}s"


@click.command()
@click.option("--source", required=True, help="A COG (path or URL) to read tiles from.")
@click.option("--model", "model_file", required=True, type=click.Path(dir_okay=False))
@click.option("--endpoint", help="TorchServe predictions URL: measure the model through it.")
@click.option("--zoom", "-z", type=click.IntRange(0, MAX_ZOOM), help="(default: the source's).")
@click.option("--tiles", "tile_count", type=click.IntRange(8), default=200, show_default=True)
@click.option(
    "--read-latency-ms",
    type=click.FloatRange(0),
    default=20.0,
    show_default=True,
    help="Latency added to each range request of the S3-like read (0: none).",
)
@click.option(
    "--endpoint-workers",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="TorchServe workers behind --endpoint (a CPU endpoint's rate is per worker).",
)
@click.option("--db", help="Store to time writes against (default: a temporary SQLite).")
@click.option(
    "--gpu-json",
    type=click.Path(dir_okay=False, exists=True),
    help="bench/gpu_serving.py's JSON: its TorchServe tiles/s becomes the GPU rate.",
)
@click.option("--output", "-o", default="profile.json", show_default=True)
def profile(
    source: str,
    model_file: str,
    endpoint: str | None,
    zoom: int | None,
    tile_count: int,
    read_latency_ms: float,
    endpoint_workers: int,
    db: str | None,
    gpu_json: str | None,
    output: str,
) -> None:
    """Measure this machine's per-stage rates and write them for `chipscale plan --profile`:
    tile reads per worker (with an S3-like latency), the model's tiles/s (in process or
    through --endpoint) and store writes."""
    from chipscale.ops.profile import measure_profile

    rates, sources, about = measure_profile(
        source=source,
        model_file=model_file,
        endpoint=endpoint,
        zoom=zoom,
        tiles=tile_count,
        read_latency_s=read_latency_ms / 1000,
        db=db,
        gpu_json=gpu_json,
        endpoint_workers=endpoint_workers,
    )
    from chipscale.ops.plan import write_profile

    write_profile(output, rates, sources, **about)
    for name, value in _items(rates):
        click.echo(f"{name:28s} {value:<14.6g} {sources.get(name, '')}", err=True)
    click.echo(f"profile -> {output}", err=True)


def _items(rates: Any) -> list[tuple[str, Any]]:
    from dataclasses import fields

    return [(f.name, float(getattr(rates, f.name))) for f in fields(rates)]


def versus_lines(v: dict[str, Any]) -> list[str]:
    """``status --plan``'s lines: actual against planned."""
    planned = f"planned {v['planned_tiles_per_s']:,.0f} tiles/s, {_duration(v['planned_wall_s'])}"
    if v["elapsed_s"] is None:
        return [f"{planned}; no push recorded for the job, so no time so far"]
    left = "-" if v["remaining_s"] is None else _duration(v["remaining_s"])
    total = v.get("planned_usd")
    of = f" of {_usd(float(total))} planned" if isinstance(total, int | float) else ""
    return [
        f"actual {v['tiles_per_s']:,.1f} tiles/s over {_duration(v['elapsed_s'])} since the push "
        f"({v['done']:,} tiles done; at this rate {left} to go); {planned}",
        f"cost so far about {_usd(v['usd_so_far'])}{of} (the plan's prices and fleet)",
    ]
