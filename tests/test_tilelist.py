"""Tile values and tile-list files: the three formats, and off-grid input refused."""

from __future__ import annotations

import io

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from mercantile import Tile

from chipscale.errors import InvalidTileError, TileListError
from chipscale.grid.tilelist import (
    format_tile,
    iter_tile_lines,
    make_tile,
    parse_tile,
    read_tile_list,
    write_tile_list,
)


@st.composite
def tiles(draw: st.DrawFn) -> Tile:
    z = draw(st.integers(0, 30))
    n = 1 << z
    return Tile(draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1)), z)


@given(tiles(), st.sampled_from(["x-y-z", "z/x/y", "json"]))
@example(Tile(0, 0, 0), "x-y-z")
@example(Tile(2**30 - 1, 2**30 - 1, 30), "z/x/y")
def test_format_then_parse_round_trips(tile: Tile, fmt: str) -> None:
    assert parse_tile(format_tile(tile, fmt)) == tile


@pytest.mark.parametrize(
    ("x", "y", "z"),
    [(-1, 0, 3), (0, -1, 3), (8, 0, 3), (0, 8, 3), (0, 0, 31), (0, 0, -1), (0, 0, 40)],
)
def test_off_grid_tiles_are_refused(x: int, y: int, z: int) -> None:
    with pytest.raises(InvalidTileError, match=r"outside|zoom"):
        make_tile(x, y, z)


@pytest.mark.parametrize("text", ["1-2", "a/b/c", "[1, 2]", "[1, 2, 3.5]", "", "1-2-3-4"])
def test_malformed_tiles_are_refused(text: str) -> None:
    with pytest.raises(InvalidTileError):
        parse_tile(text)


def test_command_line_form_is_z_x_y_only() -> None:
    assert parse_tile("18/223456/101234", order="zxy") == Tile(223456, 101234, 18)
    with pytest.raises(InvalidTileError, match="Z/X/Y"):
        parse_tile("1-2-3", order="zxy")


def test_tile_list_reads_all_three_formats_and_skips_comments(tmp_path) -> None:
    path = tmp_path / "tiles.txt"
    path.write_text("# header\n17-44-6\n\n6/18/44\n[19, 44, 6],\n")
    assert list(read_tile_list(path)) == [Tile(17, 44, 6), Tile(18, 44, 6), Tile(19, 44, 6)]


def test_tile_list_error_names_file_and_line(tmp_path) -> None:
    path = tmp_path / "tiles.txt"
    path.write_text("1-1-1\n5-5-2\n")
    with pytest.raises(TileListError, match=r"tiles.txt, line 2: .*outside"):
        list(read_tile_list(path))


def test_missing_tile_list_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(TileListError, match="Cannot read tile list"):
        list(read_tile_list(tmp_path / "nope.txt"))


def test_write_tile_list_counts() -> None:
    out = io.StringIO()
    assert write_tile_list([Tile(1, 2, 3), Tile(0, 0, 0)], out, "z/x/y") == 2
    assert out.getvalue() == "3/1/2\n0/0/0\n"
    assert list(iter_tile_lines(out.getvalue().splitlines())) == [Tile(1, 2, 3), Tile(0, 0, 0)]
