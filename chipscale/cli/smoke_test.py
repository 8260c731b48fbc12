"""``chipscale verify``: the smoke test of a deployment, one row a check, exit 1 on a failure."""

from __future__ import annotations

import json
from pathlib import Path

import click

from chipscale.cli.options import console, remember_secrets
from chipscale.errors import ChipscaleError
from chipscale.safe_text import cell


@click.command()
@click.option("--stack", help="Deployed stack to check (its CloudFormation outputs name it all).")
@click.option("--endpoint", help="Check this predictions URL directly (a tunnel, a local serve).")
@click.option(
    "--db",
    callback=remember_secrets,
    help="Check this postgresql:// database directly (a tunnel, local runs).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--preflight",
    is_flag=True,
    help="Before `cdk deploy`: check the account against the config (no stack needed).",
)
@click.option(
    "-c",
    "--context",
    "context",
    multiple=True,
    metavar="KEY=VALUE",
    help="With --preflight: a config override, as `cdk deploy -c` takes it.",
)
@click.option(
    "--cdk-json",
    type=click.Path(dir_okay=False, path_type=Path),
    default="cdk.json",
    show_default=True,
    help="With --preflight: the CDK app's cdk.json (its context is the config).",
)
def verify(
    stack: str | None,
    endpoint: str | None,
    db: str | None,
    as_json: bool,
    preflight: bool,
    context: tuple[str, ...],
    cdk_json: Path,
) -> None:
    """Smoke-test a deployment: queue, dead-letter queue, event source, worker function, GPU
    fleet, vCPU and Lambda quotas, model endpoint (one real-size tile scored) and database
    schema. Exits 1 naming each failed check.

    \b
    With --stack, the endpoint and database checks run inside the VPC through the stack's
    operations Lambda, unless --endpoint / --db say where to reach them from here.
    \b
    With --preflight (before the first `cdk deploy`): the config of cdk.json and -c, against
    the account: G and VT vCPU quota, Lambda concurrency limit, the RDS proxy name, the model
    archive, and the AMI's NVIDIA driver against the torch build.
    """
    from rich.table import Table

    from chipscale.cloud.aws_session import aws_session
    from chipscale.ops.checks import failures, run_checks
    from chipscale.ops.stack_outputs import resolve_stack
    from chipscale.ops.verify import direct_checks, stack_checks

    if preflight:
        from chipscale.ops.preflight import load_plan, preflight_checks

        if not cdk_json.is_file():
            raise click.UsageError(
                f"{cdk_json} not found: run from the checkout or give --cdk-json"
            )
        overrides = dict(_key_value(item) for item in context)
        if stack:
            overrides["stackName"] = stack
        try:
            plan = load_plan(cdk_json, overrides)
        except ValueError as exc:  # the config's own ConfigError, naming every bad key
            raise click.UsageError(str(exc)) from exc
        checks = preflight_checks(plan, aws_session(plan.region))
        stack = f"--preflight {plan.stack_name} ({plan.region})"
    elif context:
        raise click.UsageError("-c/--context goes with --preflight")
    elif not (stack or endpoint or db):
        raise click.UsageError("give --stack, or --endpoint and/or --db")
    elif stack:
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
        console().print(table)
    failed = failures(results)
    if failed:
        raise ChipscaleError(f"verify failed: {', '.join(failed)}")


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise click.UsageError(f"-c takes KEY=VALUE, got {item!r}")
    return key, value
