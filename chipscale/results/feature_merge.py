"""Regions merged across tile borders: a segmentation job's stored per-tile polygons joined,
exactly in the zoom's integer pixel grid, into one polygon per 4-connected region of a class.

Streams in the store's ``(z, x, y, seq)`` order and holds only the regions still open at a
tile edge: a piece's border runs on the right and bottom sides of its tile wait for the next
column and the next tile; a region none of whose runs waits any more is complete and leaves.
Two pieces join when a run of one and a run of the other share a stretch of positive length
(a corner alone never joins). Joined pieces are unioned once, when the region completes.
Algorithm, figures and memory bound: docs/design.md §9.5.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import Polygon

from chipscale.values import FeatureRow

__all__ = ["CHUNK_ROWS", "Region", "merge_regions"]

#: Rows whose WKB is parsed and border-scanned together (vectorised shapely and numpy calls).
CHUNK_ROWS = 4096


@dataclass(frozen=True, slots=True)
class Region:
    """One 4-connected region of one class over the whole job.

    ``polygon`` is in global pixel coordinates of zoom ``z``: a tile ``(x, y)``'s pixel
    ``(column, row)`` is ``(x * size + column, y * size + row)``, y down, integer vertices.
    ``tiles`` counts the tiles the region spans."""

    cls: str
    z: int
    size: int
    polygon: Polygon
    tiles: int


#: A border run waiting for (or offered to) a neighbour: ``(lo, hi, class, piece id)``.
_Run = tuple[float, float, str, int]
#: A piece's border runs on its tile's left, top, right and bottom sides: ``[(lo, hi), ...]``.
_Sides = tuple[list[tuple[float, float]], ...]


@dataclass(slots=True)
class _Open:
    """A region still being built: its pieces (global coordinates), their tiles, the ids of
    its pieces, and how many of its border runs still wait for a neighbour."""

    cls: str
    geoms: list[Polygon]
    tiles: list[tuple[int, int]]
    members: list[int]
    waiting: int


def _parse(chunk: Sequence[FeatureRow]) -> list[tuple[FeatureRow, Polygon, _Sides | None]]:
    """Each row's polygon(s), moved to global pixel coordinates, with the border runs of its
    exterior ring (holes never reach a tile's edge), in one vectorised pass over the chunk."""
    geoms = shapely.from_wkb([row.wkb for row in chunk])
    owner = np.arange(len(chunk))
    if (shapely.get_type_id(geoms) != shapely.GeometryType.POLYGON).any():
        geoms, owner = shapely.get_parts(geoms, return_index=True)  # a MultiPolygon's parts
    sizes = np.array([row.size for row in chunk], dtype=np.float64)[owner]
    origin = np.array([(row.x, row.y) for row in chunk], dtype=np.float64)[owner] * sizes[:, None]

    ring, index = shapely.get_coordinates(shapely.get_exterior_ring(geoms), return_index=True)
    same = index[:-1] == index[1:]
    ax, ay, bx, by = ring[:-1, 0], ring[:-1, 1], ring[1:, 0], ring[1:, 1]
    edge = sizes[index[:-1]]
    on_side = (
        same & (ax == 0) & (bx == 0),  # left
        same & (ay == 0) & (by == 0),  # top
        same & (ax == edge) & (bx == edge),  # right
        same & (ay == edge) & (by == edge),  # bottom
    )
    pieces, sides_of, lows, highs = [], [], [], []
    for side, where in enumerate(on_side):
        along_a, along_b = (ay, by) if side % 2 == 0 else (ax, bx)
        pieces.append(index[:-1][where])
        sides_of.append(np.full(int(where.sum()), side))
        lows.append(np.minimum(along_a, along_b)[where])
        highs.append(np.maximum(along_a, along_b)[where])
    piece, side_no = np.concatenate(pieces), np.concatenate(sides_of)
    lo, hi = np.concatenate(lows), np.concatenate(highs)
    order = np.lexsort((lo, side_no, piece))
    runs: list[_Sides | None] = [None] * len(geoms)
    for p, s, a, b in zip(
        piece[order].tolist(),
        side_no[order].tolist(),
        lo[order].tolist(),
        hi[order].tolist(),
        strict=True,
    ):
        if b <= a:
            continue
        sides = runs[p]
        if sides is None:
            sides = runs[p] = ([], [], [], [])
        side_runs = sides[s]
        if side_runs and side_runs[-1][1] == a:  # collinear steps of one run: one run
            side_runs[-1] = (side_runs[-1][0], b)
        else:
            side_runs.append((a, b))

    coords, which = shapely.get_coordinates(geoms, return_index=True)
    shapely.set_coordinates(geoms, coords + origin[which])
    return [(chunk[o], g, r) for o, g, r in zip(owner.tolist(), geoms.tolist(), runs, strict=True)]


class _Merger:
    """The streaming state: union-find over pieces, the runs waiting on the right sides of the
    previous column and of the current one, and the bottom runs of the previous tile."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.open: dict[int, _Open] = {}  # root -> region
        self.next_id = 0
        self.grid: tuple[int, int] | None = None  # (z, size)
        self.column: int | None = None
        self.right_prev: deque[tuple[int, list[_Run]]] = deque()  # column - 1, by row
        self.right_cur: deque[tuple[int, list[_Run]]] = deque()  # this column, by row
        self.bottom: tuple[int, list[_Run]] | None = None  # the previous tile's, by its row
        self.touched: list[int] = []
        self.closed: list[tuple[_Open, int, int]] = []

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while (up := parent[root]) != root:
            root = up
        while (up := parent[i]) != root:
            parent[i] = root
            i = up
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        big, small = self.open[ra], self.open[rb]
        if len(big.geoms) < len(small.geoms):
            ra, rb, big, small = rb, ra, small, big
        big.geoms += small.geoms
        big.tiles += small.tiles
        big.members += small.members
        big.waiting += small.waiting
        self.parent[rb] = ra
        del self.open[rb]

    def release(self, runs: Iterable[_Run]) -> None:
        """Runs that wait no more (met their neighbour, or it never came)."""
        for run in runs:
            root = self.find(run[3])
            self.open[root].waiting -= 1
            self.touched.append(root)

    def match(self, waiting: list[_Run], offered: list[_Run]) -> None:
        """Join the pieces of two facing sides' runs that share a stretch of positive length
        and a class; both lists sorted by ``lo``, the runs of one side disjoint."""
        i = j = 0
        while i < len(waiting) and j < len(offered):
            a, b = waiting[i], offered[j]
            if a[1] <= b[0]:
                i += 1
            elif b[1] <= a[0]:
                j += 1
            else:
                if a[2] == b[2]:
                    self.union(a[3], b[3])
                if a[1] <= b[1]:
                    i += 1
                else:
                    j += 1

    def tile(
        self, z: int, x: int, y: int, size: int, pieces: list[tuple[str, Polygon, _Sides | None]]
    ) -> None:
        if self.grid != (z, size):
            self.flush()
            self.grid = (z, size)
        if x != self.column:
            while self.right_prev:
                self.release(self.right_prev.popleft()[1])
            if self.column is not None and x == self.column + 1:
                self.right_prev, self.right_cur = self.right_cur, self.right_prev
            else:
                while self.right_cur:
                    self.release(self.right_cur.popleft()[1])
            if self.bottom is not None:
                self.release(self.bottom[1])
                self.bottom = None
            self.column = x
        from_left: list[_Run] | None = None
        while self.right_prev and self.right_prev[0][0] <= y:
            row, runs = self.right_prev.popleft()
            if row == y:
                from_left = runs
            else:
                self.release(runs)
        from_top: list[_Run] | None = None
        if self.bottom is not None:
            if self.bottom[0] == y - 1:
                from_top = self.bottom[1]
            else:
                self.release(self.bottom[1])
            self.bottom = None

        left: list[_Run] = []
        top: list[_Run] = []
        right: list[_Run] = []
        bottom: list[_Run] = []
        for cls, geom, sides in pieces:
            pid = self.next_id
            self.next_id += 1
            self.parent[pid] = pid
            waiting = 0
            if sides is not None:
                left += [(a, b, cls, pid) for a, b in sides[0]]
                top += [(a, b, cls, pid) for a, b in sides[1]]
                right += [(a, b, cls, pid) for a, b in sides[2]]
                bottom += [(a, b, cls, pid) for a, b in sides[3]]
                waiting = len(sides[2]) + len(sides[3])
            self.open[pid] = _Open(cls, [geom], [(x, y)], [pid], waiting)
            self.touched.append(pid)
        if right:
            right.sort()
            self.right_cur.append((y, right))
        if bottom:
            bottom.sort()
            self.bottom = (y, bottom)
        if from_left is not None:
            self.match(from_left, sorted(left))
            self.release(from_left)
        if from_top is not None:
            self.match(from_top, sorted(top))
            self.release(from_top)
        self.close()

    def flush(self) -> None:
        """Nothing more comes for this grid: every waiting run is released."""
        for queue in (self.right_prev, self.right_cur):
            while queue:
                self.release(queue.popleft()[1])
        if self.bottom is not None:
            self.release(self.bottom[1])
            self.bottom = None
        self.column = None
        self.close()

    def close(self) -> None:
        """Emit the touched regions that wait for nothing any more."""
        roots = {self.find(i) for i in self.touched}
        self.touched.clear()
        if not roots:
            return
        assert self.grid is not None
        z, size = self.grid
        for root in sorted(roots):
            region = self.open[root]
            if region.waiting:
                continue
            del self.open[root]
            for member in region.members:
                del self.parent[member]
            self.closed.append((region, z, size))

    def finish(self) -> list[Region]:
        """The closed regions' polygons: a region's one piece as stored, or its pieces unioned
        (exact: every vertex is an integer and every shared edge lies on a tile border), with
        the collinear vertices the tile borders left removed (one vectorised call a batch)."""
        closed, self.closed = self.closed, []
        joined = [i for i, (region, _, _) in enumerate(closed) if len(region.geoms) > 1]
        merged = shapely.simplify(
            np.array([shapely.union_all(closed[i][0].geoms) for i in joined], dtype=object), 0
        ).tolist()
        polygons = {i: m for i, m in zip(joined, merged, strict=True)}
        out = []
        for i, (region, z, size) in enumerate(closed):
            tiles = len(set(region.tiles)) if len(region.tiles) > 1 else 1
            polygon = polygons.get(i, region.geoms[0])
            if polygon.geom_type == "Polygon":
                out.append(Region(region.cls, z, size, polygon, tiles))
            else:  # never for 4-connected pieces; kept whole rather than lost
                out += [
                    Region(region.cls, z, size, p, tiles)
                    for p in shapely.get_parts(polygon).tolist()
                ]
        return out


def merge_regions(rows: Iterable[FeatureRow], *, chunk_rows: int = CHUNK_ROWS) -> Iterator[Region]:
    """One :class:`Region` per 4-connected region of a class, from a job's stored features in
    ``(z, x, y, seq)`` order (what ``store.iter_features`` yields), streamed: a region is
    yielded as soon as no later tile can touch it."""
    merger = _Merger()
    current: tuple[int, int, int, int] | None = None  # (z, x, y, size) of the tile being read
    pieces: list[tuple[str, Polygon, _Sides | None]] = []
    iterator = iter(rows)
    while chunk := [row for _, row in zip(range(chunk_rows), iterator, strict=False)]:
        for row, geom, sides in _parse(chunk):
            key = (row.z, row.x, row.y, row.size)
            if key != current:
                if current is not None:
                    if key[:3] < current[:3]:
                        raise ValueError(
                            f"features out of (z, x, y) order: tile {key[:3]} after {current[:3]}"
                        )
                    merger.tile(*current[:3], current[3], pieces)
                    pieces = []
                current = key
            pieces.append((row.cls, geom, sides))
        yield from merger.finish()
    if current is not None:
        merger.tile(*current[:3], current[3], pieces)
    merger.flush()
    yield from merger.finish()
    assert not merger.open, "every region completes once nothing waits"
