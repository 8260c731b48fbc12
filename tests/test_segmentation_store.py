"""Vector features in both result stores: replaced with their tile's row in one transaction
(a redelivery leaves no duplicate, a failed write leaves neither), the same in SQLite and
PostgreSQL, migrated into databases of the previous schema, and read back by window and
class through range scans of the primary keys (checked with EXPLAIN)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
import shapely
from mercantile import Tile
from shapely.geometry import box

from chipscale.errors import StoreError
from chipscale.results import PostgresStore, ResultStore, SQLiteStore, setup_database
from chipscale.results import postgres_schema as pg_schema
from chipscale.results import sqlite as sqlite_schema
from chipscale.results.feature_rows import features_query, window_query
from chipscale.values import FeatureRow, ResultRow, TileFeature, TileResult

SIZE = 8


def square(i: int, cls: str = "water", *, background: bool = False) -> TileFeature:
    """A feature whose geometry says which it is: a 1 x 1 square at column ``i``."""
    return TileFeature(cls, box(i, 0, i + 1, 1).wkb, background=background, size=SIZE)


def seg(
    job: str,
    x: int,
    y: int,
    features: tuple[TileFeature, ...] | None = (),
    *,
    z: int = 18,
    status: str = "ok",
    assets: tuple[str, ...] = (),
) -> TileResult:
    output = None if status != "ok" else {"water": 0.25, "land": 0.75}
    error = "model failed" if status == "error" else None
    return TileResult(
        job, Tile(x, y, z), status, output, error, "seg", "1", features=features, assets=assets
    )  # type: ignore[arg-type]


def columns(rows: list[FeatureRow]) -> list[tuple[Any, ...]]:
    """Features as comparable tuples, the geometry as its column (the squares' x)."""
    return [
        (r.job, r.z, r.x, r.y, r.seq, r.cls, int(shapely.from_wkb(r.wkb).bounds[0]), r.size,
         r.score, r.background)
        for r in rows
    ]  # fmt: skip


def stripped(rows: list[ResultRow]) -> list[ResultRow]:
    return [replace(r, created_at="", updated_at="") for r in rows]


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ResultStore]:
    if request.param == "sqlite":
        with SQLiteStore(tmp_path / "results.db") as s:
            yield s
    else:
        with PostgresStore(request.getfixturevalue("results_db")) as s:
            yield s


# ----------------------------------------------------------------------------- writes


def test_a_redelivered_tile_replaces_its_features(store: ResultStore) -> None:
    store.write([seg("j", 1, 1, (square(0), square(1), square(2))), seg("j", 1, 2, (square(5),))])
    store.write([seg("j", 1, 1, (square(7), square(8)))])  # a redelivery: fewer regions
    got = columns(list(store.iter_features("j")))
    assert got == [
        ("j", 18, 1, 1, 0, "water", 7, SIZE, None, False),
        ("j", 18, 1, 1, 1, "water", 8, SIZE, None, False),
        ("j", 18, 1, 2, 0, "water", 5, SIZE, None, False),
    ]
    # the same tile twice in one write: its row and its features are the last result's
    store.write([seg("j", 1, 1, (square(3),)), seg("j", 1, 1, (square(4), square(6)))])
    got = columns(list(store.iter_features("j")))
    assert [(y, seq, column) for (_, _, _, y, seq, _, column, *_) in got] == [
        (1, 0, 4), (1, 1, 6), (2, 0, 5)
    ]  # fmt: skip
    # an error redelivery leaves none; the tile's row says error, attempts counted
    store.write([seg("j", 1, 1, (), status="error")])
    assert [(r.x, r.y) for r in store.iter_features("j")] == [(1, 2)]
    rows = {(r.x, r.y): r for r in store.iter_results("j")}
    assert (rows[(1, 1)].status, rows[(1, 1)].attempts) == ("error", 5)
    assert store.has_features("j")
    store.write([seg("j", 1, 2, ())])
    assert not store.has_features("j")


