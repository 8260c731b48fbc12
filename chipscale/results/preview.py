"""A picture of the predictions over the image: the quick look after a local run.

The source is read once, downsampled into web mercator (a WarpedVRT read with ``out_shape``,
so GDAL uses the overviews), and each tile is drawn over it coloured by its top class; for a
segmentation job, the regions merged across tiles are drawn instead, filled by class, over
the tiles' outlines.
matplotlib is imported inside :func:`render_preview`: it is in the ``local`` extra, not in the
worker's Lambda bundle.
"""

from __future__ import annotations

import os
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mercantile
import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT

from chipscale.atomic import atomic_write
from chipscale.errors import SourceError
from chipscale.results.class_colors import CLASS_COLORS
from chipscale.results.export_rows import scores_of, top_class
from chipscale.sources.datasets import open_dataset
from chipscale.sources.gdal_env import gdal_env
from chipscale.sources.images import stretch_to_uint8
from chipscale.values import ResultRow

if TYPE_CHECKING:
    from chipscale.results.feature_merge import Region

__all__ = ["render_preview"]

#: Above this many tiles, tiles are painted into a raster overlay instead of drawn as
#: rectangles: matplotlib slows down badly with hundreds of thousands of patches.
MAX_PATCHES = 20_000

_EMPTY, _ERROR, _OUTLINE = -1, -2, -3
#: Half the web-mercator world's width, in metres.
_HALF_WORLD = 20037508.342789244
EMPTY_EDGE = "#3a3a3a"


