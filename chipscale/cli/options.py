"""Options and helpers the chipscale commands share: area, zoom, bands, job, database,
stack and region options, their parsers, and where a command's output goes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any, TypeVar

import click

from chipscale.atomic import atomic_write
from chipscale.errors import ChipscaleError
from chipscale.grid.tilelist import MAX_ZOOM
from chipscale.ops.snapshot import DEFAULT_WINDOW
from chipscale.redaction import remember

if TYPE_CHECKING:
    from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])

#: Longest window monitor and tune read: a day of 1-minute periods.
MAX_WINDOW_MINUTES = 24 * 60


def _parse_bands(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> tuple[int, ...] | None:
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


def parse_job(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """A --job the results stores and workers can keep (e.g. UTF-8 text), else bad usage."""
    if value is None:
        return None
    from chipscale.pipeline.messages import check_job

    try:
        return check_job(value)
    except ChipscaleError as exc:
        raise click.BadParameter(str(exc)) from None


def _parse_bbox(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> tuple[float, float, float, float] | None:
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


def db_option(required: bool = False) -> Callable[[F], F]:
    """``--db URL`` (env DATABASE_URL): a results store, its password kept out of any output."""
    return click.option(
        "--db",
        envvar="DATABASE_URL",
        required=required,
        callback=remember_secrets,
        help="Results store: sqlite:///path.db or postgresql://... (env DATABASE_URL).",
    )


def remember_secrets(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """A database URL's password, noted so that no error or log line can print it."""
    return None if value is None else remember(value)


@contextmanager
def output_to(path: str | None, mode: str = "w") -> Iterator[IO[Any]]:
    """stdout for no path or ``-``, else the file, written atomically."""
    if path is None or path == "-":
        yield sys.stdout
        return
    with atomic_write(path, mode) as handle:
        yield handle


stack_option = click.option(
    "--stack",
    help="A deployed stack: the work runs in its operations Lambda, inside the VPC.",
)
region_option = click.option("--region", help="AWS region of --stack (default: AWS_REGION).")


def since_option(help_text: str) -> Callable[[F], F]:
    """``--since MINUTES``: the CloudWatch window monitor and tune read."""
    return click.option(
        "--since",
        type=click.IntRange(1, MAX_WINDOW_MINUTES),
        default=int(DEFAULT_WINDOW.total_seconds() // 60),
        show_default=True,
        metavar="MINUTES",
        help=help_text,
    )


def console() -> Console:
    """A rich console for tables on stdout; as wide as needed when not a terminal (a pipe or a
    log file), where rich would otherwise wrap every cell at 80 columns."""
    from chipscale.pipes import stdout_console

    return stdout_console() if sys.stdout.isatty() else stdout_console(width=160)
