"""How close ``chipscale plan``'s model of the system comes to measured runs; prints JSON.

Why: a plan is only worth its price if its tiles/s is near what the stack then does. Goal:
predicted within 20 % of measured in every configuration, including one where the model is
the bottleneck and one where the reads are (docs/design.md 9.9 says where the model is wrong).

What runs, per configuration (pollers x TorchServe workers x SQS batch size x read latency),
all of it real except AWS (moto's server) and the GPU (TorchServe on the CPU):

1. **Predicted.** The rates the model needs are measured before and after the run (their
   mean is used: the load drifts), as ``chipscale profile``
   measures them (:mod:`chipscale.ops.profile`): one worker's pack reads of the NAIP COG served
   over HTTP with the configuration's latency per range request (``LatencyServer``), the
   model's tiles/s through this configuration's TorchServe, a PostgreSQL write per pack, and
   the SQS receive + delete of an invocation against moto. :func:`solve` turns them into
   tiles/s with ``lambdas`` = pollers and each TorchServe worker a server of its own (CPU
   serving), up to the cores.
2. **Measured.** ``chipscale push`` fills a moto queue; N poller processes (the reliability
   harness's stand-in for Lambda's event source, running ``lambdas/sqs_worker.py``) drain
   it through TorchServe into PostgreSQL. Tiles/s is the steady rate from the pollers'
   journals: tiles handled after the first invocation ended, over the time to the last.

Usage: ``python bench/plan_accuracy.py [--tiles 2000] [--width 16] [--quick]``; ``--quick``
is a smoke run (small, noisy). Writes bench/results/plan_accuracy.json (not with --quick
unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [
    str(ROOT),
    str(ROOT / "bench"),
    str(ROOT / "tests"),
    str(ROOT / "tests/reliability"),
]

import boto3  # noqa: E402
import psycopg  # noqa: E402
import resnet_model  # noqa: E402
from conftest import running_moto  # noqa: E402
from harness import (  # noqa: E402
    Database,
    Pollers,
    make_queues,
    make_secret,
    push,
    tiles_of,
    worker_environment,
)

from chipscale.models.predictors import demo_model_path  # noqa: E402
from chipscale.models.serving import ServingConfig, TorchServe, package_model  # noqa: E402
from chipscale.ops import profile  # noqa: E402
from chipscale.ops.system_model import Fleet, Rates, solve  # noqa: E402
from chipscale.results.postgres import setup_database  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "plan_accuracy.json"
NAIP = ROOT.parent / "shared" / "data" / "naip_m_4709963_se_14_1_20200831.tif"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
GOAL = 0.20

#: (name, pollers, TorchServe workers, SQS batch size, read latency ms, model): one where the
#: model is the bottleneck (many pollers, one worker, the ResNet), one where the reads are
#: (one poller, two workers of the small demo model), and one in between.
CONFIGS: list[tuple[str, int, int, int, float, str]] = [
    ("model-bound", 4, 1, 2, 0.0, "resnet"),
    ("read-bound", 1, 2, 1, 40.0, "demo"),
    ("mixed", 2, 1, 4, 10.0, "resnet"),
]


def sqs_overhead(moto: str, batch: int) -> float:
    """Seconds of one invocation's receive and delete of ``batch`` messages against moto."""
    queues = make_queues(moto, visibility=30, max_receive=5)
    sqs = boto3.client("sqs", endpoint_url=moto)
    times = []
    for _ in range(5):
        queues.send(json.dumps({"n": i}) for i in range(batch))
        start = time.perf_counter()
        got = sqs.receive_message(QueueUrl=queues.url, MaxNumberOfMessages=batch, WaitTimeSeconds=1)
        messages = got.get("Messages", [])
        if messages:
            sqs.delete_message_batch(
                QueueUrl=queues.url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                    for i, m in enumerate(messages)
                ],
            )
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_config(
    name: str,
    pollers_n: int,
    workers: int,
    batch: int,
    latency_ms: float,
    model_kind: str,
    *,
    moto: str,
    db_url: str,
    secret: str,
    models: dict[str, Path],
    work: Path,
    tiles: int,
    skip: int,
) -> dict[str, Any]:
    model = models[model_kind]
    config = ServingConfig(
        batch_size=4, max_batch_delay_ms=10, workers=workers, sub_batch=8, threads=1
    )
    mar = package_model(model, work / f"mar-{name}", config=config, force=True)
    with ExitStack() as stack:
        server = TorchServe.on_free_ports(mar, work / f"ts-{name}")
        server.start()
        stack.callback(server.stop)
        imagery = stack.enter_context(profile.LatencyServer(NAIP, latency_ms / 1000))
        # ---- predicted: the rates, measured as chipscale profile measures them
        tile_set = tiles_of(NAIP, tiles, skip=skip)
        zoom = tile_set[0].z
        sample = profile.sample_batch(str(NAIP), zoom, 32)

        def measure() -> dict[str, float]:
            found, _ = profile.model_rates(str(model), server.predictions_url, sample, workers)
            return {
                "read_s": profile.read_seconds_per_tile(imagery.url, zoom, 200),
                "gpu_tiles_per_s": found["gpu_tiles_per_s"],
                "predict_overhead_s": found["predict_overhead_s"],
                "write_s": profile.write_seconds_per_tile(db_url, zoom),
                "invocation_overhead_s": sqs_overhead(moto, batch),
            }

        # Measured before and after the run, and averaged: the machine's load drifts.
        before = measure()
        fleet = Fleet(
            "local",
            instances=1,
            gpus_per_instance=1,
            per_gpu_concurrency=pollers_n,
            workers_per_gpu=workers,
            batch_size=batch,
            tiles_per_message=100,  # replaced by the push's mean below
            lambda_timeout_s=120.0,
            host_cores=os.cpu_count() or 1,
            lambdas=pollers_n,
        )
        # ---- measured: push, then the pollers drain the queue
        queues = make_queues(moto, visibility=120, max_receive=5)
        job = f"accuracy-{name}-{os.getpid()}"
        summary = push(queues.url, imagery.url, tile_set, job=job, db_url=db_url, work=work)
        tiles_per_message = summary["tiles_sent"] / summary["messages_sent"]
        # the packs' mean size, as chipscale plan takes it from the push's counts
        fleet = replace(fleet, tiles_per_message=max(1, round(tiles_per_message)))
        prefix = imagery.url.rsplit("/", 1)[0] + "/"
        env = worker_environment(
            moto=moto,
            model_url=server.predictions_url,
            secret_arn=secret,
            db=Database.of(db_url),
            allowed_sources=[prefix],
        )
        load_before = os.getloadavg()
        with Pollers(
            queues, env, work / f"pollers-{name}", batch_size=batch, function_timeout=120
        ) as pollers:
            pollers.start(pollers_n)
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline:
                done = _done(db_url, job)
                if done >= summary["tiles_sent"] or pollers.crashed():
                    break
                time.sleep(1.0)
            crashed = pollers.crashed()
        if crashed:
            raise RuntimeError(f"{name}: {crashed[0]}")
        tiles_steady, detail = _steady(pollers, tiles_per_message)
        after = measure()
        mean = {k: (before[k] + after[k]) / 2 for k in before}
        rates = Rates(
            gpu_tiles_per_s=mean["gpu_tiles_per_s"],
            handler_cpu_s_per_request=0.0,
            tiles_per_request=profile.TILES_PER_REQUEST,
            predict_overhead_s=mean["predict_overhead_s"],
            read_s=mean["read_s"],
            write_s=mean["write_s"],
            db_rows_per_s=1.0 / mean["write_s"],
            cold_start_s=0.0,
            invocation_overhead_s=mean["invocation_overhead_s"],
            request_bytes_per_tile=0.0,
            shared_device=False,
        )
        predicted = solve(rates, fleet)
    measured = tiles_steady / detail["span_s"] if detail["span_s"] > 0 else 0.0
    error = (predicted.tiles_per_s - measured) / measured if measured else None
    return {
        "name": name,
        "pollers": pollers_n,
        "torchserve_workers": workers,
        "sqs_batch_size": batch,
        "read_latency_ms": latency_ms,
        "model": model_kind,
        "tiles": summary["tiles_sent"],
        "messages": summary["messages_sent"],
        "tiles_per_message": round(tiles_per_message, 1),
        "predicted_tiles_per_s": round(predicted.tiles_per_s, 2),
        "measured_tiles_per_s": round(measured, 2),
        "error": None if error is None else round(error, 3),
        "within_goal": None if error is None else abs(error) <= GOAL,
        "predicted_bottleneck": predicted.bottleneck,
        "bounds_tiles_per_s": {k: round(v, 1) for k, v in predicted.bounds.items()},
        "rates_mean_of_before_and_after": {k: round(v, 6) for k, v in mean.items()},
        "rates_before": {k: round(v, 6) for k, v in before.items()},
        "rates_after": {k: round(v, 6) for k, v in after.items()},
        "measured_detail": detail,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def _steady(pollers: Pollers, tiles_per_message: float) -> tuple[float, dict[str, Any]]:
    """Tiles handled after the first invocation ended, and the span to the last end."""
    ends: list[tuple[float, int]] = []
    events = pollers.journal().invocations
    for event in events:
        ok = sum(1 for r in event.get("records", []) if r["ok"])
        ends.append((float(event.get("deleted_at", event["t1"])), ok))
    ends.sort()
    durations = sorted(float(e["t1"]) - float(e["t0"]) for e in events)
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        by_pid.setdefault(int(e["pid"]), []).append(e)
    gaps = sorted(
        float(b["t0"]) - float(a.get("deleted_at", a["t1"]))
        for runs in by_pid.values()
        for a, b in itertools.pairwise(runs)
    )
    if len(ends) < 2:
        raise RuntimeError("fewer than two invocations: give more tiles")
    messages = sum(n for _, n in ends[1:])
    span = ends[-1][0] - ends[0][0]
    detail = {
        "invocations": len(ends),
        "span_s": round(span, 2),
        "median_invocation_s": round(durations[len(durations) // 2], 3),
        "median_gap_between_invocations_s": round(gaps[len(gaps) // 2], 3) if gaps else None,
    }
    return messages * tiles_per_message, detail


def _done(db_url: str, job: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM results WHERE job = %s", (job,)).fetchone()
    return int(row[0]) if row else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=2000, help="tiles per configuration")
    parser.add_argument("--width", type=int, default=16, help="the ResNet's width")
    parser.add_argument("--quick", action="store_true", help="600 tiles a configuration")
    parser.add_argument("--only", help="run only this configuration (by name)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.tiles = min(args.tiles, 600)
    out = args.out or (None if args.quick else RESULTS)
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
    )
    name = f"plan_accuracy_{os.getpid()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    db_url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    results = []
    try:
        setup_database(db_url)
        with running_moto() as moto, tempfile.TemporaryDirectory(prefix="plan-acc-") as tmp:
            work = Path(tmp)
            os.environ["AWS_ENDPOINT_URL"] = moto
            secret = make_secret(moto, Database.of(db_url))
            models = {
                "resnet": resnet_model.save_resnet(work / "bench-resnet.pt", args.width),
                "demo": demo_model_path(),
            }
            for i, config in enumerate(CONFIGS):
                if args.only and config[0] != args.only:
                    continue
                result = run_config(
                    *config,
                    moto=moto,
                    db_url=db_url,
                    secret=secret,
                    models=models,
                    work=work,
                    tiles=args.tiles,
                    skip=i * args.tiles,
                )
                print(json.dumps(result), file=sys.stderr)
                results.append(result)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    errors = [abs(r["error"]) for r in results if r["error"] is not None]
    report = {
        "benchmark": "plan_accuracy",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "goal": f"predicted tiles/s within {GOAL:.0%} of measured in every configuration",
        "met": bool(errors) and max(errors) <= GOAL,
        "max_abs_error": round(max(errors), 3) if errors else None,
        "configurations": results,
        "conditions": {
            "source": NAIP.name,
            "tiles_per_configuration": args.tiles,
            "models": {
                "resnet": f"bench/resnet_model.py width {args.width}",
                "demo": "examples/demo-model.pt (the demo model, a few conv layers)",
            },
            "serving": "TorchServe on the CPU, one torch thread a worker",
            "torchserve": "batchSize 4, maxBatchDelay 10 ms, handler sub_batch 8",
            "store": "PostgreSQL (local server), a fresh database",
            "queue": "moto_server SQS; pollers = tests/reliability/poller.py",
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "quick": args.quick,
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
