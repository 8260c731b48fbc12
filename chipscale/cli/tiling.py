"""``chipscale cover`` (the tiles of an area) and ``chipscale tile`` (one tile's pixels)."""

from __future__ import annotations

from pathlib import Path

import click

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
@click.option("--source", help="Raster (path, http(s) or s3:// URL) whose footprint to cover.")
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
) -> None:
    """Write the tiles at ZOOM that touch a source, an AOI or a bbox.

    Given together, the areas are intersected (e.g. the part of an AOI the image covers).
    """
    from chipscale.sources.footprint import cover as cover_tiles

    if source is None and aoi is None and bbox is None:
        raise click.UsageError("give --source, --aoi or --bbox")
    tiles = cover_tiles(zoom, source=source, aoi=aoi, bbox=bbox)
    with output_to(output) as handle:
        count = write_tile_list(tiles, handle, fmt)
    click.echo(f"{count} tiles at zoom {zoom}", err=True)


@click.command()
@click.argument("source")
@click.argument("tile")
@click.option("-o", "--output", required=True, help="out.npz (data and mask) or out.png.")
@click.option("--size", type=click.IntRange(1, 4096), default=256, show_default=True)
@bands_option
def tile(source: str, tile: str, output: str, size: int, bands: tuple[int, ...] | None) -> None:
    """Write one tile (TILE written Z/X/Y) of SOURCE, for debugging."""
    import numpy as np

    from chipscale.sources import read_tile
    from chipscale.sources.images import to_png

    try:
        parsed = parse_tile(tile, order="zxy")
    except ChipscaleError as exc:
        raise click.BadParameter(str(exc), param_hint="TILE") from None
    suffix = Path(output).suffix.lower()
    if suffix not in (".npz", ".png"):
        raise click.BadParameter("output must end with .npz or .png", param_hint="-o")
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
