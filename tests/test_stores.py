"""The SQLite result store: idempotent upserts, threads, resume, streaming, crash safety."""

from __future__ import annotations

import inspect
import sqlite3
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import pytest
from mercantile import Tile

from chipscale.errors import StoreError, StoreUnavailable
from chipscale.results import (
    SCHEMA_VERSION,
    ResultStore,
    SQLiteStore,
    open_store,
    setup_store,
    sqlite_path,
)
from chipscale.results.sqlite import MIGRATIONS
from chipscale.values import MAX_REJECTED_BODY, JobInfo, Rejection, TileResult


def ok(job: str, x: int, y: int, z: int = 18, score: float = 0.5) -> TileResult:
    return TileResult(
        job, Tile(x, y, z), "ok", {"scores": {"a": score, "b": 1 - score}}, None, "m", "1"
    )


@pytest.fixture
def store(tmp_path: Path):
    with open_store(f"sqlite:///{tmp_path}/sub/results.db") as s:
        yield s


def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert sqlite_path("sqlite:///rel/a.db") == Path("rel/a.db")
    assert sqlite_path("sqlite:////abs/a.db") == Path("/abs/a.db")
    with open_store("sqlite:///rel/a.db") as s:
        assert isinstance(s, ResultStore)
    assert (tmp_path / "rel" / "a.db").is_file()
    with open_store(str(tmp_path / "deep" / "b.sqlite")):
        pass
    assert (tmp_path / "deep" / "b.sqlite").is_file()
    with pytest.raises(StoreError, match="mysql://x"):
        open_store("mysql://x")


def test_not_a_database(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_text("hello, I am not SQLite " * 100)
    with pytest.raises(StoreError, match="not a SQLite database"):
        open_store(str(bad))


def test_schema_idempotent_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    for _ in range(2):
        open_store(str(path)).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        open_store(str(path))


def test_upsert_is_idempotent(store: SQLiteStore) -> None:
    store.write([ok("j", 1, 2)])
    first = next(store.iter_results("j"))
    store.write([ok("j", 1, 2, score=0.9)])
    rows = list(store.iter_results("j"))
    assert len(rows) == 1
    assert rows[0].attempts == 2
    assert rows[0].output == {"scores": {"a": 0.9, "b": pytest.approx(0.1)}}
    assert rows[0].created_at == first.created_at
    assert rows[0].updated_at >= first.updated_at
    assert rows[0].created_at.endswith("Z")
    assert store.counts("j") == {"ok": 1, "empty": 0, "error": 0, "total": 1}


def test_bad_status_rejected(store: SQLiteStore) -> None:
    with pytest.raises(StoreError, match="unknown status 'maybe'"):
        store.write([TileResult("j", Tile(0, 0, 1), "maybe")])  # type: ignore[arg-type]
    assert store.counts()["total"] == 0


def test_injection_looking_names_stored_verbatim(store: SQLiteStore) -> None:
    name = "x'); DROP TABLE results; --\"; SELECT 1"
    store.start_job(JobInfo(name, source="a'; b", classes=("it's", 'q"')))
    store.write([ok(name, 3, 4)])
    assert [r.job for r in store.iter_results(name)] == [name]
    info = store.get_job(name)
    assert info is not None
    assert info.source == "a'; b"
    assert info.classes == ("it's", 'q"')
    assert store.counts()["total"] == 1


def test_jobs_keep_created_at(store: SQLiteStore) -> None:
    store.start_job(JobInfo("j", "s.tif", zoom=18, classes=("a", "b"), extra={"k": 1}))
    store.start_job(JobInfo("j", "s.tif", zoom=18, tiles_total=10, classes=("a", "b")))
    store.start_job(JobInfo("k", "t.tif"))
    jobs = store.jobs()
    assert [j.job for j in jobs] == ["j", "k"]
    assert jobs[0].tiles_total == 10
    assert jobs[0].classes == ("a", "b")
    assert store.get_job("missing") is None


def test_done_tiles_and_counts(store: SQLiteStore) -> None:
    store.write(
        [
            ok("j", 1, 1),
            TileResult("j", Tile(2, 1, 18), "empty"),
            TileResult("j", Tile(3, 1, 18), "error", error="boom"),
            ok("other", 9, 9),
        ]
    )
    assert store.done_tiles("j") == {Tile(1, 1, 18), Tile(2, 1, 18)}
    assert store.counts("j") == {"ok": 1, "empty": 1, "error": 1, "total": 3}
    assert store.counts() == {"ok": 2, "empty": 1, "error": 1, "total": 4}
    assert [r.error for r in store.iter_results("j", status="error")] == ["boom"]
    with pytest.raises(StoreError, match="Unknown result status"):
        store.iter_results("j", status="bad")


def test_iter_results_order(store: SQLiteStore) -> None:
    store.write([ok("b", 2, 1, 17), ok("a", 5, 5, 18), ok("a", 1, 9, 17), ok("a", 1, 2, 17)])
    keys = [(r.job, r.z, r.x, r.y) for r in store.iter_results()]
    assert keys == sorted(keys)


def test_concurrent_writes_and_reads(store: SQLiteStore) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for batch in range(20):
                # every thread writes tiles 0..9 of row 0 (shared) and its own row
                store.write(
                    [ok("j", x, 0) for x in range(10)]
                    + [ok("j", x, 1 + n * 100 + batch) for x in range(10)]
                )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):  # read from this thread meanwhile
        store.counts("j")
        sum(1 for _ in store.iter_results("j"))
    for t in threads:
        t.join()
    assert not errors
    assert store.counts("j")["total"] == 10 + 8 * 20 * 10
    shared = [r for r in store.iter_results("j") if r.y == 0]
    assert {r.attempts for r in shared} == {8 * 20}


