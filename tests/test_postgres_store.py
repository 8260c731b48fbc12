"""The PostgreSQL result store against a real PostgreSQL: schema set-up and migration,
idempotent upserts, streaming, threads, parity with SQLite, outages and recovery.

Each test gets a database of its own on the machine's server (``empty_db``/``results_db``);
the tests that stop or break a server start a throwaway cluster of their own
(``throwaway_pg``), never the shared one.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import free_port
from mercantile import Tile

from chipscale.errors import StoreError, StoreUnavailable
from chipscale.ops import private_checks as verify
from chipscale.redaction import redact
from chipscale.results import (
    PostgresStore,
    ResultStore,
    SQLiteStore,
    open_store,
    setup_database,
    setup_store,
)
from chipscale.results import postgres as pg
from chipscale.results import postgres_schema as pg_schema
from chipscale.results.base import results_filter
from chipscale.results.export import export_results
from chipscale.values import MAX_REJECTED_BODY, JobInfo, Rejection, ResultRow, TileResult

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SECRET = "s3cret-Pw"


def ok(job: str, x: int, y: int, z: int = 18, score: float = 0.5) -> TileResult:
    return TileResult(
        job, Tile(x, y, z), "ok", {"scores": {"a": score, "b": 1 - score}}, None, "m", "1"
    )


def with_password(url: str, password: str = SECRET) -> str:
    """The same URL with a password (trust auth ignores it): to prove it is never shown."""
    return url.replace("postgres@", f"postgres:{password}@", 1)


def sql(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []


@pytest.fixture
def store(results_db: str) -> Iterator[PostgresStore]:
    with PostgresStore(results_db) as s:
        yield s


def stripped(row: ResultRow) -> ResultRow:
    return replace(row, created_at="", updated_at="")


# ----------------------------------------------------------------------------- URLs, schema


def test_open_store_urls(results_db: str) -> None:
    url = with_password(results_db)
    for spelling in (url, url.replace("postgresql://", "postgres://", 1)):
        with open_store(spelling) as s:
            assert isinstance(s, PostgresStore)
            assert isinstance(s, ResultStore)
            assert SECRET not in s.url and SECRET not in repr(s)
            assert s.url.startswith(spelling.split("://")[0] + "://postgres:***@127.0.0.1:5432/")
    sqlalchemy_style = url.replace("postgresql://", "postgresql+psycopg://", 1)
    with open_store(sqlalchemy_style) as s:
        assert s.counts()["total"] == 0


def test_url_redaction() -> None:
    assert redact("postgresql://u:p%40ss@h/db?sslmode=require&password=x") == (
        "postgresql://u:***@h/db?sslmode=require&password=***"
    )
    assert redact("postgresql://u@h:5433/db") == "postgresql://u@h:5433/db"
    assert redact("host=h password='a b' user=u") == "host=h password=*** user=u"


def test_setup_database_is_idempotent_and_matches_verify(empty_db: str) -> None:
    first = setup_database(empty_db)
    assert first.startswith("created the results schema in")
    assert first.endswith(f"schema public (version {pg_schema.SCHEMA_VERSION})")
    assert "up to date" in setup_database(empty_db)
    assert "up to date" in setup_store(empty_db)
    assert sql(empty_db, "SELECT version FROM schema_version") == [(pg_schema.SCHEMA_VERSION,)]
    assert verify.check_schema(empty_db).ok
    assert dict(verify.RESULTS_SCHEMA) == pg_schema.TABLES  # verify's copy is the real schema
    tables = sql(
        empty_db,
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename",
    )
    assert sorted(pg_schema.TABLES) == [t for (t,) in tables]


def test_concurrent_setups_create_the_schema_once(empty_db: str) -> None:
    def setup(n: int) -> str:
        if n % 2:
            with PostgresStore(empty_db):
                return "store"
        return setup_database(empty_db)

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(setup, range(8)))
    created = [o for o in outcomes if o.startswith("created")]
    assert len(created) <= 1
    assert sql(empty_db, "SELECT count(*) FROM schema_version") == [(1,)]
    assert "up to date" in setup_database(empty_db)


def catalog(url: str, schema: str) -> list[tuple[Any, ...]]:
    """Tables, columns, types, defaults, constraints and indexes: to compare two schemas."""
    columns = sql(
        url,
        "SELECT table_name, column_name, data_type, collation_name, is_nullable, "
        "column_default FROM information_schema.columns WHERE table_schema = %s "
        "ORDER BY table_name, ordinal_position",
        (schema,),
    )
    constraints = sql(
        url,
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE connamespace = %s::regnamespace ORDER BY 1, 2",
        (schema,),
    )
    indexes = sql(
        url,
        "SELECT tablename, indexname, replace(indexdef, %s, '') FROM pg_indexes "
        "WHERE schemaname = %s ORDER BY indexname",
        (f" {schema}.", schema),
    )
    return [
        tuple(str(v).replace(f"{schema}.", "") for v in row)
        for row in columns + constraints + indexes
    ]


def test_version_1_database_migrates(empty_db: str) -> None:
    """A database set up by version 1 (no rejects table) keeps its rows and ends up with the
    schema a new database gets (built beside it, in a schema named by the URL's search_path)."""
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(pg_schema.MIGRATIONS[0])
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        conn.execute(
            "INSERT INTO results (job, z, x, y, status, output) "
            """VALUES ('j', 18, 1, 2, 'ok', '{"a": 1}')"""
        )
        conn.execute("CREATE SCHEMA fresh")
    with pytest.raises(StoreError, match=r"has schema version 1, .* run `chipscale db-setup`"):
        PostgresStore(empty_db, create=False)
    summary = setup_database(empty_db)
    assert summary.endswith(f"schema public from version 1 to {pg_schema.SCHEMA_VERSION}")
    with PostgresStore(empty_db, create=False) as s:
        assert [(r.job, r.x, r.y, r.output) for r in s.iter_results()] == [("j", 1, 2, {"a": 1})]
        s.reject([Rejection("m", "bad", "body")])
        assert len(s.rejects()) == 1
    fresh = setup_database(f"{empty_db}?options=-csearch_path%3Dfresh")
    assert fresh.startswith("created") and "schema fresh" in fresh
    assert catalog(empty_db, "public") == catalog(empty_db, "fresh")  # migrated == new


def test_newer_schema_is_refused(results_db: str) -> None:
    sql(results_db, "INSERT INTO schema_version (version) VALUES (99)")
    with pytest.raises(StoreError, match=r"schema version 99, newer than .* upgrade chipscale"):
        setup_database(results_db)
    with pytest.raises(StoreError, match="newer"):
        PostgresStore(results_db)


def test_tables_of_someone_else_are_refused(empty_db: str) -> None:
    sql(empty_db, "CREATE TABLE results (job text PRIMARY KEY)")
    with pytest.raises(StoreError, match="already holds tables results but no schema_version"):
        setup_database(empty_db)


def test_create_false_refuses_a_database_without_the_schema(empty_db: str) -> None:
    with pytest.raises(StoreError, match=r"no results schema.*run `chipscale db-setup`"):
        open_store(empty_db, create=False)
    assert sql(empty_db, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]
    with open_store(empty_db) as s:  # the local default creates it
        assert s.counts()["total"] == 0


def test_dropped_table_is_a_store_error_naming_db_setup(
    store: PostgresStore, results_db: str
) -> None:
    sql(results_db, "DROP TABLE results")
    with pytest.raises(StoreError, match=r"lacks the results schema.*chipscale db-setup") as info:
        store.write([ok("j", 0, 0)])
    assert not isinstance(info.value, StoreUnavailable)


# ----------------------------------------------------------------------------- writes


def test_upsert_is_idempotent(store: PostgresStore) -> None:
    store.write([ok("j", 1, 2)])
    first = next(store.iter_results("j"))
    time.sleep(0.01)
    store.write([ok("j", 1, 2, score=0.9)])
    rows = list(store.iter_results("j"))
    assert len(rows) == 1
    assert rows[0].attempts == 2
    assert rows[0].output == {"scores": {"a": 0.9, "b": pytest.approx(0.1)}}
    assert rows[0].created_at == first.created_at
    assert rows[0].updated_at > first.updated_at
    assert ISO.match(rows[0].created_at) and ISO.match(rows[0].updated_at)
    assert store.counts("j") == {"ok": 1, "empty": 0, "error": 0, "total": 1}


def test_a_tile_twice_in_one_write_counts_twice_and_the_last_wins(store: PostgresStore) -> None:
    # one INSERT cannot update a row twice: the store merges, as SQLite's sequence would end
    store.write([ok("j", 1, 2, score=0.1), ok("j", 3, 3), ok("j", 1, 2, score=0.7)])
    rows = {(r.x, r.y): r for r in store.iter_results("j")}
    assert rows[(1, 2)].attempts == 2
    assert rows[(1, 2)].output == {"scores": {"a": 0.7, "b": pytest.approx(0.3)}}
    assert rows[(3, 3)].attempts == 1


def test_a_write_inserts_and_upserts_only_when_it_meets_a_stored_tile(
    store: PostgresStore,
) -> None:
    """New tiles go in by a plain INSERT (ON CONFLICT's speculative insertion costs about
    5 us a row on the server); a write that meets stored tiles is sent again as the upsert,
    whatever mix of stored and new tiles it carries."""
    uniform, _ = pg._write_parameters(pg._result_columns([ok("j", 0, 0)]))
    assert "ON CONFLICT" not in pg._write_sql(uniform, upsert=False)
    assert "ON CONFLICT" in pg._write_sql(uniform, upsert=True)

    store.write([ok("j", x, 0, score=0.1) for x in range(0, 10, 2)])  # the even tiles
    store.write([ok("j", x, 0, score=0.9) for x in range(10)])  # all: half stored already
    store.write([ok("j", x, 1) for x in range(3)])  # the connection is fine after the retry
    rows = {(r.x, r.y): r for r in store.iter_results("j")}
    assert len(rows) == 13
    assert {x: rows[(x, 0)].attempts for x in range(10)} == {x: 1 + (x % 2 == 0) for x in range(10)}
    assert {rows[(x, 0)].output["scores"]["a"] for x in range(10)} == {0.9}
    assert {rows[(x, 1)].attempts for x in range(3)} == {1}


def test_statuses_are_checked(store: PostgresStore, results_db: str) -> None:
    with pytest.raises(StoreError, match="unknown status 'maybe'"):
        store.write([TileResult("j", Tile(0, 0, 1), "maybe")])  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="Unknown result status"):
        store.iter_results("j", status="bad")
    with pytest.raises(psycopg.errors.CheckViolation):  # the table refuses it too
        sql(results_db, "INSERT INTO results (job, z, x, y, status) VALUES ('j', 1, 0, 0, 'maybe')")
    assert store.counts()["total"] == 0


