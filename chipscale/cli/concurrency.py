"""``chipscale tune``: the per-GPU Lambda concurrency that keeps the GPUs fed, measured on
a deployed stack, and written with ``--apply``."""

from __future__ import annotations

import json

import click

from chipscale.cli.gpu_monitor import monitor_stack
from chipscale.cli.options import region_option, since_option


@click.command()
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

    _session, outputs, clients = monitor_stack(stack, region)
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
