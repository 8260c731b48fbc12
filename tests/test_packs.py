"""Packing tiles into messages: adjacent, bounded, nothing lost or repeated."""

from __future__ import annotations

import mercantile
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mercantile import Tile

from chipscale.grid.cover import cover_bbox
from chipscale.grid.packs import pack_key, pack_levels, pack_tiles


@pytest.mark.parametrize(
    ("max_tiles", "levels"), [(1, 0), (3, 0), (4, 1), (63, 2), (64, 3), (100, 3), (256, 4)]
)
def test_pack_levels(max_tiles: int, levels: int) -> None:
    assert pack_levels(max_tiles) == levels


def test_packs_of_a_cover_hold_every_tile_once_and_stay_bounded() -> None:
    tiles = list(cover_bbox((128.6554, 37.6664, 128.6609, 37.6708), 20))
    packs = list(pack_tiles(iter(tiles), 100, presorted=True))
    flat = [t for pack in packs for t in pack]
    assert sorted(flat) == sorted(tiles)
    assert all(1 <= len(p) <= 100 for p in packs)
    # adjacent: every pack fits inside one grandparent tile of its pack parents
    for pack in packs:
        assert len({pack_key(t, 4) for t in pack}) == 1
    # the streaming and the in-memory grouping agree
    unsorted = list(pack_tiles(reversed(tiles), 100))
    assert {frozenset(p) for p in packs} == {frozenset(p) for p in unsorted}


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)), max_size=400), st.integers(1, 120)
)
def test_unsorted_input_is_packed_without_loss(xy: list[tuple[int, int]], max_tiles: int) -> None:
    tiles = [Tile(x, y, 8) for x, y in xy]
    packs = list(pack_tiles(tiles, max_tiles))
    flat = [t for pack in packs for t in pack]
    assert sorted(flat) == sorted(set(tiles))
    assert all(len(p) <= max_tiles for p in packs)


def test_small_edge_groups_are_merged_under_a_grandparent() -> None:
    parent = Tile(10, 10, 10)
    a, b = mercantile.children(parent)[:2]
    tiles = [*mercantile.children(a, zoom=13)[:5], *mercantile.children(b, zoom=13)[:5]]
    assert [len(p) for p in pack_tiles(tiles, 100)] == [10]
