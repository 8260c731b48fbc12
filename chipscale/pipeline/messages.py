"""Queue messages: schema version 1, parsed once at the edge.

``{"v": 1, "job": "<job id>", "source": "<COG url>", "tiles": [[x, y, z], ...]}`` carries one
pack. A pack of a mosaic job also carries its candidate assets, in priority order:
``"assets": [["<id>", "<COG url>", [west, south, east, north]], ...]``; its ``source`` then
names the job's source (a list, a collection, a search) and is never read. chip-n-scale's
single-tile ``{"x": .., "y": .., "z": ..}`` is accepted too; its job and source then come from
the worker's configuration.
"""

from __future__ import annotations

import json
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mercantile import Tile

from chipscale.errors import InvalidMessageError, InvalidTileError
from chipscale.grid.packs import DEFAULT_MAX_TILES
from chipscale.grid.tilelist import make_tile

SCHEMA_VERSION = 1
MAX_JOB_LENGTH = 200
MAX_SOURCE_LENGTH = 2048
_V1_KEYS = frozenset({"v", "job", "source", "tiles", "assets"})
#: Candidate assets a message may carry (a pack of mosaic tiles rarely touches more than ten).
MAX_MESSAGE_ASSETS = 2000
MAX_ASSET_ID_LENGTH = 1024
#: Characters a job or source never needs and the stores cannot keep: control characters
#: (PostgreSQL text refuses NUL) and lone surrogates (no UTF-8 encoding exists), both
#: reachable through JSON escapes. A message carrying one could never be stored, so it is
#: refused here, and recorded, instead of failing every delivery until the dead-letter queue.
_UNSTORABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
#: Digits of the longest integer a message may hold: a tile index at zoom 30 has 10. A longer
#: one is refused while parsing, before Python's int conversion limit (4,300 digits) fails it
#: with a ValueError on every delivery.
MAX_INT_DIGITS = 20
#: What a reason quotes of a value: bounded in length and depth, so a reason stays one short
#: line whatever the body holds (a 100 kB string, a list nested 500 deep).
_QUOTE = reprlib.Repr()  # keyword arguments only from Python 3.12
_QUOTE.maxlevel, _QUOTE.maxlist, _QUOTE.maxdict = 3, 4, 4
_QUOTE.maxstring, _QUOTE.maxother, _QUOTE.maxlong = 60, 60, 40


@dataclass(frozen=True, slots=True)
class AssetRef:
    """A candidate asset of a mosaic pack, as a message carries it: its id (recorded as
    provenance), its href (what the worker reads) and its lon/lat bbox."""

    id: str
    href: str
    bbox: tuple[float, float, float, float]

    def to_json(self) -> list[Any]:
        return [self.id, self.href, [round(v, 7) for v in self.bbox]]


@dataclass(frozen=True, slots=True)
class PackMessage:
    """One validated queue message: a pack of tiles of one job over one source, or over
    ``assets`` (a mosaic's candidates for the pack, in priority order) when there are any."""

    job: str
    source: str
    tiles: tuple[Tile, ...]
    assets: tuple[AssetRef, ...] = ()

    def to_json(self) -> str:
        """The compact JSON body sent to the queue."""
        body: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "job": self.job,
            "source": self.source,
            "tiles": [[t.x, t.y, t.z] for t in self.tiles],
        }
        if self.assets:
            body["assets"] = [asset.to_json() for asset in self.assets]
        return json.dumps(body, separators=(",", ":"))


