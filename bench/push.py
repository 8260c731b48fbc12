"""What a push costs: SQS requests per 1,000 tiles, and peak memory of pushes and downloads
of a million tiles. Prints JSON and writes bench/results/push.json.

Why: chip-n-scale's ``sqs-push`` sent one message, one request, per tile: 1,000 requests per
1,000 tiles, each a round trip and a billed request. chipscale packs adjacent tiles (100 a
message by default) and sends ten messages a request; the goal is at most 2 requests per
1,000 tiles. And a push or a download of millions of tiles must fit a small machine: the
goal is a peak RSS under 200 MB for a million tiles.

What runs:

* ``requests``: a real push of ``--push-tiles`` tiles (a shuffled tile list) to a queue of a
  ``moto_server`` started here, drained while it fills (moto's SQS slows as a queue
  deepens), every tile checked to arrive once. Requests are counted twice: by the push and
  by a botocore hook on the HTTP sends. chip-n-scale's way (one ``SendMessage`` per tile,
  8 in flight as its PROMISE_THRESHOLD) is measured on ``--cns-sample`` tiles to the same
  moto; its request count for the whole push is the tile count.
* ``memory``: ``chipscale push --dry-run`` of a million tiles, from a shuffled tile-list
  file and from a bbox cover, each in a fresh process whose peak RSS (``ru_maxrss``) is
  read by a wrapper process; beside them the import baseline (``chipscale --version``) and,
  for scale, the naive way (``pack_tiles`` over the whole list in memory).
* ``download``: ``chipscale download --db URL -o out.csv``, ``out.geojson`` and
  ``out.parquet`` (GeoParquet) of a store
  holding ``--rows`` result rows, peak RSS the same way. ``--db`` picks the store (default:
  a temporary SQLite file, or a postgresql:// URL): the rows go to a job of their own,
  deleted at the end, so a shared database is left as it was.

Usage: ``python bench/push.py [--push-tiles 100000] [--tiles 1000000] [--rows 1000000]
[--db URL] [--quick] [--parts requests,memory,download]``; with ``--parts`` the other parts
of the results file are kept as they were. Each part carries the ``conditions`` of its own
run (date, load, versions), so a file merged from several runs says which is which.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mercantile  # noqa: E402
from mercantile import Tile  # noqa: E402

from chipscale.cloud import push as push_lib  # noqa: E402
from chipscale.grid.tilelist import write_tile_list  # noqa: E402
from chipscale.results import is_postgres_url, open_store  # noqa: E402
from chipscale.values import JobInfo, TileResult  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "push.json"
BIN = Path(sys.executable).parent
ZOOM = 18
#: North-west corner of the million-tile block (z18, around 10 E 50 N).
X0, Y0 = 138_000, 88_000
#: Run a command, print its peak RSS in KiB: a fresh process per measurement, since
#: RUSAGE_CHILDREN is the maximum over every child a process ever waited for.
RSS_WRAPPER = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode,"
    " round(time.perf_counter() - t, 2))\n"
    "sys.stderr.write(p.stderr[-2000:] if p.returncode else '')\n"
)
NAIVE_PACK = (
    "import sys\n"
    "from chipscale.grid.packs import pack_tiles\n"
    "from chipscale.grid.tilelist import read_tile_list\n"
    "print(sum(1 for _ in pack_tiles(read_tile_list(sys.argv[1]))))\n"
)


# ----------------------------------------------------------------------------- helpers


def peak_rss(cmd: list[str]) -> dict[str, Any]:
    """Peak RSS (MB) and wall seconds of ``cmd`` run in a process of its own."""
    out = subprocess.run(
        [sys.executable, "-c", RSS_WRAPPER, *cmd], capture_output=True, text=True, check=True
    )
    kib, code, seconds = out.stdout.split()
    if code != "0":
        raise RuntimeError(f"{' '.join(cmd)} exited {code}: {out.stderr.strip()}")
    return {"peak_rss_mb": round(int(kib) / 1024, 1), "seconds": float(seconds)}


def block(width: int, height: int) -> list[Tile]:
    return [Tile(x, y, ZOOM) for x in range(X0, X0 + width) for y in range(Y0, Y0 + height)]


def write_shuffled(path: Path, tiles: list[Tile]) -> Path:
    random.Random(0).shuffle(tiles)
    with path.open("w") as handle:
        write_tile_list(tiles, handle)
    return path


def block_bbox(width: int, height: int) -> str:
    """A W,S,E,N box covering exactly a width x height block of tiles (edges pulled in)."""
    west, north = mercantile.ul(X0, Y0, ZOOM)
    east, south = mercantile.ul(X0 + width, Y0 + height, ZOOM)
    eps = 1e-7
    return f"{west + eps},{south + eps},{east - eps},{north - eps}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto() -> Iterator[str]:
    """A moto_server of our own on loopback, with dummy credentials in the environment."""
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    port = free_port()
    exe = shutil.which("moto_server", path=str(BIN)) or "moto_server"
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class Drain(threading.Thread):
    """Receives and deletes while the push fills the queue; counts tiles as they arrive."""

    def __init__(self, client: Any, queue_url: str) -> None:
        super().__init__(daemon=True)
        self.client, self.queue_url = client, queue_url
        self.tiles: dict[tuple[int, int, int], int] = {}
        self.messages = 0
        self.stop = threading.Event()

    def run(self) -> None:
        idle = 0
        while not (self.stop.is_set() and idle >= 2):
            got = self.client.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=10, VisibilityTimeout=600
            ).get("Messages", [])
            idle = 0 if got else idle + 1
            for message in got:
                self.messages += 1
                body = json.loads(message["Body"])
                for x, y, z in body.get("tiles") or [[body["x"], body["y"], body["z"]]]:
                    self.tiles[(x, y, z)] = self.tiles.get((x, y, z), 0) + 1
            if got:
                entries = [
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)
                ]
                self.client.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
            elif not self.stop.is_set():
                time.sleep(0.05)


# ----------------------------------------------------------------------------- (a) requests


def bench_requests(push_tiles: int, cns_sample: int, work: Path) -> dict[str, Any]:
    side = int(push_tiles**0.5)
    tiles = block(side, push_tiles // side)
    path = write_shuffled(work / "push-tiles.txt", list(tiles))
    with moto() as endpoint:
        client = push_lib.sqs_client(region="us-east-1", endpoint_url=endpoint, concurrency=8)
        sends: dict[str, int] = {"SendMessageBatch": 0, "SendMessage": 0}

        def count(event_name: str, **_: Any) -> None:
            sends[event_name.rsplit(".", 1)[-1]] += 1

        client.meta.events.register("before-send.sqs.SendMessageBatch", count)
        client.meta.events.register("before-send.sqs.SendMessage", count)

        queue = client.create_queue(QueueName="bench-push")["QueueUrl"]
        drain = Drain(push_lib.sqs_client(region="us-east-1", endpoint_url=endpoint), queue)
        drain.start()
        from chipscale.grid.tilelist import read_tile_list

        summary = push_lib.push(
            read_tile_list(path),
            job="bench",
            source="s3://bench/scene.tif",
            queue_url=queue,
            client=client,
            concurrency=8,
        )
        drain.stop.set()
        drain.join(timeout=600)
        arrived_once = len(drain.tiles) == len(tiles) and set(drain.tiles.values()) == {1}

        # chip-n-scale's way on a sample: one SendMessage per tile, 8 in flight.
        cns_queue = client.create_queue(QueueName="bench-cns")["QueueUrl"]
        cns_drain = Drain(push_lib.sqs_client(region="us-east-1", endpoint_url=endpoint), cns_queue)
        cns_drain.start()
        sample = tiles[:cns_sample]
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=8) as pool:
            body = '{{"x":{},"y":{},"z":{}}}'
            list(
                pool.map(
                    lambda t: client.send_message(
                        QueueUrl=cns_queue, MessageBody=body.format(t.x, t.y, t.z)
                    ),
                    sample,
                )
            )
        cns_seconds = time.perf_counter() - started
        cns_drain.stop.set()
        cns_drain.join(timeout=600)
    per_tile_s = cns_seconds / len(sample)
    return {
        "tiles": summary.tiles_sent,
        "messages": summary.messages_sent,
        "tiles_per_message": round(summary.tiles_sent / summary.messages_sent, 1),
        "requests_counted_by_push": summary.requests,
        "requests_counted_by_botocore_hook": sends["SendMessageBatch"],
        "requests_per_1000_tiles": round(summary.requests_per_1000_tiles, 3),
        "goal_requests_per_1000_tiles": 2,
        "seconds": round(summary.seconds, 2),
        "failed_tiles": summary.failed_tiles,
        "every_tile_arrived_once": arrived_once,
        "chip_n_scale": {
            "requests_per_1000_tiles": 1000,
            "requests_for_these_tiles": len(tiles),
            "measured_sample_tiles": len(sample),
            "measured_sample_requests": sends["SendMessage"],
            "measured_sample_seconds": round(cns_seconds, 2),
            "estimated_seconds_for_these_tiles": round(per_tile_s * len(tiles), 1),
            "sample_arrived_once": len(cns_drain.tiles) == len(sample),
        },
        "note": "seconds are moto's on loopback, not AWS figures; request counts are exact",
        "request_ratio_chip_n_scale_to_chipscale": round(len(tiles) / summary.requests, 1),
    }


# ----------------------------------------------------------------------------- (b) memory


def bench_push_memory(tiles: int, work: Path) -> dict[str, Any]:
    side = int(tiles**0.5)
    height = tiles // side
    listing = write_shuffled(work / "million.txt", block(side, height))
    chipscale = str(BIN / "chipscale")
    common = ["--dry-run", "--worker-source", "--json"]
    return {
        "tiles": side * height,
        "zoom": ZOOM,
        "goal_peak_rss_mb": 200,
        "import_baseline": peak_rss([chipscale, "--version"]),
        "tile_list_dry_run": peak_rss([chipscale, "push", str(listing), *common]),
        "bbox_cover_dry_run": peak_rss(
            [chipscale, "push", "--bbox", block_bbox(side, height), "--zoom", str(ZOOM), *common]
        ),
        # For scale: pack_tiles over the whole list in memory, and what its imports weigh.
        "naive_pack_tiles_in_memory": peak_rss([sys.executable, "-c", NAIVE_PACK, str(listing)]),
        "naive_import_baseline": peak_rss([sys.executable, "-c", NAIVE_PACK.split("print")[0]]),
        # Three times the chunk: sorted runs spill to disk and are merged.
        "tile_list_dry_run_3x_spilled": {
            "tiles": 3 * side * height,
            **peak_rss(
                [
                    chipscale,
                    "push",
                    str(write_shuffled(work / "3x.txt", block(side, 3 * height))),
                    *common,
                ]
            ),
        },
        "chunk_tiles": push_lib.DEFAULT_CHUNK_TILES,
    }


# ----------------------------------------------------------------------------- (c) download


def fill_store(db: str, job: str, rows: int) -> float:
    """Write ``rows`` results to ``job`` as the worker would (batches of one pack's tiles)."""
    started = time.perf_counter()
    classes = ("background", "building", "road")
    side = int(rows**0.5) + 1
    tiles = (Tile(X0 + i % side, Y0 + i // side, ZOOM) for i in range(rows))
    with open_store(db) as store:
        store.start_job(
            JobInfo(
                job=job,
                source="s3://bench/scene.tif",
                zoom=ZOOM,
                model_name="bench",
                model_version="1",
                classes=classes,
                tiles_total=rows,
            )
        )
        rng = random.Random(1)
        batch: list[TileResult] = []
        for tile in tiles:
            scores = [rng.random() for _ in classes]
            total = sum(scores)
            output = {
                "scores": {c: round(s / total, 4) for c, s in zip(classes, scores, strict=True)}
            }
            batch.append(
                TileResult(
                    job=job,
                    tile=tile,
                    status="ok",
                    output=output,
                    model_name="bench",
                    model_version="1",
                )
            )
            if len(batch) == 10_000:
                store.write(batch)
                batch = []
        store.write(batch)
    return time.perf_counter() - started


def bench_download(rows: int, db: str | None, work: Path) -> dict[str, Any]:
    db = db or f"sqlite:///{work / 'download.db'}"
    job = f"bench-download-{uuid.uuid4().hex[:8]}"
    fill_seconds = fill_store(db, job, rows)
    chipscale = str(BIN / "chipscale")
    report: dict[str, Any] = {
        "rows": rows,
        "store": db.split("://", 1)[0],
        "fill_seconds": round(fill_seconds, 1),
        "goal_peak_rss_mb": 200,
    }
    try:
        for suffix in ("csv", "geojson", "parquet"):
            out = work / f"out.{suffix}"
            figures = peak_rss([chipscale, "download", "--db", db, "--job", job, "-o", str(out)])
            figures["output_mb"] = round(out.stat().st_size / 2**20, 1)
            report[suffix] = figures
            out.unlink()
    finally:
        drop_job(db, job)
    return report


def drop_job(db: str, job: str) -> None:
    """Leave a shared PostgreSQL database as it was (a SQLite file goes with ``work``)."""
    if not is_postgres_url(db):
        return
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DELETE FROM results WHERE job = %s", (job,))
        conn.execute("DELETE FROM jobs WHERE job = %s", (job,))


# ----------------------------------------------------------------------------- main

PARTS = ("requests", "memory", "download")


def versions() -> dict[str, str]:
    return {
        name: importlib.metadata.version(name)
        for name in ("boto3", "botocore", "moto", "numpy", "rich")
    }


def conditions(started: datetime, load_before: tuple[float, ...], quick: bool) -> dict[str, Any]:
    """The conditions of one part's run, kept in that part."""
    return {
        "date": started.isoformat(timespec="seconds"),
        "quick": quick,
        "cpus": os.cpu_count(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "zoom": ZOOM,
        "max_tiles_per_message": push_lib.DEFAULT_MAX_TILES,
        "concurrency": push_lib.DEFAULT_CONCURRENCY,
        **versions(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--push-tiles", type=int, default=100_000)
    parser.add_argument("--cns-sample", type=int, default=2_000)
    parser.add_argument("--tiles", type=int, default=1_000_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", help="results store for the download figure (default: SQLite)")
    parser.add_argument("--quick", action="store_true", help="a tenth of every size")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS}")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="which parts to run, comma-separated"
    )
    args = parser.parse_args()
    if args.quick:
        args.push_tiles, args.cns_sample = args.push_tiles // 10, args.cns_sample // 10
        args.tiles, args.rows = args.tiles // 10, args.rows // 10

    parts = [part for part in args.parts.split(",") if part]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}: expected some of {', '.join(PARTS)}")
    runs = {
        "requests": lambda work: bench_requests(args.push_tiles, args.cns_sample, work),
        "memory": lambda work: bench_push_memory(args.tiles, work),
        "download": lambda work: bench_download(args.rows, args.db, work),
    }
    result: dict[str, Any] = {"benchmark": "push"}
    if set(parts) != set(PARTS) and RESULTS.exists():
        kept = json.loads(RESULTS.read_text())
        result.update({part: kept[part] for part in PARTS if part in kept})
    with tempfile.TemporaryDirectory(prefix="bench-push-") as tmp:
        for part in parts:
            started, load_before = datetime.now(UTC), os.getloadavg()
            result[part] = runs[part](Path(tmp))
            result[part]["conditions"] = conditions(started, load_before, args.quick)
    text = json.dumps(result, indent=2)
    print(text)
    if not args.no_write:
        RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
