"""Queue messages: schema version 1, parsed once at the edge.

``{"v": 1, "job": "<job id>", "source": "<COG url>", "tiles": [[x, y, z], ...]}`` carries one
pack. chip-n-scale's single-tile ``{"x": .., "y": .., "z": ..}`` is accepted too; its job and
source then come from the worker's configuration.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mercantile import Tile

from chipscale.errors import InvalidMessageError, InvalidTileError
from chipscale.packs import DEFAULT_MAX_TILES
from chipscale.tilelist import make_tile

SCHEMA_VERSION = 1
MAX_JOB_LENGTH = 200
MAX_SOURCE_LENGTH = 2048
_V1_KEYS = frozenset({"v", "job", "source", "tiles"})
#: Characters a job or source never needs and the stores cannot keep: control characters
#: (PostgreSQL text refuses NUL) and lone surrogates (no UTF-8 encoding exists), both
#: reachable through JSON escapes. A message carrying one could never be stored, so it is
#: refused here, and recorded, instead of failing every delivery until the dead-letter queue.
_UNSTORABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class PackMessage:
    """One validated queue message: a pack of tiles of one job over one source."""

    job: str
    source: str
    tiles: tuple[Tile, ...]

    def to_json(self) -> str:
        """The compact JSON body sent to the queue."""
        body = {
            "v": SCHEMA_VERSION,
            "job": self.job,
            "source": self.source,
            "tiles": [[t.x, t.y, t.z] for t in self.tiles],
        }
        return json.dumps(body, separators=(",", ":"))


def parse_message(
    body: str | bytes | Mapping[str, Any],
    *,
    default_job: str | None = None,
    default_source: str | None = None,
    max_tiles: int = DEFAULT_MAX_TILES,
) -> PackMessage:
    """Parse and validate a message body, or raise :class:`InvalidMessageError` saying why."""
    if isinstance(body, str | bytes):
        try:
            doc = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidMessageError(f"message is not JSON: {exc}") from None
    else:
        doc = body
    if not isinstance(doc, Mapping):
        raise InvalidMessageError(f"message must be a JSON object, not {type(doc).__name__}")

    if "v" not in doc and {"x", "y", "z"} <= doc.keys():
        return _parse_single_tile(doc, default_job, default_source)

    if doc.get("v") != SCHEMA_VERSION:
        raise InvalidMessageError(
            f"unsupported message version {doc.get('v')!r} (this worker reads v={SCHEMA_VERSION})"
        )
    unknown = sorted(set(doc) - _V1_KEYS)
    if unknown:
        raise InvalidMessageError(f"unknown message fields: {', '.join(map(str, unknown))}")
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
            raise InvalidMessageError(f"tiles[{index}] = {raw!r} is not [x, y, z]")
        try:
            tiles[make_tile(*raw)] = None
        except InvalidTileError as exc:
            raise InvalidMessageError(f"tiles[{index}]: {exc}") from None
    return PackMessage(job=job, source=source, tiles=tuple(tiles))


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
        raise InvalidMessageError(f"{field} must be a non-empty string, not {value!r}")
    if len(value) > limit:
        raise InvalidMessageError(f"{field} is longer than {limit} characters")
    if _UNSTORABLE.search(value):
        raise InvalidMessageError(
            f"{field} {value!r} holds a control character or a lone surrogate"
        )
    return value


def storable(text: str) -> bool:
    """Whether a store can keep ``text`` as a job or source (see :data:`_UNSTORABLE`)."""
    return _UNSTORABLE.search(text) is None
