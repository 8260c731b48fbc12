"""A damaged source decided tile by tile (issue 14, item 10), and ``chipscale tile``'s PNG
written without a GDAL warning (item 22).

A real COG of the aerial image is cut short: the tiles whose blocks lie in the lost tail
cannot be read, the others can. ``chipscale run`` must store each tile as ``chipscale tile``
finds it (``ok`` where it reads, ``error`` naming the failed block where it does not), not
every tile of a pack as ``error`` because their shared read failed.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from rasterio.shutil import copy as rio_copy

from chipscale.cli import cli
from chipscale.sources.footprint import cover

EXE = [sys.executable, "-m", "chipscale.cli"]


@pytest.fixture(scope="module")
def truncated(aerial: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The aerial image as a deflate COG of 256 px blocks, no overviews, cut at 60 %: the
    first block rows are whole, the last ones are gone."""
    directory = tmp_path_factory.mktemp("cut")
    whole = directory / "whole.tif"
    rio_copy(aerial, whole, driver="COG", compress="DEFLATE", blocksize=256, overviews="NONE")
    data = whole.read_bytes()
    cut = directory / "cut.tif"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    return cut


def test_a_truncated_tiff_is_decided_tile_by_tile(truncated: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = CliRunner().invoke(
        cli,
        ["-q", "run", "--source", str(truncated), "-z", "18", "--out", str(out), "--no-preview"],
    )
    assert run.exit_code == 0, run.output
    with (out / "results.csv").open() as handle:
        rows = {(int(r["x"]), int(r["y"])): r for r in csv.DictReader(handle)}
    tiles = list(cover(18, source=str(truncated)))
    assert len(rows) == len(tiles) == 16

    readable = {}
    for tile in tiles:
        alone = CliRunner().invoke(
            cli,
            ["-q", "tile", str(truncated), f"18/{tile.x}/{tile.y}", "-o", str(tmp_path / "t.npz")],
        )
        readable[(tile.x, tile.y)] = alone.exit_code == 0
    assert 0 < sum(readable.values()) < len(tiles), readable  # some of each
    for key, row in rows.items():
        if readable[key]:
            assert row["status"] == "ok" and row["error"] == "", row
        else:
            assert row["status"] == "error", row
            # Which part failed: the band, the block, and that the file ends too soon.
            assert "IReadBlock failed at X offset" in row["error"], row["error"]
            assert "truncated" in row["error"] and "See previous" not in row["error"]


def test_tile_writes_a_png_without_a_gdal_warning(aerial: Path, tmp_path: Path) -> None:
    tile = next(iter(cover(18, source=str(aerial))))
    png = tmp_path / "t.png"
    for quiet in ([], ["-q"]):
        result = subprocess.run(
            [*EXE, *quiet, "tile", str(aerial), f"{tile.z}/{tile.x}/{tile.y}", "-o", str(png)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert "Warning" not in result.stderr and "geotransform" not in result.stderr, result.stderr
        assert png.read_bytes()[:4] == b"\x89PNG"
