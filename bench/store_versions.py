"""Write throughput of this checkout's PostgresStore against an earlier commit's, side by side.

Why: bench/store.py compares write methods within one version, but a change to the write
path (its JSON encoder, the schema's indexes, how columns are sent) is judged against what it
replaced, on the same machine in the same minutes, since these machines drift from one hour
to the next. The earlier commit is checked out into a temporary git worktree; each
measurement runs in a fresh process with that version (or this one) first on the path, and
versions alternate round by round, so both see the same conditions. Each version writes the
same rows (bench/store.py's packs) into a database of its own, created with its own schema
and dropped at the end. Prints JSON and writes bench/results/store_versions.json.

Usage: ``python bench/store_versions.py [--against 7ac8547] [--db URL] [--rows 20000]
[--rounds 9] [--packs 100,1000]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from store import ADMIN_URL, scratch_database  # noqa: E402

#: One measurement, run with a version's checkout first on sys.path: set up the schema,
#: write the packs into an emptied table, print rows per second.
_MEASURE = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]  # the version's chipscale; this bench's packs
# chipscale first: bench/store.py puts this checkout on sys.path when it is imported.
from chipscale.results.postgres import PostgresStore, setup_database
from store import make_packs, measure
assert sys.modules["chipscale"].__file__.startswith(sys.argv[1]), "not the version asked for"
url, rows, pack = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
setup_database(url)
with PostgresStore(url, create=False) as store:
    print(measure(url, store.write, make_packs(rows, pack)))
"""


@contextlib.contextmanager
def worktree(commit: str) -> Iterator[Path]:
    """``commit`` checked out in a temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="chipscale-bench-") as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), commit],
            check=True,
        )
        try:
            yield path
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False
            )


def measure(tree: Path, url: str, rows: int, pack: int) -> float:
    """Rows per second of ``tree``'s store (this bench's packs, from this checkout)."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tree), str(ROOT / "bench"), url, str(rows), str(pack)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="7ac8547", help="the earlier commit")
    parser.add_argument(
        "--db",
        default=ADMIN_URL,
        help="admin URL of the server: the bench creates and drops its databases there",
    )
    parser.add_argument("--rows", type=int, default=20_000, help="rows per measurement")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--packs", default="100,1000", help="pack sizes, comma-separated")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "store_versions.json"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.packs.split(",")]
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    runs: dict[str, dict[str, list[float]]] = {str(n): {"old": [], "new": []} for n in sizes}
    load_before = os.getloadavg()
    with (
        scratch_database(args.db, "old_") as old_url,
        scratch_database(args.db, "new_") as new_url,
        worktree(args.against) as old_tree,
    ):
        versions = {"old": (old_tree, old_url), "new": (ROOT, new_url)}
        for round_ in range(args.rounds):
            order = ["old", "new"] if round_ % 2 else ["new", "old"]
            for size in sizes:
                for label in order:
                    rate = measure(*versions[label], args.rows, size)
                    runs[str(size)][label].append(round(rate, 1))
                    print(
                        f"round {round_ + 1} pack {size} {label}: {rate:,.0f} rows/s",
                        file=sys.stderr,
                    )
    medians = {
        size: {label: round(statistics.median(v), 1) for label, v in by.items()}
        for size, by in runs.items()
    }
    result: dict[str, Any] = {
        "benchmark": "store_versions",
        "versions": {"old": args.against, "new": f"{head} (working tree)"},
        "rows_per_second": medians,
        "new_to_old": {size: round(m["new"] / m["old"], 2) for size, m in medians.items()},
        "conditions": {
            "rows_per_measurement": args.rows,
            "rounds": args.rounds,
            "order": "old and new alternate, the first of each round swapping",
            "rows": "bench/store.py's packs (z18 adjacent tiles, 90% ok with 6 scores, 10% empty)",
            "process": "a fresh Python process per measurement, each version first on sys.path",
            "cpus": os.cpu_count(),
            "load_average_1_5_15": {
                "before": [round(v, 2) for v in load_before],
                "after": [round(v, 2) for v in os.getloadavg()],
            },
        },
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
