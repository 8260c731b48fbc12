"""AOIs and bboxes that are wrong or odd, through ``chipscale cover`` as a user meets them:
repaired with a warning when the intent is clear, else refused in one line (exit 1 for a
file, 2 for an option), never silently clipped or halved."""

from __future__ import annotations

import json
from pathlib import Path

import mercantile
import pytest
from click.testing import CliRunner, Result
from shapely.geometry import Polygon, box

from chipscale.cli import cli

BOWTIE = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}


def cover_cli(*args: str) -> Result:
    return CliRunner().invoke(cli, ["cover", *args])


def write_aoi(tmp_path: Path, doc: dict | str) -> str:
    path = tmp_path / "aoi.geojson"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def tiles_of(result: Result) -> set[tuple[int, int, int]]:
    return {tuple(map(int, line.split("-"))) for line in result.stdout.split()}  # type: ignore[misc]


def reference_cover(parts: list[Polygon], zoom: int) -> set[tuple[int, int, int]]:
    """Brute force, independent of chipscale.grid.cover: every tile of the parts' bounds whose
    box shares some area with a part."""
    found = set()
    for part in parts:
        for tile in mercantile.tiles(*part.bounds, zoom):
            if box(*mercantile.bounds(tile)).intersection(part).area > 0:
                found.add(tuple(tile))
    return found


def assert_one_line_error(result: Result, code: int, *words: str) -> None:
    shown = result.output[-300:]
    assert result.exit_code == code, shown
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error:"), shown
    size, traceback = len(result.stderr), "Traceback" in result.stderr
    assert size < 600 and not traceback, shown
    for word in words:
        assert word in lines[-1], lines[-1]


def test_self_intersecting_aoi_keeps_both_lobes_and_warns_once(tmp_path: Path) -> None:
    result = cover_cli("--aoi", write_aoi(tmp_path, BOWTIE), "-z", "8")
    assert result.exit_code == 0, result.output
    left = Polygon([(0, 0), (5, 5), (0, 10)])
    right = Polygon([(10, 0), (5, 5), (10, 10)])
    assert tiles_of(result) == reference_cover([left, right], 8)
    assert tiles_of(result) & reference_cover([left], 8) == reference_cover([left], 8)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "repaired" in warnings[0], result.stderr


def test_a_valid_aoi_gets_no_warning(tmp_path: Path) -> None:
    square = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]}
    result = cover_cli("--aoi", write_aoi(tmp_path, square), "-z", "8")
    assert result.exit_code == 0 and "Warning" not in result.stderr, result.output


@pytest.mark.parametrize(
    ("ring", "word"),
    [
        ([[0, 0], [500, 0], [500, 10], [0, 10], [0, 0]], "500"),
        ([[0, 0], [10, 0], [10, 100], [0, 100], [0, 0]], "100"),
        ([[0, 0], [-361, 0], [-361, 10], [0, 10], [0, 0]], "-361"),
        ([[0, 0], [1e999, 0], [1, 1], [0, 0]], "inf"),
    ],
)
def test_out_of_range_coordinates_are_refused(tmp_path: Path, ring: list, word: str) -> None:
    doc = {"type": "Polygon", "coordinates": [ring]}
    text = json.dumps(doc).replace("Infinity", "1e999")
    result = cover_cli("--aoi", write_aoi(tmp_path, text), "-z", "8")
    assert_one_line_error(result, 1, "AOI", word)


def test_nan_in_an_aoi_is_refused(tmp_path: Path) -> None:
    text = '{"type": "Polygon", "coordinates": [[[0, 0], [NaN, 0], [1, 1], [0, 0]]]}'
    assert_one_line_error(cover_cli("--aoi", write_aoi(tmp_path, text), "-z", "8"), 1, "AOI")


def test_a_ring_wider_than_the_world_is_refused(tmp_path: Path) -> None:
    ring = [[-170, 0], [250, 0], [250, 10], [-170, 10], [-170, 0]]
    result = cover_cli(
        "--aoi", write_aoi(tmp_path, {"type": "Polygon", "coordinates": [ring]}), "-z", "2"
    )
    assert_one_line_error(result, 1, "AOI", "360")


def test_beyond_mercator_latitudes_are_clipped_not_refused(tmp_path: Path) -> None:
    ring = [[0, 80], [10, 80], [10, 90], [0, 90], [0, 80]]
    result = cover_cli(
        "--aoi", write_aoi(tmp_path, {"type": "Polygon", "coordinates": [ring]}), "-z", "4"
    )
    assert result.exit_code == 0, result.output
    assert tiles_of(result) == {(8, 0, 4), (8, 1, 4)}  # 80..85.05 N, nothing lost


def test_a_ring_written_across_the_antimeridian_is_still_read(tmp_path: Path) -> None:
    ring = [[179, -1], [181, -1], [181, 1], [179, 1], [179, -1]]
    result = cover_cli(
        "--aoi", write_aoi(tmp_path, {"type": "Polygon", "coordinates": [ring]}), "-z", "5"
    )
    assert result.exit_code == 0, result.output
    assert len(tiles_of(result)) == 4


@pytest.mark.parametrize(
    "bbox", ["0,0,500,10", "0,0,10,100", "nan,0,10,10", "0,0,inf,10", "0,-inf,10,10"]
)
def test_out_of_range_bbox_is_refused(bbox: str) -> None:
    result = cover_cli("--bbox", bbox, "-z", "8")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "--bbox" in result.stderr


def test_a_huge_bbox_text_is_cut_in_the_error() -> None:
    result = cover_cli("--bbox", "x" * 100_000, "-z", "8")
    assert result.exit_code == 2, result.output[-300:]
    assert len(result.stderr) < 600, len(result.stderr)


@pytest.mark.parametrize(
    "text",
    [
        '{"type": "Polygon", "coordinates": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"type": "GeometryCollection", "geometries": ['
        + '{"type": "GeometryCollection", "geometries": [' * 100_000
        + "]}" * 100_000
        + "]}",
        '{"type": "GeometryCollection", "geometries": ['
        + '{"type": "GeometryCollection", "geometries": [' * 900
        + "]}" * 900
        + "]}",
        '{"type": "Polygon", "coordinates": ' + "[" * 900 + "0" + "]" * 900 + "}",
    ],
    ids=["arrays-100000", "collections-100000", "collections-900", "arrays-900"],
)
def test_deeply_nested_aoi_is_a_one_line_error(tmp_path: Path, text: str) -> None:
    result = cover_cli("--aoi", write_aoi(tmp_path, text), "-z", "8")
    assert_one_line_error(result, 1, "AOI")


def test_a_huge_geojson_type_is_cut_in_the_error(tmp_path: Path) -> None:
    text = json.dumps({"type": "x" * 1_000_000})
    result = cover_cli("--aoi", write_aoi(tmp_path, text), "-z", "8")
    assert_one_line_error(result, 1, "AOI", "unknown GeoJSON type")
