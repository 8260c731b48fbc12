"""``chipscale view``: serve a local web map of a job's imagery and results (the server lives
in :mod:`chipscale.view`, imported when the command runs)."""

from __future__ import annotations

import click

from chipscale.cli.options import db_option, parse_job
from chipscale.safe_text import printable


@click.command()
@db_option(required=True)
@click.option("--job", callback=parse_job, help="The job to show first (default: the newest).")
@click.option(
    "--source",
    help="Imagery to show under the results (default: the job's own source): a COG, a "
    "raster URL or an XYZ endpoint.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8765,
    show_default=True,
    help="Port to listen on (0: any free one).",
)
def view(db: str, job: str | None, source: str | None, host: str, port: int) -> None:
    """Serve a web map of a job: its imagery with the results on top, coloured by top class.

    \b
    Open the URL it prints. A score-threshold slider and class toggles filter the tiles;
    a click shows a tile's scores, status, error and assets; the summary refreshes while
    the job runs. Everything (the map library too) is served by this process, offline.
    Stop with Ctrl-C.
    """
    from chipscale.errors import ChipscaleError
    from chipscale.results import open_store
    from chipscale.view.server import ViewApp, ViewServer

    store = open_store(db, create=False)
    try:
        app = ViewApp(store, job=job, source=source)
        try:
            server = ViewServer(app, host, port)
        except OSError as exc:
            app.close()
            raise ChipscaleError(f"cannot serve on {host}:{port}: {exc.strerror}") from None
        try:
            imagery_error = app.warm()  # an unknown job: one line, before the URL is printed
        except BaseException:
            server.server_close()
            raise
        if imagery_error:
            click.echo(f"Warning: {printable(imagery_error)}; the map shows results only", err=True)
        click.echo(server.url)
        click.echo("Serving: stop with Ctrl-C.", err=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()
    finally:
        store.close()
