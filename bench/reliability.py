"""Reliability figures: the soak and the faults of tests/reliability, run once and summed up.
Prints JSON and writes bench/results/reliability.json.

Why: "nothing lost, nothing duplicated" is a claim about the whole cloud path (push, SQS with
its dead-letter queue, the worker Lambda, TorchServe, PostgreSQL) under load and under
faults. The tests assert it; this records what a run looked like: tiles pushed and
processed, duplicates and losses (both must be 0), TorchServe requests, wall time, and for
each fault how long it lasted and how long the system took to get over it.

What runs: pytest on tests/reliability in a subprocess (the real local stack: moto's SQS, S3
and Secrets Manager, Lambda-shaped poller processes around lambdas/sqs_worker.py, the real
TorchServe and PostgreSQL; see tests/reliability/harness.py), with
``CHIPSCALE_SOAK_TILES=--tiles`` for the load run and ``CHIPSCALE_RELIABILITY_REPORT``
pointing at a file where each test appends its figures. The summary is built from those.
``--load-only`` runs the load test alone (``make soak`` runs the same test at 100,000).

Recovery times (seconds from the fault's injection; see harness.fault_figures):
``outage_s`` until the test healed the fault, ``first_success_after_heal_s`` until the first
message completed after that, ``failed_work_done_s`` until the first message that failed
during the fault was done on a redelivery (it includes the queue's 10 s visibility timeout),
``drained_s`` until every tile had its row and the queue was empty.

Usage: ``python bench/reliability.py [--tiles 10000] [--load-only] [--no-write]``
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "reliability.json"


def run_tests(tiles: int, pollers: int | None, load_only: bool, report: Path) -> dict[str, Any]:
    """Run tests/reliability once; the pytest exit code, its wall time and last line."""
    env = {
        **os.environ,
        "CHIPSCALE_SOAK_TILES": str(tiles),
        "CHIPSCALE_RELIABILITY_REPORT": str(report),
    }
    if pollers:
        env["CHIPSCALE_SOAK_POLLERS"] = str(pollers)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "tests/reliability",
        "-q",
        "-rxX",  # list expected failures (known bugs) and unexpected passes
        "-p",
        "no:cacheprovider",
        # Only the load test's own wait bounds it (about 0.03 s a tile).
        f"--timeout={max(600, int(tiles * 0.05))}",
    ]
    if load_only:
        command += ["-m", "soak"]
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = (done.stdout + done.stderr).strip().splitlines()
    return {
        "command": " ".join(command[1:]),
        "exit_code": done.returncode,
        "seconds": round(time.monotonic() - started, 1),
        "outcome": lines[-1] if lines else "",
        "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))],
        # Known bugs, each an xfail(strict=True) test that names it: see its reason.
        "expected_failures": [line for line in lines if line.startswith(("XFAIL", "XPASS"))],
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    load = next((r for r in records if r["section"] == "load"), {})
    faults = [r for r in records if r["section"] == "fault"]
    keep = (
        "fault",
        "outage_s",
        "first_success_after_heal_s",
        "failed_work_done_s",
        "redelivered_done_s",
        "drained_s",
        "failed_deliveries",
        "messages_failed",
        "max_receive_count",
        "tiles_pushed",
        "duplicates",
        "lost",
        "error",
        "reprocessed_tiles",
    )
    bad_input: dict[str, str] = {}
    for record in records:
        if record["section"] == "bad-input":
            bad_input.update(record["outcomes"])
    return {
        "load": {
            key: load.get(key)
            for key in (
                "tiles_pushed",
                "processed",
                "duplicates",
                "lost",
                "ok",
                "empty",
                "error",
                "reprocessed_tiles",
                "messages",
                "zoom",
                "source",
                "pollers",
                "torchserve_requests",
                "push_seconds",
                "wall_seconds",
                "tiles_per_second",
                "max_receive_count",
            )
        },
        "faults_injected": len(faults),
        "faults": [{k: f.get(k) for k in keep if k in f} for f in faults],
        "bad_input": bad_input,
        "security": next((r for r in records if r["section"] == "security"), {}),
    }


def versions() -> dict[str, str]:
    out = {}
    for package in ("torchserve", "torch", "moto", "psycopg", "rasterio", "aws-lambda-powertools"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tiles", type=int, default=10_000, help="tiles of the load run")
    parser.add_argument("--pollers", type=int, help="pollers of the load run (default 2)")
    parser.add_argument("--load-only", action="store_true", help="the load test alone")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS}")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as tmp:
        report = Path(tmp) / "report.jsonl"
        report.touch()
        pytest_run = run_tests(args.tiles, args.pollers, args.load_only, report)
        records = [json.loads(line) for line in report.read_text().splitlines() if line]
    result = {
        "benchmark": "reliability",
        **summarize(records),
        "pytest": pytest_run,
        "conditions": {
            "cpus": os.cpu_count(),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
            "platform": platform.platform(),
            "stack": "moto_server (SQS, S3, Secrets Manager), real TorchServe (1 CPU worker), "
            "PostgreSQL 127.0.0.1 (throwaway cluster for restarts), Lambda-shaped pollers",
            **versions(),
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if not args.no_write:
        RESULTS.write_text(text + "\n")
    sys.exit(pytest_run["exit_code"])


if __name__ == "__main__":
    main()
