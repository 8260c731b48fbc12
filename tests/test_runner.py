"""The local runner: resume, retries through an outage, Ctrl-C leaves a consistent store."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from chipscale.errors import JobConflict
from chipscale.models.predictors import open_predictor
from chipscale.pipeline.runner import run_local
from chipscale.results import SQLiteStore, open_store
from chipscale.sources.footprint import cover


@pytest.fixture(scope="module")
def predictor():
    return open_predictor(None)


def test_run_then_resume_skips_everything(aerial, predictor, tmp_path) -> None:
    tiles = list(cover(19, source=str(aerial)))
    with open_store(f"sqlite:///{tmp_path}/r.db") as store:
        first = run_local(
            job="a", source=str(aerial), tiles=tiles, predictor=predictor, store=store, zoom=19
        )
        assert first.processed == first.total == len(tiles)
        assert first.ok > 0.8 * len(tiles)
        second = run_local(
            job="a", source=str(aerial), tiles=tiles, predictor=predictor, store=store, zoom=19
        )
        assert (second.skipped, second.processed) == (len(tiles), 0)
        assert store.counts("a")["total"] == len(tiles)
        assert store.get_job("a").tiles_total == len(tiles)
        with pytest.raises(JobConflict, match=r"not other\.tif"):  # never mix two sources
            run_local(job="a", source="other.tif", tiles=tiles, predictor=predictor, store=store)


def test_database_locked_for_a_while_is_retried_not_dropped(
    aerial, predictor, tmp_path, caplog
) -> None:
    db = tmp_path / "locked.db"
    tiles = list(cover(19, source=str(aerial)))
    # Fail fast while locked, so the runner's retry is what gets the tiles through.
    with SQLiteStore(db, busy_timeout=0.05) as store:
        blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        release = threading.Timer(1.5, lambda: blocker.execute("COMMIT"))

        def lock_once_started(todo: int, skipped: int) -> None:
            blocker.execute("BEGIN EXCLUSIVE")  # another process grabs the database
            release.start()

        summary = run_local(
            job="l",
            source=str(aerial),
            tiles=tiles,
            predictor=predictor,
            store=store,
            on_start=lock_once_started,
        )
        release.join()
        assert "retry 1" in caplog.text  # the lock was felt, and outlasted
        assert summary.processed == len(tiles)
        assert store.counts("l")["total"] == len(tiles)


def test_ctrl_c_leaves_a_consistent_store_and_a_rerun_completes(aerial, tmp_path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "chipscale.cli",
        "run",
        "--source",
        str(aerial),
        "--zoom",
        "22",
        "--out",
        str(out),
        "--workers",
        "1",
        "--no-preview",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    db = out / "results.db"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # interrupt once some packs are stored
        if db.exists():
            try:
                with sqlite3.connect(db) as con:
                    if con.execute("select count(*) from results").fetchone()[0] > 0:
                        break
            except sqlite3.OperationalError:
                pass
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output
    assert "Traceback" not in output
    with sqlite3.connect(db) as con:
        stored = con.execute("select count(*) from results").fetchone()[0]
        assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
    total = len(list(cover(22, source=str(aerial))))
    assert 0 < stored < total

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*) from results").fetchone()[0] == total
        assert con.execute("select max(attempts) from results").fetchone()[0] == 1
