"""Reading commands never create a results store (issue 14, item 21).

``chipscale status`` and ``download`` on a mistyped SQLite path used to create an empty
database and exit 0. Now a missing file, or a SQLite file without chipscale's results, is a
one-line error and nothing is written; ``run`` and ``db-setup`` still create the store.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from mercantile import Tile

from chipscale.cli import cli
from chipscale.results import open_store
from chipscale.values import JobInfo, TileResult


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


def assert_one_line_error(result: Result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), result.stderr
    for word in words:
        assert word in lines[-1], lines[-1]


@pytest.mark.parametrize(
    "spelling",
    ["sqlite:///{}/typo/results.db", "sqlite:///{}/results.dbb", "{}/typo.sqlite"],
)
@pytest.mark.parametrize("command", ["status", "download"])
def test_reading_a_missing_sqlite_store_is_an_error_that_creates_nothing(
    tmp_path: Path, spelling: str, command: str
) -> None:
    url = spelling.format(tmp_path)
    args = ["-o", str(tmp_path / "out.csv")] if command == "download" else []
    result = run(command, "--db", url, *args)
    assert_one_line_error(result, "no SQLite results store", "results")
    assert files_under(tmp_path) == []  # no database, no folder, no export


@pytest.mark.parametrize("command", ["status", "download"])
def test_reading_a_sqlite_file_without_results_changes_nothing(
    tmp_path: Path, command: str
) -> None:
    other = tmp_path / "notes.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    before = other.read_bytes()
    args = ["-o", str(tmp_path / "out.csv")] if command == "download" else []
    result = run(command, "--db", f"sqlite:///{other}", *args)
    assert_one_line_error(result, str(other), "no chipscale results")
    assert other.read_bytes() == before
    assert files_under(tmp_path) == [other]


def test_reading_commands_still_read_an_existing_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'results.db'}"
    with open_store(url) as store:
        store.start_job(JobInfo("j", "a.tif", zoom=3, tiles_total=2))
        store.write([TileResult("j", Tile(1, 1, 3), "ok", {"a": 1.0})])
    status = run("status", "--db", url, "--json")
    assert status.exit_code == 0, status.output
    download = run("download", "--db", url, "-o", str(tmp_path / "out.csv"))
    assert download.exit_code == 0, download.output
    assert (tmp_path / "out.csv").read_text().count("\n") == 2


def test_writing_commands_still_create_the_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'results.db'}"
    result = run("db-setup", "--db", url)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new" / "results.db").is_file()
    assert run("status", "--db", url).exit_code == 0  # and then it reads


def test_push_resume_needs_an_existing_store(tmp_path: Path) -> None:
    """``push --resume`` reads the done tiles: a mistyped store would push every tile again."""
    tiles = tmp_path / "tiles.txt"
    tiles.write_text("1-1-3\n")
    url = f"sqlite:///{tmp_path / 'typo.db'}"
    result = run(
        "push", str(tiles), "--source", "s3://b/a.tif", "--db", url, "--resume", "--dry-run"
    )
    assert_one_line_error(result, "no SQLite results store")
    assert files_under(tmp_path) == [tiles]
