"""Packs: the adjacent tiles one queue message carries.

A pack is the set of tiles sharing a parent a few zooms up, so its tiles lie together and
the worker reads them with one warp of their common window. Neighbouring small groups (the
ragged edge of an area) are merged while they share a grandparent and fit, so messages stay
full without scattering a pack across the image.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import mercantile
from mercantile import Tile

#: chip-n-scale sent one tile a message; chipscale sends up to this many.
DEFAULT_MAX_TILES = 100
#: Largest pack a push accepts: a 32 x 32 tile window is already a heavy read for a worker.
MAX_TILES_PER_MESSAGE = 1024


def pack_levels(max_tiles: int) -> int:
    """Zooms between a tile and the parent whose children fit one pack (4**k <= max_tiles).

    >>> pack_levels(100)
    3
    >>> pack_levels(1)
    0
    """
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be at least 1, not {max_tiles}")
    levels = 0
    while 4 ** (levels + 1) <= max_tiles:
        levels += 1
    return levels


def pack_key(tile: Tile, levels: int) -> Tile:
    """The parent tile that names a tile's pack."""
    if levels == 0 or tile.z == 0:
        return tile
    return mercantile.parent(tile, zoom=max(0, tile.z - levels))


def pack_tiles(
    tiles: Iterable[Tile], max_tiles: int = DEFAULT_MAX_TILES, *, presorted: bool = False
) -> Iterator[tuple[Tile, ...]]:
    """Group tiles into packs of at most ``max_tiles`` adjacent tiles.

    With ``presorted=True`` (tiles already grouped by parent, as :func:`chipscale.grid.cover.cover`
    yields them) the input is streamed in constant memory; otherwise it is grouped in memory
    first. Duplicate tiles are dropped.
    """
    levels = pack_levels(max_tiles)
    if not presorted:
        groups: dict[Tile, dict[Tile, None]] = {}
        for tile in tiles:
            groups.setdefault(pack_key(tile, levels), {})[tile] = None
        keyed: Iterable[tuple[Tile, Iterable[Tile]]] = (
            (key, groups[key]) for key in sorted(groups, key=lambda t: (t.z, mercantile.quadkey(t)))
        )
    else:
        keyed = itertools.groupby(tiles, key=lambda t: pack_key(t, levels))

    pending: list[Tile] = []
    pending_key: Tile | None = None
    for key, group in keyed:
        members = list(dict.fromkeys(group))
        grand = pack_key(key, 1)
        if pending and (grand != pending_key or len(pending) + len(members) > max_tiles):
            yield tuple(pending)
            pending = []
        pending.extend(members)  # a group alone never exceeds max_tiles (4**levels)
        pending_key = grand
    if pending:
        yield tuple(pending)
