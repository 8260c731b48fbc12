"""``chipscale redrive``: the dead-letter queue's messages back into the work queue.

The library is :mod:`chipscale.ops.redrive`; this module resolves the queues, counts, asks
and prints.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from chipscale.errors import ChipscaleError
from chipscale.safe_text import plural

if TYPE_CHECKING:
    from botocore.client import BaseClient

    from chipscale.ops.redrive import Method, ProgressCallback, RedriveSummary


def _can_prompt() -> bool:
    """Whether someone can answer a confirmation: stdin is a terminal."""
    return sys.stdin.isatty()


def _redrive_queues(
    stack: str | None, dlq_url: str | None, queue_url: str | None, region: str | None
) -> tuple[BaseClient, str, str]:
    """An SQS client and the (dead-letter queue, queue) URLs: the stack's outputs, or the
    two URLs given (the region then defaults to the one the DLQ's URL names)."""
    from chipscale.cloud.aws_session import aws_session
    from chipscale.ops.sqs_queues import sqs_errors
    from chipscale.ops.stack_outputs import resolve_stack

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
def _redrive_progress(description: str) -> Iterator[ProgressCallback]:
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


def _redrive_summary_line(summary: RedriveSummary) -> str:
    """The end-of-redrive line: moved, failed, seconds, and the way they moved."""
    from chipscale.ops.aws import queue_name

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


@click.command("redrive")
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
    method: Method,
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
    from chipscale.ops.aws import queue_name
    from chipscale.ops.dlq_peek import peek
    from chipscale.ops.redrive import RedriveAborted, inspect_pair, redrive

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
                method=method,
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
