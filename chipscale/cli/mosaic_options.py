"""The mosaic options of ``run``, ``push``, ``cover`` and ``tile``: a STAC API search
(``--stac URL --collection C ...``), ``--asset`` and ``--order``, and the job's asset list,
frozen when the job starts and read back from the job after that."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click

from chipscale.names import is_mosaic_name

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from chipscale.sources.mosaic_source import MosaicSource
    from chipscale.sources.stac_search import StacSearch
    from chipscale.values import JobInfo

F = TypeVar("F", bound=Callable[..., Any])

#: Orders of a mosaic's assets (chipscale.sources.assets.ORDERS; kept here so that the CLI
#: imports no numpy).
ORDER_CHOICES = ("listed", "newest", "oldest", "least-cloudy")

_OPTIONS = (
    click.option(
        "--stac",
        metavar="URL",
        help="A STAC API to search (with --collection): its items are the mosaic's assets.",
    ),
    click.option("--collection", help="The STAC collection to search (with --stac)."),
    click.option("--datetime", "stac_datetime", help="Search: an RFC 3339 instant or a/b range."),
    click.option("--filter", "stac_filter", help="Search: a CQL2-text or CQL2-JSON filter."),
    click.option(
        "--query",
        "stac_query",
        multiple=True,
        help="Search: a query-extension condition, e.g. 'eo:cloud_cover<20' (repeatable).",
    ),
    click.option("--max-items", type=click.IntRange(1), help="Search: keep at most N items."),
    click.option(
        "--asset",
        "asset_key",
        help="The STAC items' asset to read (default: 'visual', else the only COG).",
    ),
    click.option(
        "--order",
        type=click.Choice(ORDER_CHOICES),
        help="Asset priority of a mosaic (first valid pixel wins; default: as listed).",
    ),
)


def mosaic_options(command: F) -> F:
    """Add the mosaic options; the command takes them as ``**mosaic``."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


@dataclass(frozen=True, slots=True)
class MosaicChoice:
    """The mosaic options as given."""

    stac: str | None = None
    collection: str | None = None
    stac_datetime: str | None = None
    stac_filter: str | None = None
    stac_query: tuple[str, ...] = ()
    max_items: int | None = None
    asset_key: str | None = None
    order: str | None = None

    @classmethod
    def of(cls, options: dict[str, Any]) -> MosaicChoice:
        choice = cls(**{k: v for k, v in options.items() if v not in (None, ())})
        search_only = {
            "--collection": choice.collection,
            "--datetime": choice.stac_datetime,
            "--filter": choice.stac_filter,
            "--query": choice.stac_query or None,
            "--max-items": choice.max_items,
        }
        if choice.stac is None:
            given = [name for name, value in search_only.items() if value is not None]
            if given:
                raise click.UsageError(f"{', '.join(given)} need --stac URL (a STAC API search)")
        elif choice.collection is None:
            raise click.UsageError("--stac needs --collection (the collection to search)")
        return choice

    def search(self) -> StacSearch | None:
        """The STAC API search the options ask for, or None."""
        if self.stac is None or self.collection is None:
            return None
        from chipscale.sources.stac_search import StacSearch

        return StacSearch(
            url=self.stac,
            collection=self.collection,
            datetime=self.stac_datetime,
            filter=self.stac_filter,
            query=self.stac_query,
            max_items=self.max_items,
            order=None if self.order in (None, "listed") else self.order,
        )

    def label(self, source: str | None) -> str | None:
        """The job's source text: the search spelled out, or the list as given with the
        asset and order that rank it (None without a mosaic)."""
        search = self.search()
        if search is not None:
            return search.label()
        if source is None or not is_mosaic_name(source):
            return None
        extras = [f"asset={self.asset_key}"] * bool(self.asset_key)
        extras += [f"order={self.order}"] * bool(self.order and self.order != "listed")
        return " ".join([source, *extras])

    def check_plain(self, source: str | None) -> None:
        """``--asset`` and ``--order`` only apply to a mosaic."""
        if self.label(source) is None and (self.asset_key or self.order):
            raise click.UsageError(
                "--asset and --order apply to a mosaic source: a .txt COG list, a STAC "
                ".json/.geojson collection or a --stac search"
            )


def source_or_stac(source: str | None, choice: MosaicChoice) -> None:
    """Exactly one of --source and --stac."""
    if source is not None and choice.stac is not None:
        raise click.UsageError("give --source or --stac, not both")
    if source is None and choice.stac is None:
        raise click.UsageError("give --source (a raster, a COG list, a STAC collection) or --stac")


def job_mosaic(
    choice: MosaicChoice,
    source: str | None,
    *,
    existing: JobInfo | None = None,
    area: BaseGeometry | None = None,
) -> MosaicSource:
    """The job's mosaic: the list frozen with ``existing`` (the job as recorded) when it has
    one, so a re-run reads what the first run read; else resolved now (the list or
    collection read, the search run within ``area``), to be frozen with the job."""
    from chipscale.sources.mosaic_source import resolve_mosaic, thaw

    label = choice.label(source)
    assert label is not None
    if existing is not None and existing.source == label:
        frozen = thaw(existing.extra, label)
        if frozen is not None:
            click.echo(
                f"job {existing.job}: {len(frozen.assets):,} assets as frozen when it started "
                f"(sha256 {frozen.sha256[:12]})",
                err=True,
            )
            return frozen
    mosaic = resolve_mosaic(
        source, choice.search(), asset_key=choice.asset_key, order=choice.order, area=area
    )
    mosaic = type(mosaic)(label, mosaic.assets)
    click.echo(f"{len(mosaic.assets):,} assets in {label} (sha256 {mosaic.sha256[:12]})", err=True)
    return mosaic


def pack_refs(mosaic: MosaicSource) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    """A pack's candidate assets as its message carries them (``AssetRef``)."""
    from chipscale.pipeline.messages import AssetRef

    def refs(pack: tuple[Any, ...]) -> tuple[AssetRef, ...]:
        return tuple(AssetRef(*c) for c in mosaic.candidates(pack))

    return refs


def area_of(aoi: str | None, bbox: tuple[float, float, float, float] | None) -> BaseGeometry | None:
    """The AOI and the bbox intersected, in lon/lat (what a search is limited to)."""
    from chipscale.grid.cover import bbox_geometry, read_aoi

    area = None if aoi is None else read_aoi(aoi)
    if bbox is not None:
        box = bbox_geometry(bbox)
        area = box if area is None else area.intersection(box)
    return area
