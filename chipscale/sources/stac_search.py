"""STAC API searches (``--stac URL --collection C``), resolved with pystac-client on the
operator's machine: the items found, in the order a mosaic reads them. The worker never
calls a STAC API: a job freezes what a search found (:mod:`chipscale.sources.mosaic_source`)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from shapely.geometry.base import BaseGeometry

from chipscale.errors import SourceError, cut, one_line

#: Items a search may return: past this the job would be a country's catalogue by mistake.
MAX_SEARCH_ITEMS = 100_000
#: Longest job source a search is spelled out in (a message's source holds 2,048).
MAX_LABEL = 1000
#: Items asked for per page.
PAGE_SIZE = 500


@dataclass(frozen=True, slots=True)
class StacSearch:
    """A STAC API search as the options give it; ``query`` and ``filter`` as typed."""

    url: str
    collection: str
    datetime: str | None = None
    filter: str | None = None
    query: tuple[str, ...] = ()
    max_items: int | None = None
    order: str | None = None

    def label(self) -> str:
        """The job's source: the search spelled out, the same each time it is given the same
        options, so a re-run finds its job (and its frozen asset list)."""
        parts = [f"stac:{self.url}", f"collection={self.collection}"]
        for name in ("datetime", "filter", "max_items", "order"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value}")
        parts += [f"query={q}" for q in self.query]
        label = " ".join(parts)
        if len(label) <= MAX_LABEL:
            return label
        digest = hashlib.sha256(label.encode("utf-8")).hexdigest()
        return f"{' '.join(parts[:2])} search=sha256:{digest}"


def search_items(search: StacSearch, *, area: BaseGeometry | None = None) -> list[dict[str, Any]]:
    """The items ``search`` finds (within ``area``, lon/lat, when given), as STAC item
    dicts in the API's order: sorted by the API for ``search.order`` when it can sort
    (then ``--max-items`` keeps the best), ranked again by the caller
    (:func:`chipscale.sources.assets.order_assets`) either way.

    Every failure is a one-line :class:`SourceError`: an unreachable API, an API without
    item search, an unknown collection, a malformed ``--filter``, an empty result.
    """
    from chipscale.extras import require

    require("pystac_client", "--stac searches")
    from pystac_client import Client
    from pystac_client.exceptions import APIError

    where = f"the STAC API at {search.url}"
    try:
        client = Client.open(search.url, timeout=60)
    except (APIError, OSError, ValueError, KeyError) as exc:
        raise SourceError(f"cannot open {where}: {cut(one_line(exc))}") from None
    _check_collection(client, search, where)
    kwargs: dict[str, Any] = {
        "collections": [search.collection],
        "max_items": min(search.max_items or MAX_SEARCH_ITEMS, MAX_SEARCH_ITEMS + 1),
        "limit": PAGE_SIZE,
    }
    if search.datetime:
        kwargs["datetime"] = search.datetime
    if search.query:
        kwargs["query"] = list(search.query)
    if search.filter:
        kwargs["filter"], kwargs["filter_lang"] = _filter(search.filter)
    if area is not None:
        kwargs["intersects"] = area.__geo_interface__
    if search.order is not None and _sorts(client):
        kwargs["sortby"] = _SORTBY[search.order]  # the API's best N, not its first N sorted
    try:
        items = list(client.search(**kwargs).items_as_dicts())
    except (APIError, OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"the search of {where} failed: {cut(one_line(exc))}") from None
    except NotImplementedError as exc:  # pystac-client's DoesNotConformTo
        raise SourceError(f"{where} cannot do this search: {cut(one_line(exc))}") from None
    if not items:
        raise SourceError(
            f"the search of {where} found no item in collection {search.collection!r}"
            + _criteria(search, area)
        )
    if search.max_items is None and len(items) > MAX_SEARCH_ITEMS:
        raise SourceError(
            f"the search of {where} found more than {MAX_SEARCH_ITEMS:,} items: "
            "narrow it (--aoi, --bbox, --datetime, --filter) or give --max-items"
        )
    return items


#: sortby of each order, for an API with the sort extension.
_SORTBY: dict[str, list[dict[str, str]]] = {
    "newest": [{"field": "properties.datetime", "direction": "desc"}],
    "oldest": [{"field": "properties.datetime", "direction": "asc"}],
    "least-cloudy": [{"field": "properties.eo:cloud_cover", "direction": "asc"}],
}


#: The sort extension at any STAC API 1.x version: stac-fastapi 7 says v1.1.0, which
#: pystac-client 0.9's own check (v1.0 only) misses, so it would never send a sortby.
_SORT_CLASS = re.compile(r"https://api\.stacspec\.org/v1\.\d+\.\d+(-[\w.]+)?/item-search#sort")


def _sorts(client: Any) -> bool:
    """Whether the API sorts searches; if so pystac-client is told so too (it refuses a
    sortby for an API it believes does not sort)."""
    if not any(_SORT_CLASS.fullmatch(uri) for uri in client.get_conforms_to()):
        return False
    client.add_conforms_to("SORT")
    return True


def _check_collection(client: Any, search: StacSearch, where: str) -> None:
    """A one-line error for a collection the API does not have (pystac-client's own is a
    404 page); an API without the collections endpoint is searched as it is."""
    from pystac_client.exceptions import APIError

    if not client.conforms_to("COLLECTIONS"):
        return
    try:
        found = client.get_collection(search.collection)
    except (APIError, OSError, ValueError, KeyError) as exc:
        raise SourceError(f"cannot read {where}: {cut(one_line(exc))}") from None
    if found is None:
        raise SourceError(f"{where} has no collection {search.collection!r}")


def _filter(text: str) -> tuple[str | dict[str, Any], str]:
    """``--filter`` as CQL2-JSON (text starting with ``{``) or CQL2-text."""
    if not text.lstrip().startswith("{"):
        return text, "cql2-text"
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise SourceError(f"--filter is not CQL2-JSON: {cut(one_line(exc))}") from None
    if not isinstance(doc, dict):
        raise SourceError("--filter must be a CQL2-JSON object or CQL2-text")
    return doc, "cql2-json"


def _criteria(search: StacSearch, area: BaseGeometry | None) -> str:
    said = [f"{name} {value}" for name, value in (("datetime", search.datetime),) if value]
    said += [f"filter {search.filter}"] if search.filter else []
    said += [f"query {q}" for q in search.query]
    if area is not None:
        west, south, east, north = area.bounds
        said.append(f"area {west:.4f},{south:.4f},{east:.4f},{north:.4f}")
    return f" ({cut('; '.join(said), 200)})" if said else ""
