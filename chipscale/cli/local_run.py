"""``chipscale run``: a model over every tile of a source, locally, then the exports."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from chipscale.atomic import refuse_overwrite
from chipscale.cli.mosaic_options import (
    MosaicChoice,
    job_mosaic,
    mosaic_options,
    pack_refs,
    source_or_stac,
)
from chipscale.cli.options import (
    aoi_option,
    bands_option,
    console,
    db_option,
    parse_job,
    zoom_option,
)
from chipscale.grid.tilelist import read_tile_list
from chipscale.safe_text import cell, markup, plural, printable

if TYPE_CHECKING:
    from chipscale.pipeline.runner import RunSummary

#: Where ``chipscale run`` writes its exports (and its SQLite store) by default.
DEFAULT_OUT = "chipscale-out"


@click.command()
@click.option(
    "--source",
    help="Raster to run over: path, http(s) or s3:// URL; or a mosaic: a .txt COG list or a "
    "STAC .json/.geojson item collection (or search a STAC API with --stac).",
)
@mosaic_options
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
    callback=parse_job,
)
@db_option()
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
    source: str | None,
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
    **mosaic: Any,
) -> None:
    """Run a model over every tile of SOURCE at ZOOM and export the results.

    Covers the source (or --aoi within it, or the tiles of --tiles), reads packs of adjacent
    tiles, predicts, stores each tile's result, then writes OUT/results.csv,
    OUT/results.geojson and OUT/preview.png. Interrupt at will: re-running resumes.
    """
    from chipscale.cli.progress import tile_progress
    from chipscale.models.predictors import open_predictor
    from chipscale.pipeline.runner import default_model_threads, run_local
    from chipscale.results import open_store, store_files
    from chipscale.results.export import export_results
    from chipscale.sources.footprint import cover as cover_tiles

    if aoi and tiles_file:
        raise click.UsageError("give --aoi or --tiles, not both")
    choice = MosaicChoice.of(mosaic)
    source_or_stac(source, choice)
    choice.check_plain(source)
    label = choice.label(source)  # a mosaic's job source; None for one raster
    out = Path(out_dir)
    job = job or default_job_name(source or choice.collection or "stac", zoom)
    db = db or f"sqlite:///{out / 'results.db'}"
    written = ["results.csv", "results.geojson"] + ([] if no_preview else ["preview.png"])
    inputs = [s for s in (source, tiles_file) if s]
    refuse_overwrite([out / n for n in written], store=store_files(db), inputs=inputs)

    # The model first: a wrong model file fails before any work on the area.
    predictor = open_predictor(model, threads=threads or default_model_threads())
    if predictor.info.task == "segmentation":  # its regions, merged across tiles, too
        written.insert(2, "features.geojson")
        refuse_overwrite([out / "features.geojson"], store=store_files(db), inputs=inputs)
    if not no_preview:  # and what the end needs, before the work, not after
        from chipscale.extras import require

        require("matplotlib", "chipscale run's preview.png (--no-preview skips it)")
    frozen = None
    if label is not None:  # the job's asset list: frozen with it, or resolved and frozen now
        from chipscale.grid.cover import read_aoi

        with open_store(db) as store:
            existing = store.get_job(job)
        frozen = job_mosaic(choice, source, existing=existing, area=read_aoi(aoi) if aoi else None)
    if tiles_file:
        tiles = list(read_tile_list(tiles_file))
        other = {t.z for t in tiles} - {zoom}
        if other:
            raise click.BadParameter(
                f"{tiles_file} has tiles at zoom {sorted(other)}, not {zoom}", param_hint="--tiles"
            )
    elif frozen is not None:
        from chipscale.sources.mosaic_source import cover_mosaic

        tiles = list(cover_mosaic(zoom, frozen, aoi=aoi))
    else:
        tiles = list(cover_tiles(zoom, source=source, aoi=aoi))
    shown = label or source
    click.echo(printable(f"{plural(len(tiles), 'tile')} at zoom {zoom} over {shown}"), err=True)
    with open_store(db) as store, tile_progress(markup(f"job {job}")) as progress:
        summary = run_local(
            job=job,
            source=label or str(source),
            tiles=tiles,
            zoom=zoom,
            predictor=predictor,
            store=store,
            bands=bands,
            workers=workers,
            on_start=progress.start,
            on_progress=progress.advance,
            extra=None if frozen is None else frozen.frozen(),
            pack_assets=None if frozen is None else pack_refs(frozen),
        )
        progress.stop()
        _print_summary(summary, store.counts(job), predictor.info.name, store.url)
        if summary.interrupted:
            click.echo("Interrupted: finished packs are stored; re-run to resume.", err=True)
            sys.exit(130)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("results.csv", "results.geojson"):
            export_results(store, job, out / name)
        segmented = "features.geojson" in written
        if segmented:
            from chipscale.results.export_features import export_features

            export_features(store, job, out / "features.geojson", "geojson")
        if not no_preview:
            from chipscale.results.feature_merge import merge_regions
            from chipscale.results.preview import render_preview

            classes = list(predictor.info.classes)
            render_preview(
                # a mosaic's preview is drawn over its first asset
                str(source) if frozen is None else frozen.assets[0].href,
                store.iter_results(job),
                classes,
                out / "preview.png",
                title=f"{job} - {predictor.info.name}",
                regions=merge_regions(store.iter_features(job)) if segmented else None,
            )
    click.echo(printable(f"Wrote {', '.join(str(out / n) for n in written)}"), err=True)


def default_job_name(source: str, zoom: int) -> str:
    """A stable job name from the source's file name, so a re-run resumes the same job.

    >>> default_job_name("s3://bucket/dir/scene.tif", 18)
    'scene-z18'
    """
    stem = Path(source.rstrip("/").rsplit("/", 1)[-1]).stem or "job"
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)}-z{zoom}"


def _print_summary(summary: RunSummary, counts: dict[str, int], model_name: str, db: str) -> None:
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
    console().print(table)
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