def _read_image(source: str, max_size: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The source as an RGBA uint8 image in EPSG:3857 at most ``max_size`` pixels a side,
    and its bounds (west, south, east, north) in metres."""
    try:
        with (
            gdal_env(source),
            open_dataset(source) as src,
            WarpedVRT(src, crs="EPSG:3857") as vrt,
        ):
            scale = max(vrt.width, vrt.height) / max_size
            width = max(1, round(vrt.width / max(scale, 1.0)))
            height = max(1, round(vrt.height / max(scale, 1.0)))
            indexes = [1, 2, 3] if vrt.count >= 3 else [1]
            data = vrt.read(
                indexes, out_shape=(len(indexes), height, width), resampling=Resampling.bilinear
            )
            mask = vrt.dataset_mask(out_shape=(height, width)) > 0
            bounds = tuple(vrt.bounds)
    except rasterio.errors.RasterioError as exc:
        raise SourceError(f"Cannot read source {source!r} for the preview: {exc}") from None
    rgb = stretch_to_uint8(data, mask)
    if rgb.shape[0] == 1:
        rgb = np.repeat(rgb, 3, axis=0)
    alpha = np.where(mask, 255, 0).astype(np.uint8)[None]
    return np.concatenate([rgb, alpha]).transpose(1, 2, 0), bounds


def _default_title(jobs: Counter[str], zooms: Counter[int], total: int) -> str:
    job = ", ".join(sorted(jobs)) if len(jobs) <= 2 else f"{len(jobs)} jobs"
    zoom = ", ".join(f"z{z}" for z in sorted(zooms))
    return f"{job or 'results'} · {zoom or 'no tiles'} · {total:,} tiles"


def render_preview(
    source: str | os.PathLike[str],
    rows: Iterable[ResultRow],
    classes: Sequence[str],
    out_png: str | os.PathLike[str],
    *,
    max_size: int = 1024,
    title: str | None = None,
    regions: Iterable[Region] | None = None,
) -> Path:
    """Draw the image with each tile over it, coloured by its top class, and save a PNG.

    ``ok`` tiles are filled (semi-transparent) in their top class's colour, ``empty`` tiles
    only outlined, ``error`` tiles hatched in red. The legend gives each class's tile count.
    Rows are read once; only five numbers a tile are kept. With ``regions`` (a segmentation
    job's, merged), ``ok`` tiles are only outlined and the regions are drawn filled by class,
    the legend counting regions.

    Returns the path of the PNG.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Patch

    source = os.fspath(source)
    out_png = Path(out_png)
    image, image_bounds = _read_image(source, max_size)
    west, south, east, north = image_bounds

    names = list(classes)
    index = {name: i for i, name in enumerate(names)}
    boxes = array("d")  # west, south, east, north per tile, in metres
    codes = array("i")  # class index, or _EMPTY / _ERROR
    jobs: Counter[str] = Counter()
    zooms: Counter[int] = Counter()
    for row in rows:
        jobs[row.job] += 1
        zooms[row.z] += 1
        box = mercantile.xy_bounds(mercantile.Tile(row.x, row.y, row.z))
        boxes.extend((box.left, box.bottom, box.right, box.top))
        if row.status == "empty":
            codes.append(_EMPTY)
            continue
        best = top_class(scores_of(row.output, names)) if row.status == "ok" else None
        if best is None:
            codes.append(_ERROR)
            continue
        top = best[0]
        if top not in index:  # a class the caller did not list: give it a colour too
            index[top] = len(names)
            names.append(top)
        codes.append(_OUTLINE if regions is not None else index[top])

    box_array = np.frombuffer(boxes, dtype="float64").reshape(-1, 4)
    code_array = np.frombuffer(codes, dtype="int32")
    total = len(code_array)
    if total:
        west = min(west, float(box_array[:, 0].min()))
        south = min(south, float(box_array[:, 1].min()))
        east = max(east, float(box_array[:, 2].max()))
        north = max(north, float(box_array[:, 3].max()))

    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colors = [
        to_rgba(CLASS_COLORS[name]) if name in CLASS_COLORS else cmap(i % cmap.N)
        for i, name in enumerate(names)
    ]
    error_color = (0.86, 0.08, 0.08, 1.0)

    aspect = (east - west) / max(north - south, 1e-9)
    side = max_size / 100
    fig_w, fig_h = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
    fig = plt.figure(figsize=(fig_w + 2.6, fig_h + 0.7), dpi=100)
    ax = fig.add_axes((0.02, 0.02, fig_w / (fig_w + 2.6) - 0.02, fig_h / (fig_h + 0.7) - 0.02))
    ax.set_facecolor("#e9e9e9")
    img_west, img_south, img_east, img_north = image_bounds
    ax.imshow(image, extent=(img_west, img_east, img_south, img_north), interpolation="bilinear")
    ax.set_xlim(west, east)
    ax.set_ylim(south, north)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("#888888")

    if total and total <= MAX_PATCHES:
        _draw_patches(ax, box_array, code_array, colors, error_color)
    elif total:
        _draw_raster(
            ax, box_array, code_array, colors, error_color, (west, south, east, north), max_size
        )

    counts = Counter(code_array.tolist())
    if regions is not None:
        counts = _draw_regions(ax, regions, index, names, colors, cmap)
        counts.update(
            {_EMPTY: int((code_array == _EMPTY).sum()), _ERROR: int((code_array == _ERROR).sum())}
        )
    handles: list[Any] = [
        Patch(facecolor=(*colors[i][:3], 0.5), edgecolor=colors[i], label=f"{name} ({counts[i]:,})")
        for i, name in enumerate(names)
    ]
    handles.append(
        Patch(
            facecolor="none",
            edgecolor=EMPTY_EDGE,
            linestyle="--",
            label=f"empty ({counts[_EMPTY]:,})",
        )
    )
    handles.append(
        Patch(
            facecolor="none",
            edgecolor=error_color,
            hatch="xx",
            label=f"error ({counts[_ERROR]:,})",
        )
    )
    legend = fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(fig_w / (fig_w + 2.6) + 0.005, 0.98),
        title="top class (tiles)" if regions is None else "regions",
        frameon=True,
        fontsize=10,
        title_fontsize=10,
    )
    legend.get_frame().set_edgecolor("#bbbbbb")
    fig.suptitle(title or _default_title(jobs, zooms, total), x=0.02, ha="left", fontsize=12)
    try:
        with atomic_write(out_png, "wb") as handle:
            fig.savefig(handle, format="png", dpi=100, facecolor="white")
    finally:
        plt.close(fig)
    return out_png


def _draw_patches(
    ax: Any,
    boxes: np.ndarray,
    codes: np.ndarray,
    colors: Sequence[tuple[float, ...]],
    error_color: tuple[float, ...],
) -> None:
    """One rectangle a tile: filled by class, outlined when empty, hatched red on error."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    by_code: dict[int, list[Any]] = {}
    for (left, bottom, right, top), code in zip(boxes, codes.tolist(), strict=True):
        rect = Rectangle((left, bottom), right - left, top - bottom)
        by_code.setdefault(code, []).append(rect)
    width = 0.6 if len(codes) > 2000 else 1.0
    for code, rects in by_code.items():
        if code == _EMPTY:
            style = dict(facecolor="none", edgecolor=EMPTY_EDGE, linestyle="--", linewidth=width)
        elif code == _OUTLINE:
            style = dict(facecolor="none", edgecolor="#ffffff", linewidth=width * 0.5, alpha=0.5)
        elif code == _ERROR:
            style = dict(
                facecolor=(*error_color[:3], 0.15),
                edgecolor=error_color,
                hatch="xx",
                linewidth=width * 1.4,
            )
        else:
            color = colors[code]
            style = dict(facecolor=(*color[:3], 0.38), edgecolor=color, linewidth=width)
        ax.add_collection(PatchCollection(rects, match_original=False, **style))


def _draw_raster(
    ax: Any,
    boxes: np.ndarray,
    codes: np.ndarray,
    colors: Sequence[tuple[float, ...]],
    error_color: tuple[float, ...],
    extent: tuple[float, float, float, float],
    max_size: int,
) -> None:
    """Many tiles: paint them into one RGBA overlay of about ``max_size`` pixels a side."""
    west, south, east, north = extent
    scale = max(east - west, north - south) / max_size
    width = max(1, round((east - west) / scale))
    height = max(1, round((north - south) / scale))
    overlay = np.zeros((height, width, 4), dtype=np.float32)
    palette = {i: (*c[:3], 0.45) for i, c in enumerate(colors)}
    palette[_ERROR] = (*error_color[:3], 0.7)
    palette[_EMPTY] = (0.2, 0.2, 0.2, 0.12)
    palette[_OUTLINE] = (1.0, 1.0, 1.0, 0.0)
    cols0 = np.floor((boxes[:, 0] - west) / scale).astype(int).clip(0, width)
    cols1 = np.ceil((boxes[:, 2] - west) / scale).astype(int).clip(0, width)
    rows0 = np.floor((north - boxes[:, 3]) / scale).astype(int).clip(0, height)
    rows1 = np.ceil((north - boxes[:, 1]) / scale).astype(int).clip(0, height)
    for c0, c1, r0, r1, code in zip(cols0, cols1, rows0, rows1, codes.tolist(), strict=True):
        overlay[r0 : max(r1, r0 + 1), c0 : max(c1, c0 + 1)] = palette[code]
    ax.imshow(overlay, extent=(west, east, south, north), interpolation="nearest")


def _draw_regions(
    ax: Any,
    regions: Iterable[Region],
    index: dict[str, int],
    names: list[str],
    colors: list[Any],
    cmap: Any,
) -> Counter[int]:
    """Each region a filled outline (holes kept) in its class's colour, in web-mercator
    metres; returns the count of regions per class index."""
    from matplotlib.collections import PathCollection
    from matplotlib.colors import to_rgba
    from matplotlib.path import Path as MplPath

    by_class: dict[int, list[Any]] = {}
    for region in regions:
        if region.cls not in index:
            index[region.cls] = len(names)
            names.append(region.cls)
            name = region.cls
            colors.append(
                to_rgba(CLASS_COLORS[name]) if name in CLASS_COLORS else cmap(len(names) % cmap.N)
            )
        res = 2 * _HALF_WORLD / (2**region.z * region.size)
        rings = [region.polygon.exterior, *region.polygon.interiors]
        paths = []
        for ring in rings:
            xy = np.asarray(ring.coords)
            paths.append(
                MplPath(
                    np.column_stack([xy[:, 0] * res - _HALF_WORLD, _HALF_WORLD - xy[:, 1] * res]),
                    closed=True,
                )
            )
        by_class.setdefault(index[region.cls], []).append(MplPath.make_compound_path(*paths))
    for code, paths in by_class.items():
        color = colors[code]
        width = 0.4 if len(paths) > 2000 else 0.9
        ax.add_collection(
            PathCollection(paths, facecolor=(*color[:3], 0.45), edgecolor=color, linewidth=width)
        )
    return Counter({code: len(paths) for code, paths in by_class.items()})