def test_iter_results_streams(store: SQLiteStore) -> None:
    n = 50_000
    batch = [ok("big", x % 1000, x // 1000) for x in range(n)]
    for i in range(0, n, 10_000):
        store.write(batch[i : i + 10_000])
    del batch
    rows = store.iter_results("big")
    assert inspect.isgenerator(rows)
    tracemalloc.start()
    count = 0
    for _ in rows:
        count += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == n
    # 50k rows materialised would take tens of MB; streamed, the peak is one row and the cursor
    assert peak < 2_000_000, peak


def test_locked_database_is_transient(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with SQLiteStore(path, busy_timeout=0.1) as s:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreUnavailable, match="locked"):
                s.write([ok("j", 0, 0)])
        finally:
            other.execute("ROLLBACK")
            other.close()
        s.write([ok("j", 0, 0)])
        assert s.counts()["total"] == 1


def test_closed_store(tmp_path: Path) -> None:
    s = open_store(str(tmp_path / "r.db"))
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.write([ok("j", 0, 0)])


KILLED_WRITER = """
import sys
from mercantile import Tile
from chipscale.results import open_store
from chipscale.values import TileResult
store = open_store(sys.argv[1])
n = 0
while True:
    store.write([TileResult("j", Tile(x, n, 20), "ok", {"a": 1.0}) for x in range(100)])
    n += 1
    if n == 5:
        print("ready", flush=True)
"""


def test_kill_mid_run_leaves_consistent_db(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.kill()
        proc.wait(timeout=10)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    with open_store(str(path)) as s:
        total = s.counts("j")["total"]
    assert total >= 500
    assert total % 100 == 0  # every write() landed whole or not at all


def test_rejects_recorded_once_per_message_id(store: SQLiteStore) -> None:
    bad = Rejection("m-1", "not JSON", "{nope", None)
    store.reject([bad])
    store.reject([Rejection("m-1", "not JSON (again)", "{nope", "j")])  # delivered again
    store.reject([Rejection("m-2", "zoom 40 is outside 0..30", "x" * 10_000, "j")])
    assert store.rejects() == [
        Rejection("m-1", "not JSON (again)", "{nope", "j"),
        Rejection("m-2", "zoom 40 is outside 0..30", "x" * MAX_REJECTED_BODY, "j"),
    ]
    assert [r.message_id for r in store.rejects("j")] == ["m-1", "m-2"]
    assert store.rejects("other") == []
    conn = sqlite3.connect(store.path)
    assert conn.execute("SELECT attempts FROM rejects ORDER BY message_id").fetchall() == [
        (2,),
        (1,),
    ]
    conn.close()
    with pytest.raises(StoreError, match="no message id"):
        store.reject([Rejection("", "why", "body")])


def test_version_1_file_upgrades_in_place(tmp_path: Path) -> None:
    """A results file written by the first release (no rejects table) opens, keeps its rows
    and gains the rejects table; the upgraded schema is the one a new file gets."""
    old = tmp_path / "v1.db"
    conn = sqlite3.connect(old)
    conn.executescript(MIGRATIONS[0])
    conn.execute(
        "INSERT INTO results (job, z, x, y, status, output, attempts, created_at, updated_at) "
        "VALUES ('j', 18, 1, 2, 'ok', '{\"a\":1}', 1, '2025-01-01T00:00:00.000Z', "
        "'2025-01-01T00:00:00.000Z')"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with open_store(str(old)) as s:
        assert [(r.job, r.x, r.y, r.output) for r in s.iter_results()] == [("j", 1, 2, {"a": 1})]
        s.reject([Rejection("m", "bad", "body")])
        assert len(s.rejects()) == 1
    fresh = tmp_path / "new.db"
    assert f"version {SCHEMA_VERSION}" in setup_store(str(fresh))
    assert _schema(old) == _schema(fresh)


def _schema(path: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        rows = conn.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
        return [("user_version", str(version)), *rows]
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"b": 0.5, "a": [1, 2]}, {"b": 0.5, "a": [1, 2]}),  # key order kept
        ({"a": float("nan"), "b": [float("inf")]}, {"a": None, "b": [None]}),
        ({0: 0.25, 1: 0.75}, {"0": 0.25, "1": 0.75}),  # non-str keys: the fallback
        ({"n": 2**70}, {"n": 2**70}),  # beyond 64 bits: the fallback
        ({"s": "\ud800é"}, {"s": "\ud800é"}),  # a lone surrogate: the fallback
        ({"s": {3}}, {"s": [3]}),  # a set: a list
    ],
)
def test_dump_json_round_trips(value: object, expected: object) -> None:
    import json

    from chipscale.results.base import dump_json, load_json

    text = dump_json(value)
    assert isinstance(text, str)
    assert load_json(text) == expected
    json.loads(text)  # strict JSON: no NaN or Infinity tokens


def test_dump_json_numpy_and_refusal() -> None:
    import numpy as np

    from chipscale.results.base import dump_json, load_json

    text = dump_json({"scores": np.array([0.25, 0.75], dtype=np.float32), "k": np.int64(3)})
    assert load_json(text) == {"scores": [0.25, 0.75], "k": 3}
    with pytest.raises(StoreError, match="not JSON serialisable: object is not"):
        dump_json({"bad": object()})


def test_reads_by_status_go_through_the_primary_key(store: SQLiteStore) -> None:
    """Schema v3 has no status index in SQLite: downloads by status and resume read the
    job's rows in key order (the table itself), so they need none."""
    conn = sqlite3.connect(store.path)
    try:
        indexes = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'results' "
            "AND sql IS NOT NULL"
        ).fetchall()
        assert indexes == []
        for query, params in [
            ("SELECT * FROM results WHERE job = ? AND status = ? ORDER BY z, x, y", ["j", "e"]),
            ("SELECT x, y, z FROM results WHERE job = ? AND status IN (?, ?)", ["j", "ok", "e"]),
        ]:
            (plan,) = conn.execute(f"EXPLAIN QUERY PLAN {query}", params).fetchall()
            assert "USING PRIMARY KEY (job=?)" in plan[3], plan
    finally:
        conn.close()
