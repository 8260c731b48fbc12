"""Load: real imagery pushed with ``chipscale push``, read from S3, scored by the real
TorchServe and written to the real PostgreSQL by Lambda-shaped pollers; afterwards every
tile is in the results exactly once and both queues are empty.

``make test`` runs 10,000 tiles (zoom 20 of the NAIP COG, whole rows of its footprint);
``make soak`` runs 100,000 (zoom 21): ``CHIPSCALE_SOAK_TILES`` picks the number.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from harness import (
    Database,
    Pollers,
    Run,
    aws,
    imagery,
    inference_requests,
    make_queues,
    make_secret,
    no_leaked_processes,
    report,
    soak_pollers,
    soak_tiles,
    tiles_of,
    worker_environment,
)

from chipscale.models.torchserve_client import DEFAULT_TILES_PER_REQUEST

__all__ = ["aws", "imagery", "no_leaked_processes"]  # fixtures used by name

pytestmark = pytest.mark.soak

#: No fault here, so no redelivery is expected: a visibility timeout and a function timeout
#: (the Lambda context's countdown) with room for a batch on a busy 2-core machine.
VISIBILITY_S = 60
FUNCTION_TIMEOUT_S = 60


def test_every_tile_exactly_once_under_load(
    aws: str, imagery: Any, torchserve: Any, results_db: str, naip: Path, tmp_path: Path
) -> None:
    count = soak_tiles()
    tiles = tiles_of(naip, count)
    queues = make_queues(aws, visibility=VISIBILITY_S, max_receive=3)
    db = Database.of(results_db)
    env = worker_environment(
        moto=aws,
        model_url=torchserve.predictions_url,
        secret_arn=make_secret(aws, db),
        db=db,
        allowed_sources=[f"s3://{imagery.bucket}/"],
    )
    requests_before = inference_requests(torchserve.metrics_url)
    load_before = os.getloadavg()
    started = time.time()
    with Pollers(queues, env, tmp_path / "pollers", function_timeout=FUNCTION_TIMEOUT_S) as pollers:
        run = Run(queues, results_db, pollers)
        # The event source polls while the push fills the queue, as in the cloud.
        pollers.start(soak_pollers())
        summary = run.push(imagery.naip, tiles, job=f"soak-{count}")
        pushed = time.time()
        drained = run.wait_drained(timeout=max(480.0, count * 0.03))
    figures = run.verify()
    requests = inference_requests(torchserve.metrics_url) - requests_before
    journal = pollers.journal()

    assert figures["ok"] >= 0.8 * count  # real pixels, not empty tiles
    assert requests >= figures["ok"] / DEFAULT_TILES_PER_REQUEST  # through TorchServe
    report(
        "load",
        {
            **figures,
            "processed": figures["rows"],
            "zoom": tiles[0].z,
            "source": "NAIP COG in moto S3, read through /vsis3/",
            "pollers": soak_pollers(),
            "push_seconds": round(pushed - started, 1),
            "push_requests": summary["requests"],
            "wall_seconds": round(drained - started, 1),
            "tiles_per_second": round(count / (drained - started), 1),
            "torchserve_requests": requests,
            "invocations": len(journal.invocations),
            "max_receive_count": max(max(c) for c in journal.receive_counts().values()),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
    )