def test_bad_data_is_permanent(store: PostgresStore) -> None:
    with pytest.raises(StoreError, match="failed while writing 1 results") as info:
        store.write([ok("nul\x00job", 0, 0)])
    assert not isinstance(info.value, StoreUnavailable)
    store.write([ok("j", 0, 0)])  # the connection is still good
    assert store.counts()["total"] == 1


def test_injection_looking_names_stored_verbatim(store: PostgresStore) -> None:
    name = "x'); DROP TABLE results; --\"; SELECT 1"
    store.start_job(JobInfo(name, source="a'; b", classes=("it's", 'q"'), extra={"k": "'; --"}))
    store.write(
        [TileResult(name, Tile(3, 4, 18), "error", None, "bad'; DROP TABLE jobs; --", "m';", "1;")]
    )
    (row,) = store.iter_results(name)
    assert (row.job, row.error, row.model_name, row.model_version) == (
        name,
        "bad'; DROP TABLE jobs; --",
        "m';",
        "1;",
    )
    info = store.get_job(name)
    assert info is not None
    assert info.source == "a'; b"
    assert info.classes == ("it's", 'q"')
    assert info.extra == {"k": "'; --"}
    assert store.counts(name)["total"] == 1
    assert [j.job for j in store.jobs()] == [name]


