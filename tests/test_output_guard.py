"""No command writes its output over its own results store or input (issue 14, item 9).

``download --db sqlite:///X/r.csv -o X/r.csv`` replaced the database with the CSV (exit 0),
``run --db sqlite:///out/results.csv`` exported over its own database, ``convert-geojson
c.csv c.csv`` overwrote its input. Outputs are compared with the store's files and the
inputs as resolved real paths: relative or absolute, ``./``, a symlink or a hard link to
the same file are all the same file. The refusal is one line, exit 1, nothing written.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from mercantile import Tile

from chipscale.cli import cli
from chipscale.results import open_store
from chipscale.values import JobInfo, TileResult


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_refused(result: Result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: refusing to write"), result.stderr
    for word in words:
        assert word in lines[-1], lines[-1]


def make_store(path: Path) -> str:
    """A results store at ``path`` (whatever its suffix), one job of two rows; its URL."""
    url = f"sqlite:///{path}"
    with open_store(url) as store:
        store.start_job(JobInfo("j", "a.tif", zoom=3, tiles_total=2, classes=("a", "b")))
        store.write(
            [
                TileResult("j", Tile(1, 1, 3), "ok", {"a": 0.8, "b": 0.2}),
                TileResult("j", Tile(2, 1, 3), "empty"),
            ]
        )
    return url


def assert_intact(url: str, before: str, path: Path) -> None:
    assert digest(path) == before
    with open_store(url) as store:
        assert store.counts("j")["total"] == 2


@pytest.mark.parametrize("spelling", ["absolute", "relative", "dot", "symlink", "wal"])
def test_download_refuses_to_write_over_its_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    db = tmp_path / "X" / "r.csv"
    url = make_store(db)
    before = digest(db)
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "link.csv"
    link.symlink_to(db)
    output = {
        "absolute": str(db),
        "relative": "X/r.csv",
        "dot": "./X/../X/r.csv",
        "symlink": str(link),
        "wal": "X/r.csv-wal",  # the store's write-ahead log is the store too
    }[spelling]
    result = run("download", "--db", url, "-o", output)
    assert_refused(result, "results store", str(db))
    assert_intact(url, before, db)


def test_run_refuses_to_export_over_its_store(aerial: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for name in ("results.csv", "results.geojson"):
        db = out / name
        url = make_store(db)
        before = digest(db)
        relative = os.path.relpath(db)
        result = run(
            "run", "--source", str(aerial), "--zoom", "18", "--db", f"sqlite:///{relative}",
            "--out", str(out), "--no-preview",
        )  # fmt: skip
        assert_refused(result, "results store", name)
        assert_intact(url, before, db)
        assert sorted(p.name for p in out.iterdir()) == [name]  # nothing else written
        db.unlink()


def test_convert_geojson_refuses_to_write_over_its_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = make_store(tmp_path / "r.db")
    csv = tmp_path / "c.csv"
    assert run("download", "--db", url, "-o", str(csv)).exit_code == 0
    before = digest(csv)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hard.csv").hardlink_to(csv)
    (tmp_path / "soft.csv").symlink_to(csv)
    for output in ("c.csv", "./c.csv", str(csv), "hard.csv", "soft.csv"):
        result = run("convert-geojson", "c.csv", output)
        assert_refused(result, "input", "c.csv")
        assert digest(csv) == before
    done = run("convert-geojson", "c.csv", "c.geojson")  # a real output still works
    assert done.exit_code == 0, done.output
