"""``chipscale cover`` (the tiles of an area) and ``chipscale tile`` (one tile's pixels)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from chipscale.cli.mosaic_options import MosaicChoice, area_of, job_mosaic, mosaic_options
from chipscale.cli.options import (
    aoi_option,
    bands_option,
    bbox_option,
    output_to,
    zoom_option,
)
from chipscale.errors import ChipscaleError
from chipscale.grid.tilelist import TileFormat, parse_tile, write_tile_list


@click.command()
@click.option(
    "--source",
    help="Raster (path, http(s) or s3:// URL) whose footprint to cover, or a mosaic (.txt COG "
    "list, STAC .json collection) whose footprints' union to cover.",
)
@mosaic_options
@aoi_option
@bbox_option
@zoom_option
@click.option("-o", "--output", help="Tile-list file to write (default stdout).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["x-y-z", "z/x/y", "json"]),
    default="x-y-z",
    show_default=True,
    help="Line format of the tile list.",
)
def cover(
    source: str | None,
    aoi: str | None,
    bbox: tuple[float, float, float, float] | None,
    zoom: int,
    output: str | None,
    fmt: TileFormat,
    **mosaic: Any,
) -> None:
    """Write the tiles at ZOOM that touch a source, an AOI or a bbox.

    Given together, the areas are intersected (e.g. the part of an AOI the image covers).
    A mosaic (a COG list, a STAC collection, a --stac search) covers the union of its
    assets' footprints.
    """
    from chipscale.sources.footprint import cover as cover_tiles

    choice = MosaicChoice.of(mosaic)
    if source is not None and choice.stac is not None:
        raise click.UsageError("give --source or --stac, not both")
    if source is None and choice.stac is None and aoi is None and bbox is None:
        raise click.UsageError("give --source, --stac, --aoi or --bbox")
    choice.check_plain(source)
    if choice.label(source) is not None:
        from chipscale.sources.mosaic_source import cover_mosaic

        found = job_mosaic(choice, source, area=area_of(aoi, bbox))
        tiles = cover_mosaic(zoom, found, aoi=aoi, bbox=bbox)
    else:
        tiles = cover_tiles(zoom, source=source, aoi=aoi, bbox=bbox)
    with output_to(output) as handle:
        count = write_tile_list(tiles, handle, fmt)
    click.echo(f"{count} tiles at zoom {zoom}", err=True)


@click.command()
@click.argument("source")
@click.argument("tile", required=False)
@click.option("-o", "--output", required=True, help="out.npz (data and mask) or out.png.")
@click.option("--size", type=click.IntRange(1, 4096), default=256, show_default=True)
@bands_option
@mosaic_options
def tile(
    source: str,
    tile: str | None,
    output: str,
    size: int,
    bands: tuple[int, ...] | None,
    **mosaic: Any,
) -> None:
    """Write one tile (TILE written Z/X/Y) of SOURCE, for debugging.

    SOURCE may be a mosaic (a .txt COG list, a STAC .json collection); with --stac, give
    TILE alone.
    """
    import numpy as np

    from chipscale.sources import read_tile
    from chipscale.sources.images import to_png

    choice = MosaicChoice.of(mosaic)
    if choice.stac is not None:
        if tile is not None:
            raise click.UsageError("with --stac, give TILE alone (the search is the source)")
        source, tile = "", source
    elif tile is None:
        raise click.UsageError("give SOURCE and TILE (or --stac ... and TILE)")
    choice.check_plain(source or None)
    try:
        parsed = parse_tile(tile, order="zxy")
    except ChipscaleError as exc:
        raise click.BadParameter(str(exc), param_hint="TILE") from None
    suffix = Path(output).suffix.lower()
    if suffix not in (".npz", ".png"):
        raise click.BadParameter("output must end with .npz or .png", param_hint="-o")
    if choice.label(source or None) is not None:
        image = _mosaic_tile(choice, source or None, parsed, size=size, bands=bands)
    else:
        image = read_tile(source, parsed, size=size, bands=bands)
    with output_to(output, "wb") as handle:
        if suffix == ".npz":
            np.savez_compressed(handle, data=image.data, mask=image.mask)
        else:
            handle.write(to_png(image))
    valid = float(image.mask.mean()) * 100
    click.echo(
        f"{parsed.z}/{parsed.x}/{parsed.y}: {image.data.shape[0]} bands {image.data.dtype}, "
        f"{valid:.1f}% valid -> {output}",
        err=True,
    )


def _mosaic_tile(
    choice: MosaicChoice,
    source: str | None,
    tile: Any,
    *,
    size: int,
    bands: tuple[int, ...] | None,
) -> Any:
    """One tile of a mosaic: its assets resolved (a search within the tile), then read."""
    from chipscale.sources.assets import tile_box
    from chipscale.sources.mosaic import MosaicReader

    found = job_mosaic(choice, source, area=tile_box(tile))
    with MosaicReader(found.index, source=found.label, size=size, bands=bands) as reader:
        image = reader.tile(tile)
    click.echo(f"assets read: {', '.join(image.assets) or '(none)'}", err=True)
    return image
