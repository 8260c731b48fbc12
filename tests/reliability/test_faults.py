"""Faults in the middle of a run, each a real process killed or stopped by its PID: after
recovery every tile is in the results exactly once, no tile is missing, no ``error`` row
comes from a transient fault (it was retried, not recorded), and the queue and the
dead-letter queue are empty. Recovery times are reported (harness.fault_figures), never
asserted.

Settings, and why. The pollers run as Lambda would with a 10 s function timeout (the
context counts down, so no pack starts without the worker's 5 s margin) and the queue's
visibility timeout equals it, the least AWS accepts for an event source: a failed message is
back within 10 s. ``maxReceiveCount`` is 5: in the cloud 3 receives of a 721 s visibility
timeout outlast a 36-minute outage; here 5 receives of 10 s outlast the longest outage these
tests cause (TorchServe killed and restarted: about 5 s here, a few times that on a machine
busy with other work). A fault is held
until a poller has reported a failure it caused (so the test proves the failure path ran, and
cannot pass on a lucky gap), then healed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from cogs import make_mosaic_cog
from conftest import start_torchserve
from harness import (
    Database,
    Forwarder,
    Pollers,
    Run,
    aws,
    fault_figures,
    imagery,
    kill_torchserve,
    make_queues,
    make_secret,
    no_leaked_processes,
    postmaster_pid,
    query,
    report,
    tiles_of,
    wait_for,
    wait_gone,
    worker_environment,
)
from poller import HOLD_ENV

from chipscale.results import setup_store

__all__ = ["aws", "imagery", "no_leaked_processes"]  # fixtures used by name

FUNCTION_TIMEOUT_S = 10
VISIBILITY_S = 10
MAX_RECEIVE = 5
#: Tiles of each fault's run: enough that the fault lands mid-run with work left after it.
RUN_TILES = 2000
#: Safety limits (a hang fails the test; nothing is asserted on times).
PROGRESS_TIMEOUT_S = 180.0
DRAIN_TIMEOUT_S = 300.0


def pollers_for(
    moto: str, imagery: Any, tmp_path: Path, *, model_url: str, db: Database, **env: Any
) -> Pollers:
    queues = make_queues(moto, visibility=VISIBILITY_S, max_receive=MAX_RECEIVE)
    environment = worker_environment(
        moto=moto,
        model_url=model_url,
        secret_arn=make_secret(moto, db),
        db=db,
        allowed_sources=[f"s3://{imagery.bucket}/"],
        **env,
    )
    return Pollers(queues, environment, tmp_path / "pollers", function_timeout=FUNCTION_TIMEOUT_S)


def test_torchserve_killed_and_restarted_on_the_same_ports(
    aws: str, imagery: Any, demo_mar: Path, results_db: str, naip: Path, tmp_path: Path
) -> None:
    """The model server's JVM and workers die (SIGKILL): packs in flight fail over to the
    queue, and once TorchServe is back on the same ports the work completes."""
    server = start_torchserve(demo_mar, tmp_path / "torchserve")
    try:
        with pollers_for(
            aws, imagery, tmp_path, model_url=server.predictions_url, db=Database.of(results_db)
        ) as pollers:
            run = Run(pollers.queues, results_db, pollers)
            pollers.start(2)
            run.push(imagery.naip, tiles_of(naip, RUN_TILES), job="fault-torchserve")
            run.wait_progress(0.3, PROGRESS_TIMEOUT_S)
            injected = time.time()
            killed = kill_torchserve(server)
            run.wait_failure(injected, PROGRESS_TIMEOUT_S)
            server.start()  # same ports: the object keeps them
            healed = time.time()
            drained = run.wait_drained(DRAIN_TIMEOUT_S)
        figures = run.verify()
    finally:
        server.stop()
    journal = pollers.journal()
    assert any("PredictorUnavailable" in e for e in journal.errors())
    report(
        "fault",
        fault_figures(
            "torchserve-killed",
            journal,
            injected=injected,
            healed=healed,
            drained=drained,
            pids_killed=killed,
            **figures,
        ),
    )


def test_postgres_connections_terminated_then_server_restarted(
    aws: str, imagery: Any, torchserve: Any, throwaway_pg: Any, naip: Path, tmp_path: Path
) -> None:
    """First every client connection is ended (pg_terminate_backend, as a failover or RDS
    Proxy's idle timeout does); later the server itself goes down hard (SIGQUIT to the
    postmaster: immediate shutdown, crash recovery on restart) and comes back."""
    setup_store(throwaway_pg.url)
    db = Database("127.0.0.1", throwaway_pg.port, "postgres")
    with pollers_for(
        aws, imagery, tmp_path, model_url=torchserve.predictions_url, db=db
    ) as pollers:
        run = Run(pollers.queues, throwaway_pg.url, pollers)
        pollers.start(2)
        run.push(imagery.naip, tiles_of(naip, RUN_TILES), job="fault-postgres")

        run.wait_progress(0.25, PROGRESS_TIMEOUT_S)
        terminated_at = time.time()
        terminated = throwaway_pg.terminate_backends()
        run.wait_progress(0.5, PROGRESS_TIMEOUT_S)

        crashed_at = time.time()
        pid = postmaster_pid(throwaway_pg.data)
        os.kill(pid, signal.SIGQUIT)
        wait_gone(pid)
        run.wait_failure(crashed_at, PROGRESS_TIMEOUT_S)
        throwaway_pg.start()
        healed = time.time()
        drained = run.wait_drained(DRAIN_TIMEOUT_S)
    figures = run.verify()
    journal = pollers.journal()
    assert terminated >= 1  # the pollers' connections were there to end
    assert any("StoreUnavailable" in e for e in journal.errors())
    report(
        "fault",
        fault_figures(
            "postgres-connections-terminated",
            journal,
            injected=terminated_at,
            healed=None,
            drained=drained,
            until=crashed_at,
            backends_terminated=terminated,
            **figures,
        ),
    )
    report(
        "fault",
        fault_figures(
            "postgres-server-crashed-and-restarted",
            journal,
            injected=crashed_at,
            healed=healed,
            drained=drained,
            pid_killed=pid,
            **figures,
        ),
    )


def test_worker_killed_between_writing_results_and_deleting_its_messages(
    aws: str, imagery: Any, torchserve: Any, results_db: str, naip: Path, tmp_path: Path
) -> None:
    """A container dies after its pack's rows are written and before the event source
    deletes the messages: SQS delivers them again after the visibility timeout, and the
    second delivery rewrites the same rows (attempts 2), never a second row."""
    held_file = tmp_path / "held.json"
    with pollers_for(
        aws, imagery, tmp_path, model_url=torchserve.predictions_url, db=Database.of(results_db)
    ) as pollers:
        run = Run(pollers.queues, results_db, pollers)
        run.push(imagery.naip, tiles_of(naip, RUN_TILES // 2), job="fault-worker")
        (doomed,) = pollers.start(1, extra_env={HOLD_ENV: str(held_file)})
        wait_for("the worker to hold its written batch", held_file.exists, timeout=120)
        held = json.loads(held_file.read_text())["messages"]
        injected = time.time()
        doomed.kill()
        pollers.start(1)  # a new container takes the queue over
        drained = run.wait_drained(DRAIN_TIMEOUT_S)
    figures = run.verify()
    journal = pollers.journal()

    counts = journal.receive_counts()
    assert held and all(max(counts[m]) >= 2 for m in held)  # SQS redelivered each one
    held_tiles = {(t[2], t[0], t[1]) for body in held.values() for t in json.loads(body)["tiles"]}
    rows = {(z, x, y): attempts for z, x, y, attempts in _attempts(results_db, "fault-worker")}
    assert all(rows[key] >= 2 for key in held_tiles)  # written twice, stored once
    redone = journal.first_success(ended_after=injected, ids=set(held))
    report(
        "fault",
        {
            **fault_figures(
                "worker-killed-before-delete",
                journal,
                injected=injected,
                healed=None,
                drained=drained,
                pid_killed=doomed.pid,
                **figures,
            ),
            "held_messages": len(held),
            "held_tiles": len(held_tiles),
            "redelivered_done_s": None if redone is None else round(redone - injected, 2),
        },
    )


def _attempts(db_url: str, job: str) -> list[tuple[Any, ...]]:
    return query(db_url, "SELECT z, x, y, attempts FROM results WHERE job = %s", (job,))


def test_cog_unreachable_then_back(
    aws: str, imagery: Any, torchserve: Any, results_db: str, naip: Path, tmp_path: Path
) -> None:
    """S3 goes away under the workers (the forwarder they reach it through is killed), then
    comes back on the same address: reads that failed are retried, not recorded as errors.

    Four jobs over four copies of the COG, so that sources the workers have not opened yet
    remain when the fault starts (an open reader may serve a pack from GDAL's cache)."""
    forwarder = Forwarder(aws, tmp_path)
    forwarder.start()
    try:
        sources = imagery.copies(4)
        with pollers_for(
            aws,
            imagery,
            tmp_path,
            model_url=torchserve.predictions_url,
            db=Database.of(results_db),
            s3_endpoint=forwarder.url,
        ) as pollers:
            run = Run(pollers.queues, results_db, pollers)
            per_job = RUN_TILES // len(sources)
            for i, source in enumerate(sources):
                tiles = tiles_of(naip, per_job, skip=i * per_job)
                run.push(source, tiles, job=f"fault-cog-{i}")
            pollers.start(2)
            run.wait_progress(0.2, PROGRESS_TIMEOUT_S)
            injected = time.time()
            pid = forwarder.kill()
            run.wait_failure(injected, PROGRESS_TIMEOUT_S)
            forwarder.start()
            healed = time.time()
            drained = run.wait_drained(DRAIN_TIMEOUT_S)
        figures = run.verify()
    finally:
        forwarder.stop()
    journal = pollers.journal()
    assert any("SourceUnavailable" in e for e in journal.errors())
    report(
        "fault",
        fault_figures(
            "cog-unreachable",
            journal,
            injected=injected,
            healed=healed,
            drained=drained,
            pid_killed=pid,
            **figures,
        ),
    )


@pytest.fixture(scope="module")
def mosaic(aerial: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4096 x 4096 px JPEG COG (512 px blocks) of the real aerial image tiled 4 x 4, about
    5 MB: too large for GDAL to hold whole after a few reads, so a pack at zoom 20 (one
    block) reads bytes no earlier pack fetched."""
    return make_mosaic_cog(aerial, tmp_path_factory.mktemp("mosaic") / "mosaic.tif")


def test_cog_unreachable_while_an_open_source_is_being_read(
    aws: str, imagery: Any, torchserve: Any, results_db: str, mosaic: Path, tmp_path: Path
) -> None:
    """S3 goes away while the workers hold the COG open and read new blocks from it: those
    reads must be retried (SourceUnavailable), not stored as ``error`` rows."""
    source = imagery.upload(mosaic, f"mosaic-{time.monotonic_ns()}.tif")
    forwarder = Forwarder(aws, tmp_path)
    forwarder.start()
    try:
        with pollers_for(
            aws,
            imagery,
            tmp_path,
            model_url=torchserve.predictions_url,
            db=Database.of(results_db),
            s3_endpoint=forwarder.url,
        ) as pollers:
            run = Run(pollers.queues, results_db, pollers)
            run.push(source, tiles_of(mosaic, RUN_TILES), job="fault-cog-open")
            pollers.start(2)
            run.wait_progress(0.25, PROGRESS_TIMEOUT_S)
            injected = time.time()
            pid = forwarder.kill()
            wait_for(
                "a failure (or an error row) caused by the fault",
                lambda: run.pollers.journal().failures_after(injected) or _error_rows(run),
                timeout=PROGRESS_TIMEOUT_S,
                diagnose=run.state,
            )
            forwarder.start()
            healed = time.time()
            drained = run.wait_drained(DRAIN_TIMEOUT_S)
        # Reported before the checks, so that the figures show the bug while it lasts.
        report(
            "fault",
            fault_figures(
                "cog-unreachable-mid-read",
                pollers.journal(),
                injected=injected,
                healed=healed,
                drained=drained,
                pid_killed=pid,
                tiles_pushed=run.total,
                error=_error_rows(run),
            ),
        )
        run.verify()
    finally:
        forwarder.stop()


def _error_rows(run: Run) -> int:
    rows = query(
        run.db_url,
        "SELECT count(*) FROM results WHERE status = 'error' AND job = ANY(%s)",
        (list(run.expected),),
    )
    return int(rows[0][0])
