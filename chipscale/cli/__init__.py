"""The ``chipscale`` command line: the group, its error handling and the entry points.

Conventions of rasterio's ``rio``: data to stdout, diagnostics to stderr; exit 0 on success,
1 for a failed operation (one line saying why, no traceback), 2 for bad usage. ``-v`` shows
debug logs and tracebacks. Each command family has its own module here; this one registers
them. Shared options live in :mod:`chipscale.cli.options`.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence
from typing import Any, TextIO

import click

from chipscale.cli.concurrency import tune
from chipscale.cli.dead_letters import redrive_command
from chipscale.cli.gpu_monitor import monitor
from chipscale.cli.local_run import run
from chipscale.cli.model import model, serve
from chipscale.cli.plan import plan, profile
from chipscale.cli.smoke_test import verify
from chipscale.cli.sqs_push import push
from chipscale.cli.store import convert_geojson, db_setup, download, status
from chipscale.cli.tiling import cover, tile
from chipscale.cli.view import view
from chipscale.cli.wheelhouse_build import wheelhouse
from chipscale.errors import ChipscaleError, one_line
from chipscale.pipes import die_of_sigpipe, reader_gone
from chipscale.redaction import RedactingFormatter, scrub
from chipscale.safe_text import printable

log = logging.getLogger("chipscale")


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


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Warnings meant for the user (e.g. a slow strip-organised source), without source lines."""
    click.echo(f"Warning: {printable(str(message))}", err=True)


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


for command in (
    cover, tile, run, db_setup, download, status, convert_geojson, model, serve, verify, push,
    redrive_command, monitor, tune, wheelhouse, plan, profile, view,
):  # fmt: skip
    cli.add_command(command)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="chipscale")


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


if __name__ == "__main__":
    main()
