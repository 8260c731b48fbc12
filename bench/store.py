"""Write throughput of the PostgreSQL result store against the ways it could have been done.

Every method writes the same rows (packs of adjacent z18 tiles, most ``ok`` with six class
scores, some ``empty``) into the same freshly emptied ``results`` table of a database this
script creates (``--db``: the admin URL, default the local server) and drops at the end:

* ``store_unnest``: :meth:`PostgresStore.write`, one ``INSERT ... SELECT FROM unnest(...)
  ON CONFLICT DO UPDATE`` per pack, in autocommit (one round trip), what the workers run;
* ``per_row``: chip-n-scale's way, one ``INSERT ... ON CONFLICT`` statement per row executed
  one by one, a commit per pack, on the same kind of connection (psycopg 3, no prepared
  statements, as behind RDS Proxy);
* ``executemany``: the same per-row statement through psycopg's ``executemany`` (pipeline
  mode: one round trip per pack, one statement per row): the cheap fix of the per-row way;
* ``copy``: COPY into a session temporary table, then one ``INSERT ... SELECT ... ON
  CONFLICT`` from it, a commit per pack: the direct-connection path PostgresStore left out
  (see its module docstring).

All four pay the same Python work per pack (JSON encoding, merging repeated tiles).

And as the worker Lambda writes (:mod:`chipscale.cloud.sqs_batch`): the rows of a whole batch of
``--batch`` messages (the stack's default batch size) in one ``PostgresStore.write``,
``store_batch``, against the per-row way committing once per batch too, ``per_row_batch``
(chip-n-scale commits once per invocation). And rewriting rows already stored (a redelivery,
a rerun: the store's INSERT meets them and goes again as its upsert), ``store_rewrite``,
against the per-row way doing the same, ``per_row_rewrite``. Same rows, same rounds. One run;
measurements alternate within each round in an order that rotates every round, and medians
over rounds are reported, since two shared cores are noisy. Goal: the store at least 50,000
rows/s and at least 20x the per-row way. Prints JSON and writes bench/results/store.json.

Two conditions: ``loopback`` (a round trip of tens of microseconds, where the per-row way
pays mostly the server's per-statement work), and the same through a relay process that
delays each direction by ``--latency-ms`` (0.5: a round trip of about 1 ms, as a Lambda to
RDS Proxy in a VPC sees), where it pays one round trip per row: the condition the workers
actually run in. The relay touches neither the server nor the shared loopback device.

Usage: ``python bench/store.py [--db URL] [--rows 12000] [--rounds 5] [--packs 100,1000]
[--batch 4] [--latency-ms 0.5] [--latency-rows 3000]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import queue
import random
import socket
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
from mercantile import Tile
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chipscale.redaction import redact  # noqa: E402
from chipscale.results import postgres as pg  # noqa: E402
from chipscale.results.postgres import PostgresStore, setup_database  # noqa: E402
from chipscale.values import TileResult  # noqa: E402
from stacks.config import DeploymentConfig  # noqa: E402

CLASSES = ("water", "forest", "grass", "crops", "built", "bare")
GOAL_ROWS_PER_SECOND = 50_000
GOAL_RATIO_TO_PER_ROW = 20
METHODS = ["store_unnest", "per_row", "executemany", "copy"]
#: Methods measured with a whole Lambda batch of packs per write (the worker's unit).
BATCH_METHODS = {"store_batch": "store_unnest", "per_row_batch": "per_row"}
#: Methods measured rewriting rows already stored (redeliveries), one pack a write.
REWRITE_METHODS = {"store_rewrite": "store_unnest", "per_row_rewrite": "per_row"}
ALL_METHODS = [*METHODS, *BATCH_METHODS, *REWRITE_METHODS]
#: The server's admin URL: the benches create their databases there and drop them.
ADMIN_URL = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")

PER_ROW = """
INSERT INTO results (job, z, x, y, status, output, model_name, model_version, error,
                     attempts, created_at, updated_at)
VALUES (%s, %s, %s, %s, %s, %s::json, %s, %s, %s, 1, now(), now())
ON CONFLICT (job, z, x, y) DO UPDATE SET
    status = excluded.status, output = excluded.output, model_name = excluded.model_name,
    model_version = excluded.model_version, error = excluded.error,
    attempts = results.attempts + 1, updated_at = excluded.updated_at
"""

STAGE = """
CREATE TEMPORARY TABLE stage (job text, z int, x bigint, y bigint, status text, output text,
    model_name text, model_version text, error text, n int) ON COMMIT DELETE ROWS
