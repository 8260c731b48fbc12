"""Planning a push: every tile becomes one sortable 8-byte key, sorted in runs (spilled to
temporary files beyond memory) and merged, so duplicates go, the order is the one packs
stream from, and the totals are known before the first message is sent."""

from __future__ import annotations

import heapq
import shutil
import tempfile
from array import array
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mercantile import Tile

from chipscale.errors import TileListError

#: Tiles sorted in memory at once; beyond that, sorted runs go to temporary files
#: (8 bytes a tile) and are merged. A million keys is 8 MB.
DEFAULT_CHUNK_TILES = 1_000_000
#: Keys decoded into tiles at a time while streaming.
BLOCK_KEYS = 65_536


# A tile is one uint64: (1 << 2z) | morton(x, y), with y's bit above x's at each level (the
# quadkey digit 2*y + x). Keys of one zoom fill [4**z, 2 * 4**z), so sorting keys sorts by
# zoom and then quadkey: the order in which the tiles of a pack lie together. 2z + 1 <= 61
# bits up to zoom 30.

_SPREAD = (
    (16, 0x0000FFFF0000FFFF),
    (8, 0x00FF00FF00FF00FF),
    (4, 0x0F0F0F0F0F0F0F0F),
    (2, 0x3333333333333333),
    (1, 0x5555555555555555),
)
_COMPACT = (
    (1, 0x3333333333333333),
    (2, 0x0F0F0F0F0F0F0F0F),
    (4, 0x00FF00FF00FF00FF),
    (8, 0x0000FFFF0000FFFF),
    (16, 0x00000000FFFFFFFF),
)


def _spread_bits(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.uint64)
    for shift, mask in _SPREAD:
        v = (v | (v << np.uint64(shift))) & np.uint64(mask)
    return v


def _compact_bits(values: np.ndarray) -> np.ndarray:
    v = values & np.uint64(0x5555555555555555)
    for shift, mask in _COMPACT:
        v = (v | (v >> np.uint64(shift))) & np.uint64(mask)
    return v


