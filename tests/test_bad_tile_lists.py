"""Tile lists that are broken, hostile or empty, through ``chipscale run`` and ``push`` as a
user runs them (a subprocess, so the bytes arrive as they do from a shell): one-line errors
naming the line, bounded memory, and an empty list a failure like an AOI that misses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHIPSCALE = str(Path(sys.executable).parent / "chipscale")
SOURCE = "https://tiles.example/imagery/{z}/{x}/{y}.jpg"  # push --dry-run reads nothing


class Ran:
    """A finished ``chipscale`` process: exit status, output, peak RSS and seconds."""

    def __init__(self, args: list[str], stdin: bytes, cwd: Path) -> None:
        started = time.monotonic()
        proc = subprocess.Popen(
            [CHIPSCALE, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
        )
        self.stdout, self.stderr = proc.communicate(stdin, timeout=300)
        self.returncode = proc.returncode
        self.seconds = time.monotonic() - started


def chipscale(tmp_path: Path, *args: str, stdin: bytes = b"") -> Ran:
    return Ran(list(args), stdin, tmp_path)


def peak_rss_mb(tmp_path: Path, *args: str) -> tuple[int, bytes, float]:
    """Run ``chipscale`` with stdin and stdout closed; its exit status, stderr and peak RSS
    (MB, from the kernel's accounting of that one child via wait4)."""
    err = tmp_path / "stderr.txt"
    with err.open("wb") as handle:
        proc = subprocess.Popen(
            [CHIPSCALE, *args], stdin=subprocess.DEVNULL, stdout=handle, stderr=handle, cwd=tmp_path
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, err.read_bytes(), usage.ru_maxrss / 1024


def push_dry(tmp_path: Path, tiles: str, stdin: bytes = b"") -> Ran:
    return chipscale(tmp_path, "push", tiles, "--source", SOURCE, "--dry-run", stdin=stdin)


def run_local(tmp_path: Path, aerial: Path, tiles: str) -> Ran:
    return chipscale(
        tmp_path, "run", "--source", str(aerial), "-z", "18", "--tiles", tiles, "--no-preview"
    )


def one_line_error(ran: Ran, *words: str) -> str:
    text = ran.stderr.decode("utf-8", "replace")
    shown = text[-400:]
    assert ran.returncode == 1, shown
    size, traceback = len(ran.stderr), "Traceback" in text
    assert size < 500 and not traceback, shown
    last = text.strip().splitlines()[-1]
    assert last.startswith("Error: "), shown
    for word in words:
        assert word in last, last
    return last


# ----------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("command", ["push", "run"])
def test_invalid_utf8_names_the_line(tmp_path: Path, aerial: Path, command: str) -> None:
    path = tmp_path / "tiles.txt"
    path.write_bytes(b"# made by hand\n0-0-1\nabc\xff\n")
    if command == "push":
        ran = push_dry(tmp_path, str(path))
    else:
        ran = run_local(tmp_path, aerial, "tiles.txt")
    one_line_error(ran, "line 3", "UTF-8")


def test_invalid_utf8_on_stdin_names_the_line(tmp_path: Path) -> None:
    one_line_error(push_dry(tmp_path, "-", stdin=b"0-0-1\n\xff\xfe\n"), "<stdin>", "line 2")


def test_a_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "tiles.txt"
    path.write_bytes(b"\xef\xbb\xbf0-0-1\r\n1-0-1\r\n")
    for ran in (push_dry(tmp_path, str(path)), push_dry(tmp_path, "-", stdin=path.read_bytes())):
        assert ran.returncode == 0, ran.stderr.decode()[-400:]
        assert b"would push 2 tiles" in ran.stderr


def test_a_bom_is_only_skipped_at_the_start(tmp_path: Path) -> None:
    path = tmp_path / "tiles.txt"
    path.write_bytes(b"0-0-1\n\xef\xbb\xbf1-0-1\n")
    one_line_error(push_dry(tmp_path, str(path)), "line 2")


# ----------------------------------------------------------------------------- long lines


def test_a_50_mb_line_fails_fast_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "one-line.txt"
    with path.open("wb") as handle:
        handle.write(b"0-0-1 ")
        handle.write(b"9" * (50 << 20))  # no newline: one 50 MB line
    (tmp_path / "small.txt").write_bytes(b"0-0-1\n")
    _, _, baseline_mb = peak_rss_mb(tmp_path, "push", "small.txt", "--source", SOURCE, "--dry-run")
    started = time.monotonic()
    code, stderr, peak_mb = peak_rss_mb(
        tmp_path, "push", str(path), "--source", SOURCE, "--dry-run"
    )
    seconds = time.monotonic() - started
    text = stderr.decode("utf-8", "replace")
    assert code == 1 and len(stderr) < 500, text[-400:]
    assert "line 1" in text and "longer than" in text, text
    assert peak_mb < baseline_mb + 30, (peak_mb, baseline_mb)
    assert seconds < 60, seconds


def test_a_long_line_later_in_the_list_is_named(tmp_path: Path) -> None:
    path = tmp_path / "tiles.txt"
    path.write_bytes(b"0-0-1\n1-0-1\n" + b" " * 100_000 + b"0-1-1\n")
    one_line_error(push_dry(tmp_path, str(path)), "line 3", "longer than")


def test_a_bad_line_is_cut_in_the_error(tmp_path: Path) -> None:
    path = tmp_path / "tiles.txt"
    path.write_bytes(b"0-0-1\n" + b"x" * 3000 + b"\n")
    one_line_error(push_dry(tmp_path, str(path)), "line 2", "3,000 characters")


# ----------------------------------------------------------------------------- empty


@pytest.mark.parametrize("content", [b"", b"# only a comment\n\n"], ids=["empty", "comments"])
def test_an_empty_tile_list_is_a_failure_for_push(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "tiles.txt"
    path.write_bytes(content)
    one_line_error(push_dry(tmp_path, str(path)), "no tiles")
    one_line_error(push_dry(tmp_path, "-", stdin=content), "<stdin>", "no tiles")


def test_an_empty_tile_list_is_a_failure_for_run_as_a_missed_aoi_is(
    tmp_path: Path, aerial: Path
) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    one_line_error(run_local(tmp_path, aerial, "empty.txt"), "no tiles")
    assert not (tmp_path / "chipscale-out" / "results.csv").exists()
    miss = tmp_path / "miss.geojson"
    miss.write_text('{"type": "Polygon", "coordinates": [[[0,0],[1,0],[1,1],[0,1],[0,0]]]}')
    ran = chipscale(tmp_path, "run", "--source", str(aerial), "-z", "18", "--aoi", str(miss))
    one_line_error(ran, "do not overlap")
