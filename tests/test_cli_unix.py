"""The command line as a Unix tool, run in a subprocess as a shell runs it: raw argv bytes,
a reader that leaves the pipe early, malformed URLs; one-line errors and the usual exit
statuses (0 success, 1 a failed operation, 2 bad usage, 141 / SIGPIPE a reader gone)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

CHIPSCALE = str(Path(sys.executable).parent / "chipscale")
SIGPIPE_STATUSES = {-signal.SIGPIPE, 128 + signal.SIGPIPE}  # killed by it, or exit 141


def chipscale(*args: str | bytes, cwd: Path, **env: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [CHIPSCALE, *args],
        capture_output=True,
        cwd=cwd,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        timeout=300,
    )


def assert_one_line_error(done: subprocess.CompletedProcess[bytes], code: int, *words: str):
    text = done.stderr.decode("utf-8", "replace")
    assert done.returncode == code, text[-400:]
    assert "Traceback" not in text and len(done.stderr) < 600, text[-400:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("Error: "), text[-400:]
    for word in words:
        assert word in last, last
    return last


@pytest.fixture
def sqlite_db(tmp_path: Path) -> str:
    """A SQLite results store holding one small job, ``done``."""
    from mercantile import Tile

    from chipscale.results import open_store
    from chipscale.values import JobInfo, TileResult

    url = f"sqlite:///{tmp_path / 'results.db'}"
    with open_store(url) as store:
        store.start_job(JobInfo(job="done", source="a.tif", zoom=1, tiles_total=1))
        store.write([TileResult(job="done", tile=Tile(0, 0, 1), status="empty")])
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.db'}"
    return request.getfixturevalue("results_db")


# ----------------------------------------------------------------------------- argv bytes


@pytest.mark.parametrize("command", ["status", "download", "run"])
def test_a_job_name_that_is_not_utf8_is_bad_usage(
    command: str, any_db: str, aerial: Path, tmp_path: Path
) -> None:
    tiles = tmp_path / "tiles.txt"
    tiles.write_text("18-130000-100000\n")
    args: dict[str, list[str]] = {
        "status": ["status"],
        "download": ["download", "-o", "out.csv"],
        "run": ["run", "--source", str(aerial), "-z", "18", "--tiles", str(tiles)],
    }
    done = chipscale(*args[command], "--db", any_db, "--job", b"job-\xff", cwd=tmp_path)
    assert_one_line_error(done, 2, "--job", "UTF-8")


@pytest.mark.parametrize("command", ["run", "tile", "cover"])
def test_a_source_path_that_is_not_utf8_is_a_one_line_error(command: str, tmp_path: Path) -> None:
    source = b"\xff.tif"
    args: dict[str, list[str | bytes]] = {
        "run": ["run", "--source", source, "-z", "10", "--out", "out"],
        "tile": ["tile", source, "10/1/1", "-o", "t.png"],
        "cover": ["cover", "--source", source, "-z", "10"],
    }
    assert_one_line_error(chipscale(*args[command], cwd=tmp_path), 1, "UTF-8")


# ----------------------------------------------------------------------------- store URLs


@pytest.mark.parametrize(
    "url",
    ["postgresql://[::1", "postgresql://chip:s3cret@[::1/db", "postgres://chip:s3cret@[zz::1]/db"],
)
@pytest.mark.parametrize("command", ["status", "db-setup", "download"])
def test_a_malformed_database_url_is_a_one_line_error(
    command: str, url: str, tmp_path: Path
) -> None:
    args = {"status": ["status"], "db-setup": ["db-setup"], "download": ["download", "-o", "x.csv"]}
    done = chipscale(*args[command], "--db", url, cwd=tmp_path)
    last = assert_one_line_error(done, 1, "URL")
    assert "s3cret" not in last
    from_env = chipscale(*args[command], cwd=tmp_path, DATABASE_URL=url)
    assert_one_line_error(from_env, 1, "URL")


# ----------------------------------------------------------------------------- SIGPIPE


def closed_pipe() -> int:
    """The write end of a pipe whose reader has already gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


def test_cover_into_head_is_quiet_with_the_sigpipe_status(tmp_path: Path) -> None:
    """``chipscale cover ... | head -1``: a reader that takes one line and leaves."""
    proc = subprocess.Popen(
        [CHIPSCALE, "cover", "--bbox", "0,0,10,10", "-z", "14"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.wait(timeout=120)
    assert first.strip() and proc.returncode in SIGPIPE_STATUSES, (proc.returncode, stderr)
    assert stderr == b""


def test_through_a_shell_pipeline_the_status_is_141(tmp_path: Path) -> None:
    script = f"'{CHIPSCALE}' cover --bbox 0,0,10,10 -z 14 | head -1 >/dev/null; "
    script += 'echo "${PIPESTATUS[0]}"'
    done = subprocess.run(["bash", "-c", script], capture_output=True, cwd=tmp_path, timeout=120)
    assert done.stdout.strip() == b"141" and done.stderr == b"", done


@pytest.mark.parametrize(
    "args",
    [
        ["cover", "--bbox", "0,0,1,1", "-z", "4"],
        ["cover", "--bbox", "0,0,1,1", "-z", "4", "-o", "-"],
        ["push", "-", "--source", "https://t.example/{z}/{x}/{y}.jpg", "--dry-run", "--json"],
        ["status", "--db", "DB"],
        ["status", "--db", "DB", "--json"],
    ],
    ids=["cover", "cover-o-", "push-json", "status", "status-json"],
)
def test_a_reader_gone_before_the_first_line(
    args: list[str], sqlite_db: str, tmp_path: Path
) -> None:
    write_end = closed_pipe()
    args = [sqlite_db if a == "DB" else a for a in args]
    proc = subprocess.run(
        [CHIPSCALE, *args],
        input=b"0-0-1\n",
        stdout=write_end,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        timeout=120,
    )
    os.close(write_end)
    assert proc.returncode in SIGPIPE_STATUSES, (proc.returncode, proc.stderr[-400:])
    if args[0] == "push":  # its summary goes to stderr before the JSON to stdout
        assert b"Error" not in proc.stderr and b"Broken" not in proc.stderr, proc.stderr
    else:
        assert proc.stderr == b""


def test_download_with_its_messages_into_a_gone_reader(sqlite_db: str, tmp_path: Path) -> None:
    """download writes its file, then its one line of news to a pipe nobody reads
    (``chipscale download ... 2>&1 | head -0``): quiet, with the SIGPIPE status."""
    write_end = closed_pipe()
    proc = subprocess.run(
        [CHIPSCALE, "download", "--db", sqlite_db, "-o", "out.csv"],
        stdout=write_end,
        stderr=write_end,
        cwd=tmp_path,
        timeout=120,
    )
    os.close(write_end)
    assert proc.returncode in SIGPIPE_STATUSES
    assert (tmp_path / "out.csv").read_text().count("\n") == 2  # header and the tile


QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/q"


def test_push_from_a_closed_stdin_is_bad_usage(tmp_path: Path) -> None:
    done = subprocess.run(
        [CHIPSCALE, "push", "-", QUEUE, "--dry-run", "--source", "s3://bucket/scene.tif"],
        capture_output=True,
        cwd=tmp_path,
        preexec_fn=lambda: os.close(0),  # as `chipscale push - Q <&-`
        timeout=120,
    )
    assert_one_line_error(done, 2, "standard input is closed")