def parse_message(
    body: str | bytes | Mapping[str, Any],
    *,
    default_job: str | None = None,
    default_source: str | None = None,
    max_tiles: int = DEFAULT_MAX_TILES,
) -> PackMessage:
    """Parse and validate a message body, or raise :class:`InvalidMessageError` saying why."""
    doc = load_body(body) if isinstance(body, str | bytes) else body
    if not isinstance(doc, Mapping):
        raise InvalidMessageError(f"message must be a JSON object, not {type(doc).__name__}")

    if "v" not in doc and {"x", "y", "z"} <= doc.keys():
        return _parse_single_tile(doc, default_job, default_source)

    version = doc.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:  # not True, not 1.0
        raise InvalidMessageError(
            f"unsupported message version {quote(version)} (this worker reads v={SCHEMA_VERSION})"
        )
    unknown = sorted(set(doc) - _V1_KEYS)
    if unknown:
        listed = ", ".join(quote(str(key)) for key in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise InvalidMessageError(f"unknown message fields: {listed}{more}")
    job = check_job(doc.get("job", default_job))
    source = check_source(doc.get("source", default_source))
    raw_tiles = doc.get("tiles")
    if not isinstance(raw_tiles, list) or not raw_tiles:
        raise InvalidMessageError("tiles must be a non-empty list of [x, y, z]")
    if len(raw_tiles) > max_tiles:
        raise InvalidMessageError(
            f"message carries {len(raw_tiles)} tiles, more than max_tiles_per_message={max_tiles}"
        )
    tiles: dict[Tile, None] = {}
    for index, raw in enumerate(raw_tiles):
        if not isinstance(raw, list) or len(raw) != 3:
            raise InvalidMessageError(f"tiles[{index}] = {quote(raw)} is not [x, y, z]")
        try:
            tiles[make_tile(*raw)] = None
        except InvalidTileError as exc:
            raise InvalidMessageError(f"tiles[{index}]: {exc}") from None
    assets = _parse_assets(doc["assets"]) if "assets" in doc else ()
    return PackMessage(job=job, source=source, tiles=tuple(tiles), assets=assets)


def _parse_assets(raw: Any) -> tuple[AssetRef, ...]:
    """A message's ``assets``: a non-empty list of ``[id, href, [w, s, e, n]]``, distinct ids."""
    if not isinstance(raw, list) or not raw:
        raise InvalidMessageError("assets must be a non-empty list of [id, href, bbox]")
    if len(raw) > MAX_MESSAGE_ASSETS:
        raise InvalidMessageError(
            f"message carries {len(raw)} assets, more than {MAX_MESSAGE_ASSETS}"
        )
    assets: dict[str, AssetRef] = {}
    for index, item in enumerate(raw):
        if not isinstance(item, list) or len(item) != 3:
            raise InvalidMessageError(f"assets[{index}] = {quote(item)} is not [id, href, bbox]")
        asset_id = _text(item[0], f"assets[{index}] id", MAX_ASSET_ID_LENGTH)
        href = _text(item[1], f"assets[{index}] href", MAX_SOURCE_LENGTH)
        bbox = item[2]
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
        ):
            raise InvalidMessageError(f"assets[{index}] bbox {quote(bbox)} is not [w, s, e, n]")
        if asset_id in assets:
            raise InvalidMessageError(f"assets[{index}] repeats the id {quote(asset_id)}")
        west, south, east, north = (float(v) for v in bbox)
        assets[asset_id] = AssetRef(asset_id, href, (west, south, east, north))
    return tuple(assets.values())


def load_body(body: str | bytes) -> Any:
    """The JSON value of a message body, strictly: no NaN or Infinity, no duplicated key, no
    integer over :data:`MAX_INT_DIGITS` digits. Anything a body can hold that the decoder
    cannot take (nesting too deep, a number too long) is an :class:`InvalidMessageError`, so
    the message is rejected with its reason instead of failing every delivery.
    """
    try:
        return json.loads(
            body,
            object_pairs_hook=_unique_keys,
            parse_constant=_no_constant,
            parse_int=_bounded_int,
        )
    except RecursionError:
        raise InvalidMessageError("message is nested too deeply to read as JSON") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidMessageError(f"message is not JSON: {exc}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:  # json.loads would keep the last silently; another reader the first
            raise InvalidMessageError(f"message has a duplicated key {quote(key)}")
        doc[key] = value
    return doc


def _no_constant(name: str) -> Any:
    raise InvalidMessageError(f"message is not JSON: {name} is not a JSON number")


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise InvalidMessageError(
            f"message holds an integer of {digits} digits (at most {MAX_INT_DIGITS})"
        )
    return int(text)


def quote(value: Any) -> str:
    """``repr(value)`` cut short for a reason (see :data:`_QUOTE`)."""
    return _QUOTE.repr(value)


def _parse_single_tile(
    doc: Mapping[str, Any], default_job: str | None, default_source: str | None
) -> PackMessage:
    try:
        tile = make_tile(doc["x"], doc["y"], doc["z"])
    except InvalidTileError as exc:
        raise InvalidMessageError(str(exc)) from None
    job = check_job(doc.get("job", default_job))
    source = check_source(doc.get("source", default_source))
    return PackMessage(job=job, source=source, tiles=(tile,))


def check_job(value: Any) -> str:
    """``value`` if it can be a message's job, else :class:`InvalidMessageError` saying why."""
    return _text(value, "job", MAX_JOB_LENGTH)


def check_source(value: Any) -> str:
    """``value`` if it can be a message's source, else :class:`InvalidMessageError` saying why
    (the text only: whether a worker can read it is push's and the worker's to say)."""
    return _text(value, "source", MAX_SOURCE_LENGTH)


def _text(value: Any, field: str, limit: int) -> str:
    if value is None:
        raise InvalidMessageError(f"{field} is missing and no default is configured")
    if not isinstance(value, str) or not value.strip():
        raise InvalidMessageError(f"{field} must be a non-empty string, not {quote(value)}")
    if len(value) > limit:
        raise InvalidMessageError(f"{field} is longer than {limit} characters")
    if _UNSTORABLE.search(value):
        raise InvalidMessageError(
            f"{field} {quote(value)} holds a control character or is not UTF-8 text "
            "(a lone surrogate)"
        )
    return value


def storable(text: str) -> bool:
    """Whether a store can keep ``text`` as a job or source (see :data:`_UNSTORABLE`)."""
    return _UNSTORABLE.search(text) is None
