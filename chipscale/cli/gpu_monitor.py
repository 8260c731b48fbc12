"""``chipscale monitor`` (chip-n-scale's gpu-monitor): GPU use, queue and worker Lambdas of
a deployed stack, and what to tune.

The library is :mod:`chipscale.ops.monitor` (what is read), :mod:`chipscale.ops.diagnosis`
(the regimes) and :mod:`chipscale.ops.tune`; the view is :mod:`chipscale.cli.monitor_view`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from chipscale.cli.monitor_view import monitor_document, render_monitor
from chipscale.cli.options import console, region_option, since_option
from chipscale.errors import ChipscaleError

if TYPE_CHECKING:
    import boto3

    from chipscale.ops.diagnosis import Diagnosis
    from chipscale.ops.monitor import Clients
    from chipscale.ops.snapshot import Snapshot
    from chipscale.ops.stack_outputs import StackOutputs
    from chipscale.ops.tune import Recommendation


def monitor_stack(
    stack: str, region: str | None
) -> tuple[boto3.session.Session, StackOutputs, Clients]:
    """(session, stack outputs, clients): one-line errors for a missing stack or
    credentials come from chipscale.ops.stack_outputs."""
    from chipscale.cloud.aws_session import aws_session
    from chipscale.ops.monitor import Clients
    from chipscale.ops.stack_outputs import resolve_stack

    session = aws_session(region)
    outputs = resolve_stack(stack, session=session)
    return session, outputs, Clients.from_session(session)


def _tune_quietly(snapshot: Snapshot) -> Recommendation | None:
    """The tune recommendation when the window allows one (the monitor shows it), else None."""
    from chipscale.ops.tune import NotEnoughData, recommend

    try:
        return recommend(snapshot)
    except NotEnoughData:
        return None


@click.command()
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
    from chipscale.ops.monitor import collect, scraper_for, since_previous
    from chipscale.ops.monitor_plot import collect_history
    from chipscale.ops.monitor_plot import plot as draw

    session, outputs, clients = monitor_stack(stack, region)
    scraper = scraper_for(
        scrape,
        metrics_url,
        lambda_client=clients.lambda_client,
        operations_function=outputs.operations_function,
    )
    remaining = None
    if job:
        from chipscale.ops.operations_client import StackOperations

        operations = StackOperations(session, outputs.require("operations_function"))
        rows = operations.status(job)
        if not rows:
            raise ChipscaleError(f"no job {job!r} in stack {stack}'s results")
        remaining = float(rows[0]["remaining"])

    def view(previous: Snapshot | None) -> tuple[Snapshot, Diagnosis, Recommendation | None]:
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
    screen = console()
    if watch is None:
        if as_json:
            click.echo(json.dumps(monitor_document(snapshot, diagnosis, recommendation), indent=2))
        else:
            screen.print(render_monitor(snapshot, diagnosis, recommendation))
        return
    done = 0
    live = None
    if not as_json and screen.is_terminal:
        from rich.live import Live

        live = Live(console=screen, auto_refresh=False, transient=False)
        live.start()
    try:
        while True:
            if as_json:
                document = monitor_document(snapshot, diagnosis, recommendation)
                click.echo(json.dumps(document))
            elif live is not None:
                live.update(render_monitor(snapshot, diagnosis, recommendation), refresh=True)
            else:  # a pipe or a log file: one view after the other
                screen.rule()
                screen.print(render_monitor(snapshot, diagnosis, recommendation))
            done += 1
            if iterations is not None and done >= iterations:
                return
            time.sleep(watch)
            snapshot, diagnosis, recommendation = view(snapshot)
    finally:
        if live is not None:
            live.stop()