def test_a_classification_write_touches_no_feature(
    store: ResultStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write([seg("j", 1, 1, (square(0),))])
    statements: list[str] = []
    if isinstance(store, SQLiteStore):
        store._conn.set_trace_callback(statements.append)
    else:
        real = psycopg.Connection.execute

        def execute(self: psycopg.Connection, query: Any, *args: Any, **kw: Any) -> Any:
            statements.append(str(query))
            return real(self, query, *args, **kw)

        monkeypatch.setattr(psycopg.Connection, "execute", execute)
    # features=None (what classification rows carry): the tile's features stay, no statement
    store.write([seg("j", 1, 1, None), seg("j", 2, 1, None)])
    assert statements and not any("features" in s for s in statements), statements
    assert [r.x for r in store.iter_features("j")] == [1]
    statements.clear()
    store.write([seg("j", 2, 1, ())])
    assert any("features" in s for s in statements)


def test_assets_are_stored_and_replaced(store: ResultStore) -> None:
    store.write([seg("j", 1, 1, assets=("s2a-1", "s2b-2")), seg("j", 1, 2, None)])
    rows = {(r.x, r.y): r.assets for r in store.iter_results("j")}
    assert rows == {(1, 1): ("s2a-1", "s2b-2"), (1, 2): ()}
    store.write([seg("j", 1, 1, assets=("s2b-3",))])
    assert [r.assets for r in store.results_in("j", (18, 1, 1, 1, 1))] == [("s2b-3",)]


def test_a_failed_write_leaves_neither_the_rows_nor_their_features(
    store: ResultStore, request: pytest.FixtureRequest
) -> None:
    store.write([seg("j", 1, 1, (square(0), square(1)))])
    before = (list(store.iter_results("j")), list(store.iter_features("j")))
    # The database refuses one feature, after the rows were written in the transaction.
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as conn:
            conn.execute(
                "CREATE TRIGGER boom BEFORE INSERT ON features WHEN NEW.class = 'boom' "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
    else:
        with psycopg.connect(request.getfixturevalue("results_db"), autocommit=True) as conn:
            conn.execute(
                "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.class = 'boom' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$"
            )
            conn.execute(
                "CREATE TRIGGER boom BEFORE INSERT ON features FOR EACH ROW EXECUTE FUNCTION boom()"
            )
    with pytest.raises(StoreError, match="refused"):
        store.write(
            [
                seg("j", 1, 1, (square(5),)),  # a redelivery: its old features must stay
                seg("j", 3, 3, (square(0), square(1, "boom"))),
                seg("k", 1, 1, None),
            ]
        )
    assert (list(store.iter_results("j")), list(store.iter_features("j"))) == before
    assert list(store.iter_results("k")) == []


@pytest.mark.parametrize(
    ("feature", "message"),
    [
        (TileFeature("water", b"", size=SIZE), "no WKB geometry"),
        (TileFeature("water", box(0, 0, 1, 1).wkb, size=0), "tile size 0"),
    ],
)
def test_a_bad_feature_is_refused_before_anything_is_written(
    store: ResultStore, feature: TileFeature, message: str
) -> None:
    with pytest.raises(StoreError, match=message):
        store.write([seg("j", 1, 1, (square(0),)), seg("j", 1, 2, (feature,))])
    assert list(store.iter_results("j")) == []


# ----------------------------------------------------------------------------- reads


def grid_job(store: ResultStore) -> None:
    """Job j: 6 x 5 tiles at z18 (x 10-15, y 20-24), each with a water region (seq 0), a
    land region (seq 1) and a background region (seq 2); a z17 tile and job k around it."""
    results = [
        seg("j", x, y, (square(x, "water"), square(y, "land"), square(0, "bg", background=True)))
        for x in range(10, 16)
        for y in range(20, 25)
    ]
    results += [seg("j", 12, 22, (square(0),), z=17), seg("k", 12, 22, (square(0),))]
    store.write(results[::-1])  # order of writing does not matter


def test_windows_and_classes(store: ResultStore) -> None:
    grid_job(store)
    window = (18, 11, 21, 13, 22)  # inclusive: x 11-13, y 21-22
    rows = store.results_in("j", window)
    assert [(r.x, r.y) for r in rows] == [(x, y) for x in (11, 12, 13) for y in (21, 22)]
    assert {(r.job, r.z) for r in rows} == {("j", 18)}
    assert [(r.x, r.y) for r in store.results_in("j", window, limit=4)] == [
        (11, 21), (11, 22), (12, 21), (12, 22)
    ]  # fmt: skip
    assert store.results_in("j", window, limit=0) == []
    assert store.results_in("j", (18, 0, 0, 9, 99)) == []
    assert [(r.x, r.y) for r in store.results_in("j", (17, 0, 0, 99, 99))] == [(12, 22)]

    every = list(store.iter_features("j", background=True))
    assert len(every) == 6 * 5 * 3 + 1
    keys = [(f.z, f.x, f.y, f.seq) for f in every]
    assert keys == sorted(keys)  # (z, x, y, seq) order
    assert {f.cls for f in store.iter_features("j")} == {"water", "land"}  # no background
    assert {f.cls for f in store.iter_features("j", background=True)} == {"water", "land", "bg"}
    water = list(store.iter_features("j", classes=["water"], window=window))
    assert [(f.x, f.y, f.seq, f.cls) for f in water] == [
        (x, y, 0, "water") for x in (11, 12, 13) for y in (21, 22)
    ]
    assert [shapely.from_wkb(f.wkb).bounds[0] for f in water] == [11, 11, 12, 12, 13, 13]
    both = store.iter_features("j", classes=["land", "bg"], background=True, window=window)
    assert [(f.seq, f.background) for f in both][:2] == [(1, False), (2, True)]
    assert list(store.iter_features("j", classes=[])) == []
    assert list(store.iter_features("nobody")) == []
    assert not store.has_features("nobody")


def test_sqlite_and_postgres_store_the_same(tmp_path: Path, results_db: str) -> None:
    writes = [
        [seg("j", 1, 1, (square(0), square(1, "land"))), seg("j", 1, 2, assets=("a",))],
        [seg("j", 1, 1, (square(2, "bg", background=True),)), seg("j", 2, 2, None)],
        [seg("j", 1, 2, (), status="error"), seg("j", 3, 1, (square(4),), status="empty")],
        [seg("j", 3, 1, (replace(square(5), score=0.875),))],
    ]
    with SQLiteStore(tmp_path / "r.db") as lite, PostgresStore(results_db) as pg:
        for write in writes:
            lite.write(write)
            pg.write(write)
        reads: list[dict[str, Any]] = [
            {},
            {"background": True},
            {"classes": ["water"], "window": (18, 1, 1, 3, 1)},
        ]
        for kwargs in reads:
            assert list(lite.iter_features("j", **kwargs)) == list(pg.iter_features("j", **kwargs))
        assert len(list(pg.iter_features("j", background=True))) == 2
        assert stripped(list(lite.iter_results("j"))) == stripped(list(pg.iter_results("j")))
        window = (18, 0, 0, 5, 5)
        assert stripped(lite.results_in("j", window)) == stripped(pg.results_in("j", window))
        assert [f.score for f in pg.iter_features("j", background=True)] == [None, 0.875]


# ----------------------------------------------------------------------------- schema


def test_a_sqlite_file_of_the_previous_schema_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    with sqlite3.connect(path) as conn:  # as the previous chipscale created it
        for version in range(3):
            conn.executescript(sqlite_schema.MIGRATIONS[version])
        conn.execute("PRAGMA user_version = 3")
        conn.execute(
            "INSERT INTO results (job, z, x, y, status, output, created_at, updated_at) "
            "VALUES ('old', 18, 1, 2, 'ok', '{\"a\": 1.0}', 't', 't')"
        )
    with SQLiteStore(path) as store:
        [row] = store.iter_results("old")
        assert (row.output, row.assets) == ({"a": 1.0}, ())
        store.write([seg("old", 1, 2, (square(0),), assets=("x",))])
        assert [(f.x, f.y) for f in store.iter_features("old")] == [(1, 2)]
        assert [r.assets for r in store.iter_results("old")] == [("x",)]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (sqlite_schema.SCHEMA_VERSION,)


def test_a_postgres_database_of_the_previous_schema_is_migrated(empty_db: str) -> None:
    with psycopg.connect(empty_db, autocommit=True) as conn:
        for version in range(3):
            conn.execute(pg_schema.MIGRATIONS[version])
        conn.execute("INSERT INTO schema_version (version) VALUES (3)")
        conn.execute(
            "INSERT INTO results (job, z, x, y, status, output) "
            "VALUES ('old', 18, 1, 2, 'ok', '{\"a\": 1.0}')"
        )
    with pytest.raises(StoreError, match="db-setup"):
        PostgresStore(empty_db, create=False)
    assert setup_database(empty_db).endswith(f"from version 3 to {pg_schema.SCHEMA_VERSION}")
    assert setup_database(empty_db).endswith("is up to date (version 4)")
    with PostgresStore(empty_db, create=False) as store:
        [row] = store.iter_results("old")
        assert (row.output, row.assets) == ({"a": 1.0}, ())
        store.write([seg("old", 1, 2, (square(0),), assets=("x",))])
        assert [(f.x, f.y) for f in store.iter_features("old")] == [(1, 2)]
        assert [r.assets for r in store.iter_results("old")] == [("x",)]


# ----------------------------------------------------------------------------- plans


WINDOW = (18, 100, 100, 120, 110)


def explain_postgres(url: str, query: str, params: list[Any]) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        return "\n".join(row[0] for row in conn.execute(f"EXPLAIN {query}", params).fetchall())


def test_postgres_reads_windows_and_features_through_the_primary_keys(results_db: str) -> None:
    with psycopg.connect(results_db, autocommit=True) as conn:  # a 300 x 300 tile job
        conn.execute(
            "INSERT INTO results (job, z, x, y, status) SELECT 'j', 18, x, y, 'ok' "
            "FROM generate_series(0, 299) x, generate_series(0, 299) y"
        )
        conn.execute(
            "INSERT INTO features (job, z, x, y, seq, class, size, geom) "
            "SELECT 'j', 18, x, y, s, 'a', 256, '\\x00' "
            "FROM generate_series(0, 299) x, generate_series(0, 299) y, generate_series(0, 1) s"
        )
        conn.execute("ANALYZE")
    plan = explain_postgres(results_db, *window_query("*", "j", WINDOW, 100, "%s"))
    assert "Index Scan using results_pkey" in plan and "Sort" not in plan, plan
    assert "(y >= " in plan and "(y <= " in plan, plan  # y checked in the index, not the heap
    plan = explain_postgres(results_db, *features_query("j", ["a"], False, WINDOW, "%s"))
    assert "Index Scan using features_pkey" in plan and "Sort" not in plan, plan
    with PostgresStore(results_db) as store:
        assert len(store.results_in("j", WINDOW)) == 21 * 11
        assert len(list(store.iter_features("j", window=WINDOW))) == 21 * 11 * 2


def test_sqlite_reads_windows_and_features_through_the_primary_keys(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "r.db") as store:
        store.write([seg("j", x, y, (square(0),)) for x in range(30) for y in range(30)])
    conn = sqlite3.connect(tmp_path / "r.db")
    conn.execute("ANALYZE")

    def plan(query: str, params: list[Any]) -> str:
        return " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {query}", params))

    found = plan(*window_query("*", "j", WINDOW, 100, "?"))
    assert found.startswith("SEARCH results USING PRIMARY KEY (job=? AND z=? AND x>? AND x<?)")
    assert "TEMP B-TREE" not in found, found  # no sort: the key's order is (x, y)
    found = plan(*features_query("j", ["a"], False, WINDOW, "?"))
    assert "SEARCH features USING INDEX sqlite_autoindex_features_1 (job=? AND z=? AND x>?" in found
    assert "TEMP B-TREE" not in found, found
    found = plan(*features_query("j", None, True, None, "?"))
    assert "(job=?)" in found and "TEMP B-TREE" not in found, found
    conn.close()