def test_jobs_keep_created_at(store: PostgresStore) -> None:
    store.start_job(JobInfo("j", "s.tif", zoom=18, classes=("b", "a"), extra={"k": 1}))
    time.sleep(0.01)
    store.start_job(JobInfo("j", "s.tif", zoom=18, tiles_total=10**10, classes=("b", "a")))
    store.start_job(JobInfo("k", "t.tif"))
    jobs = store.jobs()
    assert [j.job for j in jobs] == ["j", "k"]
    assert jobs[0].tiles_total == 10**10
    assert jobs[0].classes == ("b", "a")  # class order kept
    assert jobs[0].extra == {}
    assert store.get_job("missing") is None


def test_done_tiles_and_counts(store: PostgresStore) -> None:
    store.write(
        [
            ok("j", 1, 1),
            TileResult("j", Tile(2, 1, 18), "empty"),
            TileResult("j", Tile(3, 1, 18), "error", error="boom"),
            ok("other", 9, 9),
            ok("j", 2**30 - 1, 2**30 - 1, 30),  # the largest tile index fits
        ]
    )
    assert store.done_tiles("j") == {Tile(1, 1, 18), Tile(2, 1, 18), Tile(2**30 - 1, 2**30 - 1, 30)}
    assert store.counts("j") == {"ok": 2, "empty": 1, "error": 1, "total": 4}
    assert store.counts() == {"ok": 3, "empty": 1, "error": 1, "total": 5}
    assert [r.error for r in store.iter_results("j", status="error")] == ["boom"]
    assert store.counts("nothing") == {"ok": 0, "empty": 0, "error": 0, "total": 0}