def encode_tiles(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Sortable uint64 keys of tiles given as arrays of x, y and z.

    >>> encode_tiles(np.array([1]), np.array([2]), np.array([3])).tolist()
    [73]
    """
    zoom_bit = np.left_shift(np.uint64(1), np.asarray(z).astype(np.uint64) * np.uint64(2))
    return zoom_bit | _spread_bits(np.asarray(x)) | (_spread_bits(np.asarray(y)) << np.uint64(1))


def decode_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, y and z arrays of keys made by :func:`encode_tiles`."""
    keys = np.asarray(keys, dtype=np.uint64)
    # float64 rounds a key near 2 * 4**z up to 2 * 4**z at worst: still zoom z, never z + 1.
    z = (np.floor(np.log2(keys.astype(np.float64))).astype(np.int64) // 2).astype(np.uint64)
    morton = keys ^ np.left_shift(np.uint64(1), z * np.uint64(2))
    return _compact_bits(morton), _compact_bits(morton >> np.uint64(1)), z


def tiles_to_keys(tiles: Iterable[Tile]) -> np.ndarray:
    """Sorted unique keys of a collection of tiles (e.g. the done tiles of a resume)."""
    x, y, z = array("I"), array("I"), array("B")
    for tile in tiles:
        x.append(tile.x)
        y.append(tile.y)
        z.append(tile.z)
    if not x:
        return np.empty(0, dtype=np.uint64)
    keys = encode_tiles(
        np.frombuffer(x, np.uint32), np.frombuffer(y, np.uint32), np.frombuffer(z, np.uint8)
    )
    return _sorted_unique(keys)


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    """Sort ``keys`` in place and return them without repeats.

    Not ``np.unique``: in numpy 2.4 it peaks at about six times the input's size (50 MB for
    a million keys), where an in-place sort and a mask cost one byte a key more.
    """
    keys.sort()
    if len(keys) < 2:
        return keys
    keep = np.empty(len(keys), dtype=bool)
    keep[0] = True
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    return keys if keep.all() else keys[keep]


def keys_to_tiles(keys: np.ndarray) -> Iterator[Tile]:
    """The tiles of a block of keys, in key order."""
    x, y, z = decode_keys(keys)
    return map(Tile, x.tolist(), y.tolist(), z.tolist())


@dataclass
class PushPlan:
    """The unique tiles of a push as sorted keys, in memory or in one temporary file.

    ``total`` counts every unique tile given; ``skipped`` those a resume leaves out (see
    :meth:`skip_done`); ``todo`` the rest, which :meth:`tiles` yields in pack order. Close it
    (or use it as a context manager) to remove its temporary files.
    """

    total: int
    zooms: frozenset[int]
    _keys: np.ndarray | None = None
    _path: Path | None = None
    _workdir: Path | None = None
    _done: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    skipped: int = 0

    @property
    def todo(self) -> int:
        return self.total - self.skipped

    @property
    def zoom(self) -> int | None:
        """The zoom of every tile, or None for an empty or mixed-zoom push."""
        return next(iter(self.zooms)) if len(self.zooms) == 1 else None

    def blocks(self, size: int = BLOCK_KEYS) -> Iterator[np.ndarray]:
        """Every key, sorted, ``size`` at a time (read from disk when spilled)."""
        if self._keys is not None:
            for start in range(0, len(self._keys), size):
                yield self._keys[start : start + size]
            return
        if self._path is None:
            return
        with self._path.open("rb") as handle:
            while len(block := np.fromfile(handle, dtype=np.uint64, count=size)):
                yield block

    def skip_done(self, done: Collection[Tile]) -> int:
        """Leave out the tiles a results store has as done; returns how many of ours those are.

        The store's set is turned into sorted keys (8 bytes a tile) and filtered against per
        block, so a large done set costs one pass, not a lookup per tile in Python.
        """
        self._done = tiles_to_keys(done)
        self.skipped = 0
        if len(self._done):
            for block in self.blocks():
                self.skipped += int(_member(block, self._done).sum())
        return self.skipped

    def tiles(self) -> Iterator[Tile]:
        """The tiles to push, sorted by zoom then quadkey: what packs stream from."""
        for block in self.blocks():
            if len(self._done):
                block = block[~_member(block, self._done)]
            yield from keys_to_tiles(block)

    def close(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> PushPlan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Which of ``keys`` are in ``sorted_keys``: a binary search each, so a block costs
    O(block log done), not a sort of the whole done set as ``np.isin`` does."""
    at = np.searchsorted(sorted_keys, keys)
    at[at == len(sorted_keys)] = 0
    return sorted_keys[at] == keys


class _RunWriter:
    """Collects tiles and turns each ``chunk_tiles`` of them into a sorted, deduplicated run
    of keys (kept in memory until a second run spills both to files).

    Tiles are encoded ``BLOCK_KEYS`` at a time into one growing array of 8-byte keys, so the
    numpy temporaries of the encoding stay small whatever the chunk size.
    """

    def __init__(self, chunk_tiles: int, workdir: str | Path | None) -> None:
        self.chunk_tiles = max(1, chunk_tiles)
        self._parent = workdir
        self.workdir: Path | None = None
        self.runs: list[Path] = []
        self.first: np.ndarray | None = None
        self.zooms: set[int] = set()
        self._keys = array("Q")
        self._reset_block()

    def _reset_block(self) -> None:
        self.x, self.y, self.z = array("I"), array("I"), array("B")

    def add(self, tile: Tile) -> None:
        self.x.append(tile.x)
        self.y.append(tile.y)
        self.z.append(tile.z)
        if len(self.x) >= BLOCK_KEYS or len(self._keys) + len(self.x) >= self.chunk_tiles:
            self._encode_block()
            if len(self._keys) >= self.chunk_tiles:
                self.flush()

    def _encode_block(self) -> None:
        if not self.x:
            return
        z = np.frombuffer(self.z, np.uint8)
        self.zooms.update(np.flatnonzero(np.bincount(z)).tolist())
        keys = encode_tiles(np.frombuffer(self.x, np.uint32), np.frombuffer(self.y, np.uint32), z)
        self._keys.frombytes(keys.tobytes())
        self._reset_block()

    def flush(self) -> None:
        self._encode_block()
        if not self._keys:
            return
        keys = _sorted_unique(np.array(self._keys, dtype=np.uint64))
        self._keys = array("Q")
        if self.first is None and not self.runs:
            self.first = keys
            return
        if self.first is not None:
            self._spill(self.first)
            self.first = None
        self._spill(keys)

    def _spill(self, keys: np.ndarray) -> None:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="chipscale-push-", dir=self._parent))
        path = self.workdir / f"run-{len(self.runs):05d}.u64"
        keys.tofile(path)
        self.runs.append(path)


def plan_push(
    tiles: Iterable[Tile],
    *,
    zoom: int | None = None,
    chunk_tiles: int = DEFAULT_CHUNK_TILES,
    workdir: str | Path | None = None,
    name: str = "tiles",
) -> PushPlan:
    """Read every tile, check its zoom, and sort the unique ones into pack order.

    Memory stays bounded by ``chunk_tiles`` (about 24 bytes a tile while a chunk is sorted);
    larger inputs are sorted in runs on disk and merged. A tile at another zoom than
    ``zoom`` (when given) is an error naming ``name``, raised before anything is sent.
    """
    runs = _RunWriter(chunk_tiles, workdir)
    try:
        for tile in tiles:
            if zoom is not None and tile.z != zoom:
                raise TileListError(
                    f"{name}: tile {tile.z}/{tile.x}/{tile.y} is at zoom {tile.z}, not {zoom}"
                )
            runs.add(tile)
        runs.flush()
        zooms = frozenset(runs.zooms)
        if runs.first is not None or not runs.runs:
            keys = runs.first if runs.first is not None else np.empty(0, dtype=np.uint64)
            return PushPlan(total=len(keys), zooms=zooms, _keys=keys)
        assert runs.workdir is not None
        merged = runs.workdir / "tiles.u64"
        total = (
            _merge_runs(runs.runs, merged) if len(runs.runs) > 1 else _adopt(runs.runs[0], merged)
        )
        return PushPlan(total=total, zooms=zooms, _path=merged, _workdir=runs.workdir)
    except BaseException:
        if runs.workdir is not None:
            shutil.rmtree(runs.workdir, ignore_errors=True)
        raise


def _adopt(run: Path, out: Path) -> int:
    run.rename(out)
    return out.stat().st_size // 8


def _iter_run(path: Path) -> Iterator[int]:
    with path.open("rb") as handle:
        while len(block := np.fromfile(handle, dtype=np.uint64, count=BLOCK_KEYS)):
            yield from block.tolist()


def _merge_runs(runs: Sequence[Path], out: Path) -> int:
    """Merge sorted runs into one sorted file without duplicates; returns the key count."""
    count = 0
    last = -1
    buffer: list[int] = []
    with out.open("wb") as handle:
        for key in heapq.merge(*(_iter_run(path) for path in runs)):
            if key == last:
                continue
            last = key
            buffer.append(key)
            if len(buffer) >= BLOCK_KEYS:
                np.array(buffer, dtype=np.uint64).tofile(handle)
                count += len(buffer)
                buffer.clear()
        np.array(buffer, dtype=np.uint64).tofile(handle)
        count += len(buffer)
    for path in runs:
        path.unlink()
    return count