"""

FROM_STAGE = """
INSERT INTO results AS r (job, z, x, y, status, output, model_name, model_version, error,
                          attempts, created_at, updated_at)
SELECT job, z, x, y, status, output::json, model_name, model_version, error, n, now(), now()
FROM stage
ON CONFLICT (job, z, x, y) DO UPDATE SET
    status = excluded.status, output = excluded.output, model_name = excluded.model_name,
    model_version = excluded.model_version, error = excluded.error,
    attempts = r.attempts + excluded.attempts, updated_at = excluded.updated_at
"""


def make_packs(rows: int, pack: int, seed: int = 0) -> list[list[TileResult]]:
    """``rows`` results in packs of ``pack`` adjacent tiles, as the worker writes them."""
    rng = random.Random(seed)
    side = 1000
    results = []
    for i in range(rows):
        tile = Tile(100_000 + i % side, 200_000 + i // side, 18)
        if rng.random() < 0.1:
            results.append(TileResult("bench-job", tile, "empty", None, None, "bench", "1.0"))
            continue
        raw = [rng.random() for _ in CLASSES]
        # the worker's output: {class: score} rounded to SCORE_DECIMALS (chipscale.pipeline.process)
        scores = {name: round(v / sum(raw), 6) for name, v in zip(CLASSES, raw, strict=True)}
        results.append(TileResult("bench-job", tile, "ok", scores, None, "bench", "1.0"))
    return [results[i : i + pack] for i in range(0, rows, pack)]


def connect(url: str, *, autocommit: bool) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=autocommit, prepare_threshold=None)


def per_row_params(pack: Sequence[TileResult]) -> list[tuple[Any, ...]]:
    """The rows as the per-row statements take them, after the same Python work as the store
    (JSON encoding; merging repeated tiles, a no-op on these packs)."""
    return list(zip(*pg._result_columns(pack)[:9], strict=True))


def write_store(store: PostgresStore) -> Callable[[list[TileResult]], None]:
    return store.write


def write_per_row(conn: psycopg.Connection) -> Callable[[list[TileResult]], None]:
    def write(pack: list[TileResult]) -> None:
        with conn.cursor() as cursor:
            for params in per_row_params(pack):
                cursor.execute(PER_ROW, params)
        conn.commit()

    return write


def write_executemany(conn: psycopg.Connection) -> Callable[[list[TileResult]], None]:
    def write(pack: list[TileResult]) -> None:
        with conn.cursor() as cursor:
            cursor.executemany(PER_ROW, per_row_params(pack))
        conn.commit()

    return write


def write_copy(conn: psycopg.Connection) -> Callable[[list[TileResult]], None]:
    conn.execute(STAGE)
    conn.commit()

    def write(pack: list[TileResult]) -> None:
        columns = pg._result_columns(pack)[:10]  # the stage's columns (not assets)
        with conn.cursor() as cursor:
            with cursor.copy("COPY stage FROM STDIN") as copy:
                for row in zip(*columns, strict=True):
                    copy.write_row(row)
            cursor.execute(FROM_STAGE)
        conn.commit()

    return write


def measure(
    url: str,
    write: Callable[[list[TileResult]], None],
    packs: list[list[TileResult]],
    *,
    stored_before: Callable[[list[TileResult]], None] | None = None,
) -> float:
    """Rows per second writing every pack into an emptied table, or, with ``stored_before``
    (a writer), into a table where it stored the same rows first: a redelivery or a rerun,
    every row an update."""
    with connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE results")
    for pack in packs if stored_before else ():
        stored_before(pack)
    rows = sum(len(p) for p in packs)
    start = time.perf_counter()
    for pack in packs:
        write(pack)
    elapsed = time.perf_counter() - start
    with connect(url, autocommit=True) as conn:
        stored = conn.execute("SELECT count(*), sum(attempts) FROM results GROUP BY job").fetchone()
    expected = (rows, rows * (2 if stored_before else 1))
    if stored is None or tuple(stored) != expected:
        raise SystemExit(f"a method stored (rows, attempts) {stored}, not {expected}")
    return rows / elapsed


def round_trip_us(url: str, n: int = 2000) -> float:
    """Median time of ``SELECT 1`` on this connection: what each per-row statement pays."""
    with connect(url, autocommit=True) as conn:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            conn.execute("SELECT 1")
            times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e6, 1)


def server_facts(url: str) -> dict[str, Any]:
    with connect(url, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        sync = conn.execute("SHOW synchronous_commit").fetchone()
        fsync = conn.execute("SHOW fsync").fetchone()
    return {
        "version": version[0] if version else None,
        "synchronous_commit": sync[0] if sync else None,
        "fsync": fsync[0] if fsync else None,
    }


def database_url(admin: str, name: str) -> str:
    base, _, tail = admin.partition("?")
    base = base.rsplit("/", 1)[0] + "/" + name
    return f"{base}?{tail}" if tail else base


@contextlib.contextmanager
def scratch_database(admin: str, label: str = "") -> Iterator[str]:
    """A new, empty database on ``admin``'s server, dropped afterwards; yields its URL."""
    name = f"chipscale_bench_{label}{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        yield database_url(admin, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ----------------------------------------------------------------------------- latency