def test_nan_is_stored_as_null(store: PostgresStore) -> None:
    import numpy as np

    output = {"scores": {"a": math.nan, "b": np.float32(0.25), "c": math.inf}, "n": np.int64(3)}
    store.write([TileResult("j", Tile(0, 0, 1), "ok", output)])
    (row,) = store.iter_results("j")
    assert row.output == {"scores": {"a": None, "b": 0.25, "c": None}, "n": 3}


def test_iter_results_order_is_byte_order_like_sqlite(
    store: PostgresStore, results_db: str
) -> None:
    jobs = ["b", "B", "a", "_x", "é", "a b", "ab", "Z"]
    store.write([ok(job, x, y, z) for job in jobs for (x, y, z) in [(5, 5, 18), (1, 9, 17)]])
    keys = [(r.job, r.z, r.x, r.y) for r in store.iter_results()]
    assert keys == sorted(keys)  # Python compares str by code point: UTF-8 byte order
    assert len(keys) == 2 * len(jobs)
    # whatever the database's default collation (this machine's is already byte order)
    collations = sql(
        results_db,
        "SELECT DISTINCT collation_name FROM information_schema.columns "
        "WHERE table_schema = 'public' AND column_name IN ('job', 'message_id')",
    )
    assert collations == [("C",)]


# ----------------------------------------------------------------------------- streaming


