"""The command line, run as a user runs it: real files in, files and exit codes out."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from chipscale.cli import cli
from chipscale.sources.footprint import cover

EXE = [sys.executable, "-m", "chipscale.cli"]


def chipscale(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXE, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def demo_run(aerial, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    result = chipscale("run", "--source", str(aerial), "--zoom", "18", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout and "empty" in result.stdout  # the summary table
    return out


def test_run_writes_csv_geojson_and_preview(demo_run, aerial) -> None:
    tiles = set(cover(18, source=str(aerial)))
    with (demo_run / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(int(r["x"]), int(r["y"]), int(r["z"])) for r in rows} == tiles
    header = rows[0].keys()
    assert {"job", "z", "x", "y", "quadkey", "status"} <= set(header)
    assert {"snow", "forest"} & set(header)
    geojson = json.loads((demo_run / "results.geojson").read_text())
    assert geojson["type"] == "FeatureCollection" and len(geojson["features"]) == len(tiles)
    png = (demo_run / "preview.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_download_and_convert_geojson_with_a_class_filter(demo_run, tmp_path) -> None:
    db = f"sqlite:///{demo_run / 'results.db'}"
    runner = CliRunner()
    result = runner.invoke(cli, ["download", "--db", db, "-o", str(tmp_path / "all.csv")])
    assert result.exit_code == 0, result.output
    with (tmp_path / "all.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    classes = [
        c
        for c in rows[0]
        if c
        not in {"job", "z", "x", "y", "quadkey", "status", "model_name", "model_version", "error"}
    ]
    top = classes[0]
    expected = sum(1 for r in rows if r[top] and float(r[top]) >= 0.3)
    result = runner.invoke(
        cli,
        [
            "convert-geojson",
            str(tmp_path / "all.csv"),
            str(tmp_path / "top.geojson"),
            "--class",
            top,
            "--min-score",
            "0.3",
        ],
    )
    assert result.exit_code == 0, result.output
    features = json.loads((tmp_path / "top.geojson").read_text())["features"]
    assert len(features) == expected
    script = subprocess.run(
        ["scripts/download", "--db", db, "-o", str(tmp_path / "s.geojson")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert script.returncode == 0, script.stderr
    unknown = runner.invoke(cli, ["download", "--db", db, "--job", "nope", "-o", "x.csv"])
    assert unknown.exit_code == 1 and "nope" in unknown.output


def test_cover_writes_a_tile_list(aerial, tmp_path) -> None:
    out = tmp_path / "tiles.txt"
    result = CliRunner().invoke(
        cli, ["cover", "--source", str(aerial), "--zoom", "18", "-o", str(out), "--format", "z/x/y"]
    )
    assert result.exit_code == 0, result.output
    lines = out.read_text().split()
    assert len(lines) == len(list(cover(18, source=str(aerial))))
    assert all(line.startswith("18/") for line in lines)


def test_tile_writes_npz_and_png(aerial, tmp_path) -> None:
    tile = next(iter(cover(18, source=str(aerial))))
    spec = f"{tile.z}/{tile.x}/{tile.y}"
    result = CliRunner().invoke(cli, ["tile", str(aerial), spec, "-o", str(tmp_path / "t.npz")])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "t.npz") as saved:
        assert saved["data"].shape == (3, 256, 256) and saved["data"].dtype == np.uint8
        assert saved["mask"].dtype == bool and saved["mask"].any()
    result = CliRunner().invoke(cli, ["tile", str(aerial), spec, "-o", str(tmp_path / "t.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_gives_one_line_and_the_right_exit_code(aerial, tmp_path) -> None:
    text = tmp_path / "notes.tif"
    text.write_text("not a raster")
    state_dict = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), state_dict)
    far = tmp_path / "far.geojson"
    far.write_text('{"type": "Polygon", "coordinates": [[[0,0],[1,0],[1,1],[0,1],[0,0]]]}')
    cases = [
        (["run", "--source", str(tmp_path / "missing.tif"), "--zoom", "18"], 1, "missing.tif"),
        (["run", "--source", str(text), "--zoom", "18"], 1, "notes.tif"),
        (["run", "--source", str(aerial), "--zoom", "18", "--aoi", str(far)], 1, "overlap"),
        (
            ["run", "--source", str(aerial), "--zoom", "18", "--model", str(state_dict)],
            1,
            "state_dict",
        ),
        (["run", "--source", str(aerial), "--zoom", "40"], 2, "zoom"),
        (["tile", str(aerial), "18/999999999/1", "-o", str(tmp_path / "t.npz")], 2, "outside"),
        (["tile", str(aerial), "1-2-3", "-o", str(tmp_path / "t.npz")], 2, "Z/X/Y"),
        (["cover", "--zoom", "3"], 2, "--source"),
        (["cover", "--bbox", "1,2,3", "--zoom", "3"], 2, "bbox"),
    ]
    for args, code, needle in cases:
        result = (
            chipscale(*args, "--out", str(tmp_path / "o"))
            if args[0] == "run"
            else (chipscale(*args))
        )
        assert result.returncode == code, (args, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        assert needle in result.stderr, (args, result.stderr)
        if code == 1:
            assert result.stderr.strip().startswith("Error: ")
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "o" / "results.csv").exists()  # nothing half written


def test_run_over_a_tile_list_and_an_aoi(aerial, tmp_path) -> None:
    tiles = list(cover(19, source=str(aerial)))[:10]
    listing = tmp_path / "tiles.txt"
    listing.write_text("".join(f"{t.x}-{t.y}-{t.z}\n" for t in tiles) + "0-0-19\n")
    result = chipscale(
        "run",
        "--source",
        str(aerial),
        "--zoom",
        "19",
        "--tiles",
        str(listing),
        "--out",
        str(tmp_path / "a"),
        "--no-preview",
        "--job",
        "listed",
    )
    assert result.returncode == 0, result.stderr
    with (tmp_path / "a" / "results.csv").open() as handle:
        statuses = {(r["x"], r["y"]): r["status"] for r in csv.DictReader(handle)}
    assert len(statuses) == 11 and statuses[("0", "0")] == "empty"

    ring = [[128.6554, 37.6664], [128.6570, 37.6664], [128.6570, 37.6680], [128.6554, 37.6680]]
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(json.dumps({"type": "Polygon", "coordinates": [[*ring, ring[0]]]}))
    result = chipscale(
        "run",
        "--source",
        str(aerial),
        "--zoom",
        "19",
        "--aoi",
        str(aoi),
        "--out",
        str(tmp_path / "b"),
        "--no-preview",
    )
    assert result.returncode == 0, result.stderr
    with (tmp_path / "b" / "results.csv").open() as handle:
        count = sum(1 for _ in csv.DictReader(handle))
    assert 0 < count < len(list(cover(19, source=str(aerial))))


def test_download_by_top_class_alone(demo_run, tmp_path) -> None:
    db = f"sqlite:///{demo_run / 'results.db'}"
    out = tmp_path / "forest.geojson"
    result = CliRunner().invoke(cli, ["download", "--db", db, "-o", str(out), "--class", "forest"])
    assert result.exit_code == 0, result.output
    features = json.loads(out.read_text())["features"]
    assert features
    for feature in features:
        props = feature["properties"]
        scores = {c: props[c] for c in ("snow", "forest", "bare_ground", "road")}
        assert max(scores, key=scores.get) == "forest"
    bad = CliRunner().invoke(cli, ["download", "--db", db, "-o", str(out), "--class", "lava"])
    assert bad.exit_code == 1 and "snow" in bad.output  # names the classes it knows


def test_run_straight_from_s3(bucket, aerial, tmp_path) -> None:
    # The subprocess inherits AWS_ENDPOINT_URL (moto) and dummy credentials from the fixtures.
    result = chipscale(
        "run", "--source", f"s3://{bucket}/aerial.tif", "--zoom", "18", "--out", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    with (tmp_path / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(list(cover(18, source=str(aerial))))
    assert {r["status"] for r in rows} == {"ok"}
    assert (tmp_path / "preview.png").stat().st_size > 10_000


def test_status_reports_each_job(demo_run) -> None:
    db = f"sqlite:///{demo_run / 'results.db'}"
    result = CliRunner().invoke(cli, ["status", "--db", db, "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["queue"] is None  # --db: no queue to look at
    (job,) = document["jobs"]
    assert job["tiles"] == job["ok"] + job["empty"] + job["error"] and job["remaining"] == 0
    table = CliRunner().invoke(cli, ["status", "--db", db, "--job", job["job"]])
    assert job["job"] in table.output and "remaining" in table.output
    missing = CliRunner().invoke(cli, ["status", "--db", db, "--job", "nope"])
    assert missing.exit_code == 1


def test_model_info_prints_the_metadata_inside_the_file(tmp_path) -> None:
    from chipscale.models.predictors import demo_model_path

    result = CliRunner().invoke(cli, ["model", "info", str(demo_model_path())])
    assert result.exit_code == 0, result.output
    meta = json.loads(result.output)
    assert meta["name"] == "demo-landcover" and meta["classes"][0] == "snow"
    weights = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), weights)
    refused = CliRunner().invoke(cli, ["model", "info", str(weights)])
    assert refused.exit_code == 1 and "state_dict" in refused.output


def test_the_cli_starts_without_rasterio_and_still_reports_its_errors_in_one_line() -> None:
    """rasterio (with boto3 and numpy behind it) is about 50 MB and half a second at start:
    commands that read no raster (download, status, push from a list) do without it."""
    probe = (
        "import sys, chipscale.cli as c; "
        "print(sorted(m for m in ('rasterio', 'boto3', 'numpy', 'torch') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"

    from rasterio.errors import RasterioIOError

    from chipscale.cli import _reported_in_one_line
    from chipscale.errors import SourceError

    assert _reported_in_one_line(RasterioIOError("not a raster"))
    assert _reported_in_one_line(SourceError("missing"))
    assert _reported_in_one_line(FileNotFoundError("x"))
    assert not _reported_in_one_line(KeyError("a bug"))  # a bug keeps its traceback