def _pipe(src: socket.socket, dst: socket.socket, delay: float) -> None:
    """Forward ``src`` to ``dst``, each chunk ``delay`` seconds after it arrived (latency,
    not a bandwidth limit: chunks in flight overlap)."""
    chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()

    def receive() -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                chunks.put((time.monotonic() + delay, data))
        chunks.put((0.0, b""))

    def send() -> None:
        while True:
            due, data = chunks.get()
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                dst.sendall(data)
            except OSError:
                return

    threading.Thread(target=receive, daemon=True).start()
    threading.Thread(target=send, daemon=True).start()


def _relay(listener: socket.socket, upstream: tuple[str, int], delay: float) -> None:
    while True:
        client, _ = listener.accept()
        server = socket.create_connection(upstream)
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _pipe(client, server, delay)
        _pipe(server, client, delay)


@contextlib.contextmanager
def delayed(url: str, delay_ms: float) -> Iterator[str]:
    """``url`` reached through a relay process that adds ``delay_ms`` each way: the round
    trip of a network (a Lambda to RDS Proxy in a VPC) on loopback, without touching the
    server or the loopback device that other work shares. Yields the relayed conninfo."""
    if delay_ms <= 0:
        yield url
        return
    params = conninfo_to_dict(url)
    upstream = (str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    process = multiprocessing.get_context("fork").Process(
        target=_relay, args=(listener, upstream, delay_ms / 1000), daemon=True
    )
    process.start()
    listener.close()
    try:
        yield make_conninfo(url, host="127.0.0.1", port=port)
    finally:
        process.terminate()
        process.join()


# ----------------------------------------------------------------------------- runs


def bench_condition(
    url: str, sizes: Sequence[int], rows: int, rounds: int, label: str, batch: int
) -> dict[str, dict[str, list[float]]]:
    """Rows per second of every method and pack size, each round in a rotated order."""
    runs: dict[str, dict[str, list[float]]] = {str(n): {m: [] for m in ALL_METHODS} for n in sizes}
    store = PostgresStore(url, create=False)
    conns = {m: connect(url, autocommit=False) for m in ("per_row", "executemany", "copy")}
    writers = {
        "store_unnest": write_store(store),
        "per_row": write_per_row(conns["per_row"]),
        "executemany": write_executemany(conns["executemany"]),
        "copy": write_copy(conns["copy"]),
    }
    for extra in (BATCH_METHODS, REWRITE_METHODS):
        writers |= {name: writers[method] for name, method in extra.items()}
    before = {name: store.write for name in REWRITE_METHODS}
    units = {}  # what each method writes at a time: a pack, or a Lambda batch of packs
    for size in sizes:
        packs = make_packs(rows, size)
        batches = [
            [row for pack in packs[i : i + batch] for row in pack]
            for i in range(0, len(packs), batch)
        ]
        units[size] = {m: packs for m in [*METHODS, *REWRITE_METHODS]}
        units[size] |= {m: batches for m in BATCH_METHODS}
    try:
        for size in sizes:  # warm-up: caches, the first plans, the table's first pages
            for method in ALL_METHODS:
                measure(
                    url,
                    writers[method],
                    units[size][method][:3],
                    stored_before=before.get(method),
                )
        for round_ in range(rounds):
            turn = round_ % len(ALL_METHODS)
            order = ALL_METHODS[turn:] + ALL_METHODS[:turn]
            for size in sizes:
                for method in order:
                    rate = measure(
                        url,
                        writers[method],
                        units[size][method],
                        stored_before=before.get(method),
                    )
                    runs[str(size)][method].append(round(rate, 1))
                    print(
                        f"{label} round {round_ + 1} pack {size} {method}: {rate:,.0f} rows/s",
                        file=sys.stderr,
                    )
    finally:
        store.close()
        for conn in conns.values():
            conn.close()
    return runs


def summarise(runs: dict[str, dict[str, list[float]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    medians = {
        size: {m: round(statistics.median(v), 1) for m, v in by_method.items()}
        for size, by_method in runs.items()
    }
    ratios = {
        size: {
            "store_unnest_to_per_row": round(m["store_unnest"] / m["per_row"], 1),
            "store_unnest_to_executemany": round(m["store_unnest"] / m["executemany"], 2),
            "copy_to_store_unnest": round(m["copy"] / m["store_unnest"], 2),
            "store_batch_to_per_row_batch": round(m["store_batch"] / m["per_row_batch"], 1),
            "store_batch_to_per_row": round(m["store_batch"] / m["per_row"], 1),
            "store_batch_to_store_unnest": round(m["store_batch"] / m["store_unnest"], 2),
            "store_rewrite_to_per_row_rewrite": round(m["store_rewrite"] / m["per_row_rewrite"], 1),
            "store_rewrite_to_store_unnest": round(m["store_rewrite"] / m["store_unnest"], 2),
        }
        for size, m in medians.items()
    }
    return medians, ratios


def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    print(setup_database(url), file=sys.stderr)
    sizes = [int(s) for s in args.packs.split(",")]
    conditions = {"loopback": (0.0, args.rows)}
    if args.latency_ms > 0:
        conditions[f"added_{args.latency_ms:g}ms_each_way"] = (args.latency_ms, args.latency_rows)
    result: dict[str, Any] = {"benchmark": "store", "rows_per_second": {}, "ratios": {}}
    runs = {}
    for label, (delay_ms, rows) in conditions.items():
        with delayed(url, delay_ms) as target:
            runs[label] = bench_condition(target, sizes, rows, args.rounds, label, args.batch)
        result["rows_per_second"][label], result["ratios"][label] = summarise(runs[label])
    result["goal"] = {
        "store_rows_per_second_at_least": GOAL_ROWS_PER_SECOND,
        "store_to_per_row_at_least": GOAL_RATIO_TO_PER_ROW,
        "met": {
            unit: {
                label: {
                    size: {
                        "rows_per_second": m[store] >= GOAL_ROWS_PER_SECOND,
                        "ratio_to_per_row": result["ratios"][label][size][ratio]
                        >= GOAL_RATIO_TO_PER_ROW,
                    }
                    for size, m in medians.items()
                }
                for label, medians in result["rows_per_second"].items()
            }
            for unit, store, ratio in (
                ("one_pack_a_write", "store_unnest", "store_unnest_to_per_row"),
                (
                    f"as_the_worker_writes_{args.batch}_packs_a_write",
                    "store_batch",
                    "store_batch_to_per_row_batch",
                ),
            )
        },
    }
    result["runs"] = runs
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--db",
        default=ADMIN_URL,
        help="admin URL of the server: the bench creates and drops a database there",
    )
    parser.add_argument("--rows", type=int, default=12_000, help="rows per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--packs", default="100,1000", help="pack sizes, comma-separated")
    parser.add_argument(
        "--batch",
        type=int,
        default=DeploymentConfig().batch_size,
        help="messages of a worker invocation, written at once (default: the stack's)",
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.5,
        help="also measure through a relay adding this much each way (0: loopback only)",
    )
    parser.add_argument(
        "--latency-rows", type=int, default=3_000, help="rows per measurement with latency"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "store.json")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with scratch_database(args.db) as url:
        rtt = {"loopback": round_trip_us(url)}
        if args.latency_ms > 0:
            with delayed(url, args.latency_ms) as target:
                rtt[f"added_{args.latency_ms:g}ms_each_way"] = round_trip_us(target, 200)
        result = run(args, url)
        result["conditions"] = {
            "rows_per_measurement": {"loopback": args.rows, "with_latency": args.latency_rows},
            "rounds": args.rounds,
            "packs_per_worker_write": args.batch,
            "order": "rotating per round: " + ", ".join(ALL_METHODS),
            "rows": "z18 packs of adjacent tiles, 90% ok with 6 class scores rounded to 6 "
            "decimals as the worker writes them (about 100 B of JSON), 10% empty; every "
            "measurement into an emptied table (inserts)",
            "connection": f"TCP to {redact(args.db).rsplit('/', 1)[0]}, psycopg "
            f"{psycopg.__version__}, prepare_threshold=None; with latency: through a relay "
            "process adding the delay in each direction",
            "round_trip_us_select_1": rtt,
            "postgresql": server_facts(url),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1_5_15": {
                "before": [round(v, 2) for v in load_before],
                "after": [round(v, 2) for v in os.getloadavg()],
            },
            "note": "client, relay and server share the same cores with whatever else runs",
        }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