def test_iter_results_uses_a_server_side_cursor(store: PostgresStore, results_db: str) -> None:
    n = 5 * pg.ITERSIZE
    store.write([ok("big", x % 100, x // 100) for x in range(n)])
    rows = store.iter_results("big")
    first = next(rows)
    assert (first.z, first.x, first.y) == (18, 0, 0)
    # the export's own backend sits in its transaction, having fetched one batch of rows
    (activity,) = sql(
        results_db,
        "SELECT state, query FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND query ILIKE 'FETCH%%'",
    )
    assert activity[0] == "idle in transaction"
    assert activity[1].startswith(f"FETCH FORWARD {pg.ITERSIZE} FROM")
    # a write committed now is not seen: one snapshot for the whole stream
    store.write([ok("big", 0, 10_000)])
    assert 1 + sum(1 for _ in rows) == n
    rows.close()


def test_iter_results_streams_in_constant_memory(store: PostgresStore) -> None:
    n = 60_000
    for start in range(0, n, 10_000):
        store.write([ok("big", x % 1000, x // 1000) for x in range(start, start + 10_000)])
    tracemalloc.start()
    count = sum(1 for _ in store.iter_results("big"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == n
    # 60k rows held at once would take well over 30 MB; streamed, about one batch
    assert peak < 8_000_000, peak


def test_iter_results_closed_early_releases_its_connection(
    store: PostgresStore, results_db: str
) -> None:
    store.write([ok("j", x, 0) for x in range(10)])
    rows = store.iter_results("j")
    next(rows)
    rows.close()
    others = sql(
        results_db,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
    )
    assert others == [(1,)]  # the store's own connection only


# ----------------------------------------------------------------------------- threads


def test_concurrent_writes_and_reads(store: PostgresStore) -> None:
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


def test_two_stores_writing_the_same_tiles_never_deadlock(results_db: str) -> None:
    """Two processes' worth of connections, each writing the same tiles in opposite orders:
    rows are locked in key order, so neither waits for the other forever."""
    tiles = [ok("j", x, y) for x in range(20) for y in range(20)]
    with PostgresStore(results_db) as a, PostgresStore(results_db) as b:

        def run(s: PostgresStore, order: list[TileResult]) -> None:
            for _ in range(15):
                s.write(order)

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(run, a, tiles), pool.submit(run, b, tiles[::-1])]
            for f in futures:
                f.result()
        assert {r.attempts for r in a.iter_results("j")} == {30}


# ----------------------------------------------------------------------------- parity


def parity_writes(s: ResultStore) -> None:
    s.start_job(JobInfo("with-classes", "a.tif", zoom=18, classes=("water", "forest", "urban")))
    scores = [{"water": 0.125, "forest": 0.5, "urban": 0.375}, {"water": 0.9, "forest": 0.05}]
    s.write(
        [
            TileResult(
                "no-classes", Tile(x, 7, 18), "ok", {"scores": scores[x % 2]}, None, "m", "2"
            )
            for x in range(6)
        ]
    )
    s.write(
        [
            TileResult("with-classes", Tile(1, 1, 18), "ok", {"scores": [0.1, 0.2, 0.7]}),
            TileResult("with-classes", Tile(2, 1, 18), "empty"),
            TileResult("with-classes", Tile(3, 1, 18), "error", error="boom\nsecond line"),
            TileResult("with-classes", Tile(1, 1, 18), "ok", {"scores": [0.3, 0.3, 0.4]}),
            TileResult("ünïcode 🚀", Tile(0, 0, 1), "ok", {"x": 1e-7, "big": 12345678901234567890}),
        ]
    )
    s.write([ok("no-classes", 5, 7, score=0.25)])  # other keys, in a later row
    s.reject([Rejection("m-1", "not JSON", "{nope"), Rejection("m-1", "not JSON", "{nope", "j")])


def test_same_writes_give_the_same_rows_and_exports_as_sqlite(
    store: PostgresStore, tmp_path: Path
) -> None:
    with SQLiteStore(tmp_path / "r.db") as lite:
        for s in (lite, store):
            parity_writes(s)
        assert [stripped(r) for r in store.iter_results()] == [
            stripped(r) for r in lite.iter_results()
        ]
        # key order too: exports name class columns in the order outputs list them
        assert [json.dumps(r.output) for r in store.iter_results()] == [
            json.dumps(r.output) for r in lite.iter_results()
        ]
        for status in ("ok", "error"):
            assert [stripped(r) for r in store.iter_results(status=status)] == [
                stripped(r) for r in lite.iter_results(status=status)
            ]
        assert store.jobs() == lite.jobs()
        assert store.counts() == lite.counts()
        assert store.done_tiles("no-classes") == lite.done_tiles("no-classes")
        assert store.rejects() == lite.rejects()
        for job in ("no-classes", "with-classes", None):
            for suffix in ("csv", "geojson"):
                export_results(lite, job, tmp_path / f"lite.{suffix}")
                export_results(store, job, tmp_path / f"pg.{suffix}")
                lite_bytes = (tmp_path / f"lite.{suffix}").read_bytes()
                assert (tmp_path / f"pg.{suffix}").read_bytes() == lite_bytes, (job, suffix)


# ----------------------------------------------------------------------------- rejects


def test_rejects_recorded_once_per_message_id(store: PostgresStore, results_db: str) -> None:
    store.reject([Rejection("m-1", "not JSON", "{nope", None)])
    store.reject([Rejection("m-1", "not JSON (again)", "{nope", "j")])  # delivered again
    store.reject([Rejection("m-2", "zoom 40; DROP TABLE rejects", "x\x00" * 5_000, "j")])
    assert store.rejects() == [
        Rejection("m-1", "not JSON (again)", "{nope", "j"),
        Rejection(
            "m-2", "zoom 40; DROP TABLE rejects", ("x\ufffd" * 5_000)[:MAX_REJECTED_BODY], "j"
        ),
    ]
    assert [r.message_id for r in store.rejects("j")] == ["m-1", "m-2"]
    assert store.rejects("other") == []
    assert sql(results_db, "SELECT message_id, attempts FROM rejects ORDER BY 1") == [
        ("m-1", 2),
        ("m-2", 1),
    ]
    store.reject([Rejection("m-3", "a", "b")] * 3)  # one call, three deliveries
    assert sql(results_db, "SELECT attempts FROM rejects WHERE message_id = 'm-3'") == [(3,)]
    with pytest.raises(StoreError, match="no message id"):
        store.reject([Rejection("", "why", "body")])


def test_closed_store(results_db: str) -> None:
    s = PostgresStore(results_db)
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.write([ok("j", 0, 0)])
    with pytest.raises(StoreError, match="closed"):
        s.iter_results()


# ----------------------------------------------------------------------------- outages


def test_unreachable_server_is_transient_and_hides_the_password() -> None:
    url = f"postgresql://chip:{SECRET}@127.0.0.1:{free_port()}/results"
    with pytest.raises(StoreUnavailable) as info:
        PostgresStore(url, connect_timeout=2)
    message = str(info.value)
    assert "\n" not in message and SECRET not in message
    assert message.startswith("PostgreSQL store postgresql://chip:***@127.0.0.1:")
    with pytest.raises(StoreUnavailable) as info:
        setup_database(url)
    assert SECRET not in str(info.value)


def test_a_malformed_url_never_echoes_the_password() -> None:
    url = "postgresql://chip:pa%zzword@127.0.0.1:1/results"
    with pytest.raises((StoreError, StoreUnavailable)) as info:
        PostgresStore(url, connect_timeout=1)
    assert "pa%zzword" not in str(info.value)


def test_restarted_server_is_used_again_by_the_same_store(throwaway_pg: Any) -> None:
    url = with_password(throwaway_pg.url)
    store = PostgresStore(url)
    store.write([ok("j", x, 0) for x in range(10)])

    throwaway_pg.stop()
    with pytest.raises(StoreUnavailable) as info:
        store.write([ok("j", x, 1) for x in range(10)])
    message = str(info.value)
    assert "unavailable while writing 10 results" in message
    assert SECRET not in message and "\n" not in message
    with pytest.raises(StoreUnavailable):  # still down: the next call tries again, and says so
        store.counts()
    with pytest.raises(StoreUnavailable):
        list(store.iter_results())

    throwaway_pg.start()
    store.write([ok("j", x, 1) for x in range(10)])  # the message delivered again
    store.write([ok("j", x, 0) for x in range(10)])  # and an earlier one, twice
    rows = list(store.iter_results("j"))
    assert len(rows) == 20  # nothing lost, nothing duplicated
    assert {(r.y, r.attempts) for r in rows} == {(0, 2), (1, 1)}
    store.close()


def test_restart_between_calls_is_retried_transparently(throwaway_pg: Any) -> None:
    with PostgresStore(throwaway_pg.url) as store:
        store.write([ok("j", 0, 0)])
        throwaway_pg.restart()  # the idle connection dies with the old server
        store.write([ok("j", 1, 0)])
        assert store.counts("j")["total"] == 2


def client_backends(url: str) -> list[tuple[int, str | None]]:
    """(pid, wait event type) of every client connection but the asking one."""
    return sql(
        url,
        "SELECT pid, wait_event_type FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() ORDER BY pid",
    )


def wait_for(condition: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return value


def test_killed_idle_connection_is_retried_once_on_a_fresh_one(throwaway_pg: Any) -> None:
    """What RDS Proxy's idle timeout or a failover does to a warm Lambda's connection."""
    with PostgresStore(throwaway_pg.url) as store:
        store.write([ok("j", 0, 0)])
        (before,) = client_backends(throwaway_pg.url)
        assert throwaway_pg.terminate_backends() == 1
        store.write([ok("j", 1, 0)])
        (after,) = client_backends(throwaway_pg.url)
        assert after[0] != before[0]
        assert [r.attempts for r in store.iter_results("j")] == [1, 1]


def test_connection_killed_during_a_write_is_retried_and_lands_once(throwaway_pg: Any) -> None:
    """The backend dies while the write waits (here on a table lock): nothing was committed,
    so the one retry on a fresh connection writes the pack exactly once."""
    url = throwaway_pg.url
    with PostgresStore(url) as store, psycopg.connect(url) as holder:
        store.write([ok("j", 0, 0)])
        holder.execute("LOCK TABLE results IN ACCESS EXCLUSIVE MODE")
        with ThreadPoolExecutor(1) as pool:
            writing = pool.submit(store.write, [ok("j", x, 1) for x in range(5)])
            waiting = wait_for(
                lambda: [pid for pid, event in client_backends(url) if event == "Lock"]
            )
            sql(url, "SELECT pg_terminate_backend(%s)", (waiting[0],))
            retry = wait_for(
                lambda: [pid for pid, event in client_backends(url) if event == "Lock"]
            )
            assert retry != waiting  # a new connection, waiting for the same lock
            holder.commit()
            writing.result(timeout=10)
        assert store.counts("j")["total"] == 6
        assert {r.attempts for r in store.iter_results("j")} == {1}


def test_downloads_by_status_use_the_indexes(store: PostgresStore, results_db: str) -> None:
    """Rows that are not ok come from the partial index; a job's rows (ok among them) from
    the primary key, in tile order: no sort, no sequential scan of every job."""
    store.write([ok("j", x, y) for x in range(40) for y in range(40)])
    store.write([TileResult("j", Tile(x, 99, 18), "error", error="e") for x in range(5)])
    store.write([ok("other", x, 7) for x in range(500)])
    sql(results_db, "ANALYZE results")

    def plan(status: str | None) -> str:
        where, params = results_filter("j", status, "%s")
        query = f"SELECT * FROM results {where} ORDER BY job, z, x, y"
        with psycopg.connect(results_db, autocommit=True) as conn:
            conn.execute("SET enable_seqscan = off")  # the planner's choice among indexes
            rows = conn.execute(f"EXPLAIN {query}", params).fetchall()
        return "\n".join(r[0] for r in rows)

    for status in ("error", "empty"):
        assert "results_not_ok" in plan(status) and "Sort" not in plan(status)
    for status in ("ok", None):
        assert "results_pkey" in plan(status) and "Sort" not in plan(status)
    assert [r.x for r in store.iter_results("j", status="error")] == list(range(5))


def test_version_2_database_migrates(empty_db: str) -> None:
    """v2 indexed every row by status; v3 indexes only the rows that are not ok."""
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(pg_schema.MIGRATIONS[0] + pg_schema.MIGRATIONS[1])
        conn.execute("INSERT INTO schema_version (version) VALUES (2)")
        conn.execute(
            "INSERT INTO results (job, z, x, y, status, error) VALUES ('j', 18, 1, 2, 'error', 'e')"
        )
    assert setup_database(empty_db).endswith(f"from version 2 to {pg_schema.SCHEMA_VERSION}")
    indexes = sql(empty_db, "SELECT indexname FROM pg_indexes WHERE tablename = 'results'")
    assert sorted(i for (i,) in indexes) == ["results_not_ok", "results_pkey"]
    with PostgresStore(empty_db, create=False) as s:
        assert [r.error for r in s.iter_results("j", status="error")] == ["e"]


def test_columns_the_same_on_every_row_go_once(store: PostgresStore) -> None:
    """A uniform pack sends job, zoom, status, model, error and attempts as scalars; a pack
    that differs in any one of them sends that column as an array, and every row is stored
    as written either way."""
    pack = [ok("j", x, 5) for x in range(3)]
    uniform, params = pg._write_parameters(pg._result_columns(pack))
    statement = pg._write_sql(uniform, upsert=True)
    assert "unnest(%b::bigint[], %b::bigint[], %b::text[]) AS t(x, y, output)" in statement
    assert params[:7] == ["j", 18, "ok", "m", "1", None, 1]

    variants = {
        "job": TileResult("k", Tile(9, 5, 18), "ok", {"a": 1}, None, "m", "1"),
        "z": TileResult("j", Tile(9, 5, 17), "ok", {"a": 1}, None, "m", "1"),
        "status": TileResult("j", Tile(9, 5, 18), "error", None, "boom", "m", "1"),
        "model": TileResult("j", Tile(9, 5, 18), "ok", {"a": 1}, None, "m2", "7"),
        "attempts": ok("j", 0, 5),  # a repeat: merged, 2 attempts
    }
    for column, odd in variants.items():
        job = f"mixed-{column}"
        odd = replace(odd, job=job if odd.job == "j" else f"{job}-2")
        rows = [*(replace(r, job=job) for r in pack), odd]
        assert pg._write_parameters(pg._result_columns(rows))[0] != uniform, column
        store.write(rows)
        written = {(r.job, r.tile): r for r in rows}
        stored = [r for r in store.iter_results() if r.job.startswith(job)]
        assert len(stored) == len(written), column
        for row in stored:
            expected = written[(row.job, Tile(row.x, row.y, row.z))]
            assert (row.status, row.output, row.error) == (
                expected.status,
                expected.output,
                expected.error,
            ), column
            assert (row.model_name, row.model_version) == (
                expected.model_name,
                expected.model_version,
            ), column
        attempts = {Tile(r.x, r.y, r.z): r.attempts for r in stored}
        assert attempts[Tile(0, 5, 18)] == (2 if column == "attempts" else 1), column
