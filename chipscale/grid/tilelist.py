"""Tile values and the tile-list file formats.

Parse, don't validate: text becomes a frozen :class:`mercantile.Tile` once, here, and an
out-of-range value is rejected here (mercantile itself only warns).

Three line formats are read, one tile a line: ``x-y-z`` (chip-n-scale's), ``z/x/y`` and
``[x, y, z]`` JSON. Blank lines and lines starting with ``#`` are skipped. Files and stdin
are UTF-8 (a leading byte-order mark is skipped), read a bounded line at a time.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Literal

from mercantile import Tile

from chipscale.errors import InvalidTileError, TileListError, cut, quoted

MAX_ZOOM = 30
#: The longest line a tile list may hold, in bytes (a tile takes about 20): a longer one is
#: an error at once, however long it is, instead of being read whole into memory.
MAX_LINE_BYTES = 4096

TileFormat = Literal["x-y-z", "z/x/y", "json"]

_DASHED = re.compile(r"^\s*(-?\d+)\s*-\s*(-?\d+)\s*-\s*(-?\d+)\s*$")
_SLASHED = re.compile(r"^\s*(-?\d+)\s*/\s*(-?\d+)\s*/\s*(-?\d+)\s*$")


def make_tile(x: int, y: int, z: int) -> Tile:
    """Return ``Tile(x, y, z)`` or raise :class:`InvalidTileError` if it is off the grid.

    >>> make_tile(1, 2, 3)
    Tile(x=1, y=2, z=3)
    """
    for name, value in (("x", x), ("y", y), ("z", z)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidTileError(f"Tile {name}={cut(repr(value))} is not an integer")
    if not 0 <= z <= MAX_ZOOM:
        raise InvalidTileError(f"Tile(x={x}, y={y}, z={z}): zoom must be within 0..{MAX_ZOOM}")
    n = 1 << z
    if not (0 <= x < n and 0 <= y < n):
        raise InvalidTileError(
            f"Tile(x={x}, y={y}, z={z}) is outside the grid: x and y must be within 0..{n - 1}"
        )
    return Tile(x, y, z)


def parse_tile(text: str, *, order: Literal["auto", "zxy"] = "auto") -> Tile:
    """Parse one tile written ``x-y-z``, ``z/x/y`` or ``[x, y, z]``.

    ``order="zxy"`` only accepts ``Z/X/Y`` (the command-line form of one tile).

    >>> parse_tile("17-44-6")
    Tile(x=17, y=44, z=6)
    >>> parse_tile("6/17/44")
    Tile(x=17, y=44, z=6)
    >>> parse_tile("[17, 44, 6]")
    Tile(x=17, y=44, z=6)
    """
    if match := _SLASHED.match(text):
        z, x, y = (int(v) for v in match.groups())
        return make_tile(x, y, z)
    if order == "zxy":
        raise InvalidTileError(f"{quoted(text.strip())} is not a tile written Z/X/Y")
    if match := _DASHED.match(text):
        x, y, z = (int(v) for v in match.groups())
        return make_tile(x, y, z)
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            values = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise InvalidTileError(
                f"{quoted(stripped)} is not a JSON [x, y, z] tile: {exc}"
            ) from None
        if isinstance(values, list) and len(values) == 3:
            return make_tile(*values)
    raise InvalidTileError(f"{quoted(stripped)} is not a tile (expected x-y-z, z/x/y or [x, y, z])")


def iter_tile_lines(lines: Iterable[str], *, name: str = "<tiles>") -> Iterator[Tile]:
    """Yield the tiles of a tile list, naming the file and line of a bad entry."""
    for number, line in enumerate(lines, start=1):
        text = line.strip().rstrip(",")
        if number == 1:
            text = text.removeprefix("\ufeff")
        if not text or text.startswith("#"):
            continue
        try:
            yield parse_tile(text)
        except InvalidTileError as exc:
            raise TileListError(f"{name}, line {number}: {exc}") from None


def read_tile_list(path: str | Path) -> Iterator[Tile]:
    """Stream the tiles of a tile-list file in any of the three formats (see
    :func:`read_tile_stream`)."""
    path = Path(path)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise TileListError(
            f"Cannot read tile list {quoted(str(path), 300)}: {exc.strerror}"
        ) from None
    with handle:
        yield from read_tile_stream(handle, name=str(path))


def read_tile_stream(stream: IO[bytes], *, name: str) -> Iterator[Tile]:
    """Stream the tiles of a binary tile list (a file, stdin).

    A line longer than :data:`MAX_LINE_BYTES` or not UTF-8 is a :class:`TileListError`
    naming it, and so is a list without a tile: nothing to do is a mistake worth a message,
    as an AOI that misses the image is.
    """
    count = 0
    for tile in iter_tile_lines(_utf8_lines(stream, name), name=name):
        count += 1
        yield tile
    if count == 0:
        raise TileListError(f"{name} holds no tiles (it is empty or only comments)")


def _utf8_lines(stream: IO[bytes], name: str) -> Iterator[str]:
    """The lines of ``stream`` as text, each read with a bounded ``readline``."""
    number = 0
    while line := stream.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            raise TileListError(
                f"{name}, line {number} is longer than {MAX_LINE_BYTES:,} bytes: "
                "a tile list holds one tile a line"
            )
        if number == 1:
            line = line.removeprefix(codecs.BOM_UTF8)
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TileListError(
                f"{name}, line {number} is not UTF-8 text "
                f"(0x{line[exc.start]:02x} at byte {exc.start + 1} of the line)"
            ) from None


def format_tile(tile: Tile, fmt: TileFormat = "x-y-z") -> str:
    """Write one tile in a tile-list format.

    >>> format_tile(Tile(17, 44, 6), "z/x/y")
    '6/17/44'
    """
    x, y, z = tile
    if fmt == "x-y-z":
        return f"{x}-{y}-{z}"
    if fmt == "z/x/y":
        return f"{z}/{x}/{y}"
    return f"[{x}, {y}, {z}]"


def write_tile_list(tiles: Iterable[Tile], out: IO[str], fmt: TileFormat = "x-y-z") -> int:
    """Write tiles one a line; return how many were written."""
    count = 0
    for tile in tiles:
        out.write(format_tile(tile, fmt) + "\n")
        count += 1
    return count
