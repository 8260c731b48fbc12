"""CSV formula injection (issue 14, item 3): a job, class, model or error text that a
spreadsheet would run as a formula is neutralised with a leading apostrophe (OWASP) in every
CSV chipscale writes: ``download`` (direct and through a stack's operations Lambda) and
``run``'s out dir. Numbers, negative scores included, stay numbers; ``convert-geojson`` reads
the texts back as they were stored."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from mercantile import Tile
from test_stack_outputs import chipscale_template, deploy_stack

from chipscale.cli import cli
from chipscale.results import open_store
from chipscale.sources.footprint import cover
from chipscale.values import JobInfo, TileResult

JOB = '=HYPERLINK("http://evil.example","x")'
CLASSES = ("=cmd|' /C calc'!A0", "road")
MODEL, VERSION = "@SUM(1+1)", "+1"
ERRORS = ("-2+3", "\tx", "\rx", "'quoted")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def fill(url: str) -> None:
    with open_store(url) as store:
        store.start_job(JobInfo(JOB, "s3://b/a.tif", zoom=3, model_name=MODEL, classes=CLASSES))
        scores = {CLASSES[0]: -0.5, CLASSES[1]: 0.25}
        rows = [
            TileResult(JOB, Tile(0, 1, 3), "ok", scores, model_name=MODEL, model_version=VERSION)
        ]
        rows += [
            TileResult(JOB, Tile(x, 2, 3), "error", error=error, model_name=MODEL)
            for x, error in enumerate(ERRORS)
        ]
        store.write(rows)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def assert_no_formula(path: Path, *, scores: bool = True) -> list[dict[str, str]]:
    """No cell of the CSV starts a formula, but for the numbers; returns the rows."""
    with path.open(newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    header, *body = table
    numbers = {"z", "x", "y", *(f"'{c}" for c in CLASSES)}
    for row in [header, *body]:
        for name, value in zip(header, row, strict=True):
            if row is header or name not in numbers:
                assert not value.startswith(FORMULA_START), (name, value)
    assert f"'{CLASSES[0]}" in header
    rows = [dict(zip(header, row, strict=True)) for row in body]
    if scores:
        ok = next(r for r in rows if r["status"] == "ok")
        assert ok[f"'{CLASSES[0]}"] == "-0.5"  # a negative score is still a number
        assert (ok["job"], ok["model_name"], ok["model_version"]) == (
            f"'{JOB}",
            f"'{MODEL}",
            f"'{VERSION}",
        )
        assert {r["error"] for r in rows if r["error"]} == {f"'{e}" for e in ERRORS}
    return rows


def test_download_neutralises_formulas_and_convert_reads_them_back(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    fill(db)
    out = tmp_path / "out.csv"
    result = invoke("download", "--db", db, "-o", str(out))
    assert result.exit_code == 0, result.output
    assert_no_formula(out)
    geojson = tmp_path / "out.geojson"
    result = invoke("convert-geojson", str(out), str(geojson))
    assert result.exit_code == 0, result.output
    properties = [f["properties"] for f in json.loads(geojson.read_text())["features"]]
    assert {p["job"] for p in properties} == {JOB}
    assert {p["error"] for p in properties if p["error"]} == set(ERRORS)
    assert {p["model_name"] for p in properties} == {MODEL}
    ok = next(p for p in properties if p["status"] == "ok")
    assert ok[CLASSES[0]] == -0.5 and ok["model_version"] == VERSION


def test_download_through_the_stack_neutralises_formulas(
    results_db: str, local_lambda: list[dict], tmp_path: Path
) -> None:
    fill(results_db)
    stack = deploy_stack(chipscale_template())
    out = tmp_path / "via.csv"
    result = invoke("download", "--stack", stack, "-o", str(out))
    assert result.exit_code == 0, result.output
    assert_no_formula(out)


def test_run_writes_a_neutralised_csv(aerial: Path, tmp_path: Path) -> None:
    tile = next(iter(cover(18, source=str(aerial))))
    tiles = tmp_path / "tiles.txt"
    tiles.write_text(f"{tile.z}/{tile.x}/{tile.y}\n")
    out = tmp_path / "out"
    result = invoke(
        "run",
        "--source",
        str(aerial),
        "--zoom",
        "18",
        "--tiles",
        str(tiles),
        "--job",
        JOB,
        "--out",
        str(out),
        "--no-preview",
    )
    assert result.exit_code == 0, result.output
    with (out / "results.csv").open(newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert row["job"] == f"'{JOB}"


@pytest.mark.parametrize("text", ["=1+1", "+1", "-1", "@A1", "\t=1", "\r=1", "'=1", "plain"])
def test_spreadsheet_text_round_trips(text: str) -> None:
    from chipscale.safe_text import from_spreadsheet_text, spreadsheet_text

    safe = spreadsheet_text(text)
    assert not safe.startswith(FORMULA_START)
    assert from_spreadsheet_text(safe) == text
