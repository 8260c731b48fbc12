"""Terminal control characters (issue 14, item 4): stored text holding ESC, CR or BEL (a job
name, a model name, a source, an error) and rich markup such as ``[bold red]`` reach the
terminal escaped, never obeyed, in ``status``, ``download`` and ``run``."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner, Result
from mercantile import Tile

from chipscale.cli import cli
from chipscale.results import open_store
from chipscale.sources.footprint import cover
from chipscale.values import JobInfo, TileResult

#: Clears the screen, rings the bell, returns the cursor, sets the window title; and markup
#: that rich would obey (or choke on: a closing tag with nothing to close).
HOSTILE = "evil\x1b[2J\x07\r\x1b]0;pwned\x07[bold red]red[/][/]"
RAW = ("\x1b", "\x07", "\r")


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def assert_escaped(result: Result) -> None:
    for char in RAW:
        assert char not in result.output, result.output
    assert "\\x1b[2J" in result.output, result.output


def hostile_store(tmp_path: Path) -> str:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    with open_store(db) as store:
        store.start_job(JobInfo(HOSTILE, HOSTILE, zoom=3, model_name=HOSTILE, classes=("a",)))
        store.write([TileResult(HOSTILE, Tile(0, 1, 3), "error", error=HOSTILE)])
    return db


def test_status_escapes_stored_text(tmp_path: Path) -> None:
    result = invoke("status", "--db", hostile_store(tmp_path))
    assert result.exit_code == 0, result.output
    assert_escaped(result)
    assert "[bold" in result.output and "red[/][/]" in result.output  # markup shown as text


def test_status_json_stays_exact(tmp_path: Path) -> None:
    result = invoke("status", "--db", hostile_store(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["jobs"][0]["job"] == HOSTILE


def test_download_lines_escape_names(tmp_path: Path) -> None:
    db = hostile_store(tmp_path)
    result = invoke("download", "--db", db, "-o", str(tmp_path / "a\x1b[2J.csv"))
    assert result.exit_code == 0, result.output
    assert_escaped(result)
    result = invoke("download", "--db", db, "--job", "nope", "-o", str(tmp_path / "b.csv"))
    assert result.exit_code == 1
    assert_escaped(result)  # the error lists the jobs there are


def test_run_summary_escapes_the_job_and_source(aerial: Path, tmp_path: Path) -> None:
    """run refuses a --job with control characters; markup in it and a source path with
    them are still printed as text."""
    tile = next(iter(cover(18, source=str(aerial))))
    tiles = tmp_path / "tiles.txt"
    tiles.write_text(f"{tile.z}/{tile.x}/{tile.y}\n")
    source = tmp_path / "a\x1b[2J.tif"
    source.symlink_to(aerial)
    result = invoke(
        "run",
        "--source",
        str(source),
        "--zoom",
        "18",
        "--tiles",
        str(tiles),
        "--job",
        "[bold red]red[/][/]",
        "--out",
        str(tmp_path / "out"),
        "--no-preview",
    )
    assert result.exit_code == 0, result.output
    assert_escaped(result)
    assert "[bold red]red[/][/]" in result.output


# ----------------------------------------------------------------------------- issue 14, item 22


def test_download_into_a_file_as_folder_is_one_clear_line(tmp_path: Path) -> None:
    db = hostile_store(tmp_path)
    (tmp_path / "existing.csv").write_text("old\n")
    result = invoke("download", "--db", db, "-o", str(tmp_path / "existing.csv" / "out.csv"))
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: cannot write {str(tmp_path / 'existing.csv' / 'out.csv')!r}: "
        f"{str(tmp_path / 'existing.csv')!r} is a file, not a folder"
    )
    (tmp_path / "folder.csv").mkdir()
    result = invoke("download", "--db", db, "-o", str(tmp_path / "folder.csv"))
    assert result.exit_code == 1
    assert "Errno" not in result.output and "it is a folder" in result.output
    result = invoke("download", "--db", db, "-o", str(tmp_path / "existing.csv"))
    assert result.exit_code == 0, result.output  # an existing file is replaced, as -o does
    assert result.output.strip().endswith(f"1 row -> {tmp_path / 'existing.csv'}")


def test_counts_of_one_are_singular(tmp_path: Path) -> None:
    from chipscale.ops.sqs_queues import describe_queue_view

    tiles = tmp_path / "tiles.txt"
    tiles.write_text("3/0/1\n")
    result = invoke("push", str(tiles), "--worker-source", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would push 1 tile in 1 message with 1 SQS request " in result.output, result.output
    dlq = {"url": "https://sqs/1/dead", "visible": 1, "in_flight": 0}
    view = {"url": "https://sqs/1/work", "visible": 0, "in_flight": 0, "dlq": dlq}
    assert describe_queue_view(view)[-1] == "dead-letter queue dead: 1 message"


def test_status_help_describes_what_status_json_prints(tmp_path: Path) -> None:
    import re

    helped = " ".join(invoke("status", "--help").output.split())
    shape = re.search(r"Machine-readable output: (\{.*?\})", helped)
    assert shape is not None, helped
    printed = json.loads(invoke("status", "--db", hostile_store(tmp_path), "--json").output)
    assert re.findall(r'"(\w+)":', shape.group(1)) == list(printed)  # the same keys, in order
    assert printed["queue"] is None and '"queue": null' in shape.group(1)
