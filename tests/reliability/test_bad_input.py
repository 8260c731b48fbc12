"""Bad input through the whole path: each bad message is dealt with on its first delivery,
its reason recorded, and never retried; the good messages of the same batches are done.

What the worker does with each kind (chipscale/cloud/queue_worker.py):

=============================  ===============================================================
message                        outcome
=============================  ===============================================================
not JSON                       rejected: ``rejects`` row, reason "message is not JSON"
schema version 2               rejected: "unsupported message version 2"
empty tile list                rejected: "tiles must be a non-empty list"
tile x = -1                    rejected: "outside the grid"
tile x = 2**z                  rejected: "outside the grid"
zoom 40                        rejected: "zoom must be within 0..30"
101 tiles (limit 100)          rejected: "more than max_tiles_per_message=100"
bucket not allowed             rejected: "outside the allowed sources"
a local path                   rejected: "not an s3:// or http(s):// URL"
text file in the bucket        ``error`` row per tile: "not recognized as a supported file format"
HTML page over http            ``error`` row per tile, the same reason
missing object                 ``error`` row per tile: "The specified key does not exist"
=============================  ===============================================================

A message that fails transiently every time (an unreachable source) is retried, then moved
to the dead-letter queue after ``maxReceiveCount`` deliveries: retried, but not forever.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path
from typing import Any

from harness import (
    MAX_TILES_PER_MESSAGE,
    Database,
    Pollers,
    Run,
    aws,
    imagery,
    make_queues,
    make_secret,
    no_leaked_processes,
    query,
    report,
    tiles_of,
    wait_for,
    worker_environment,
)

from chipscale.pipeline.messages import PackMessage

__all__ = ["aws", "imagery", "no_leaked_processes"]  # fixtures used by name

FUNCTION_TIMEOUT_S = 30
VISIBILITY_S = 30
GOOD_TILES = 400


def v1(job: str, source: str, tiles: list[list[int]]) -> str:
    return json.dumps({"v": 1, "job": job, "source": source, "tiles": tiles})


def test_bad_messages_are_recorded_once_and_the_rest_of_the_batch_is_done(
    aws: str, imagery: Any, torchserve: Any, results_db: str, naip: Path, tmp_path: Path
) -> None:
    good_tiles = tiles_of(naip, GOOD_TILES)
    sample = [[t.x, t.y, t.z] for t in good_tiles[:4]]
    z = good_tiles[0].z
    naip_src = imagery.naip
    rejected = {
        "not JSON": ("{nope", "message is not JSON"),
        "schema v2": (
            json.dumps({"v": 2, "job": "bad", "source": naip_src, "tiles": sample}),
            "unsupported message version 2",
        ),
        "empty tiles": (v1("bad", naip_src, []), "tiles must be a non-empty list"),
        "negative x": (v1("bad", naip_src, [[-1, 0, 5]]), "outside the grid"),
        "x = 2**z": (v1("bad", naip_src, [[2**z, 0, z]]), "outside the grid"),
        "zoom 40": (v1("bad", naip_src, [[0, 0, 40]]), "zoom must be within 0..30"),
        "too many tiles": (
            v1("bad", naip_src, [[t.x, t.y, t.z] for t in good_tiles[: MAX_TILES_PER_MESSAGE + 1]]),
            f"more than max_tiles_per_message={MAX_TILES_PER_MESSAGE}",
        ),
        "bucket not allowed": (
            v1("bad", f"s3://not-{imagery.bucket}/naip.tif", sample),
            "outside the allowed sources",
        ),
        "local path": (v1("bad", "/etc/passwd", sample), "is not an s3:// or http(s):// URL"),
    }
    errored = {
        "bad-text": (
            imagery.key("notes.txt"),
            "not recognized as being in a supported file format",
        ),
        "bad-html": (
            imagery.http("page.html"),
            "not recognized as being in a supported file format",
        ),
        "bad-missing": (imagery.key("nothere.tif"), "does not exist"),
    }
    error_bodies = {
        job: PackMessage(job, source, tuple(good_tiles[:4])).to_json()
        for job, (source, _) in errored.items()
    }
    bad_bodies = [body for body, _ in rejected.values()] + list(error_bodies.values())

    queues = make_queues(aws, visibility=VISIBILITY_S, max_receive=3)
    db = Database.of(results_db)
    env = worker_environment(
        moto=aws,
        model_url=torchserve.predictions_url,
        secret_arn=make_secret(aws, db),
        db=db,
        allowed_sources=[f"s3://{imagery.bucket}/"],
    )
    with Pollers(
        queues, env, tmp_path / "pollers", batch_size=10, function_timeout=FUNCTION_TIMEOUT_S
    ) as pollers:
        run = Run(queues, results_db, pollers)
        half = len(bad_bodies) // 2
        queues.send(bad_bodies[:half])  # bad and good interleaved: batches mix them
        run.push(naip_src, good_tiles, job="good")
        queues.send(bad_bodies[half:])
        for job in errored:
            run.expected[job] = set(good_tiles[:4])
        pollers.start(1)
        run.wait_drained(timeout=180)
    figures = run.verify(errors_allowed=True)
    journal = pollers.journal()

    # Every message was handled on its first delivery and deleted: none came back.
    counts = journal.receive_counts()
    assert all(c == [1] for c in counts.values()), {k: c for k, c in counts.items() if c != [1]}
    assert all(r["ok"] for _, r in journal.records())
    assert not journal.errors()
    bad_md5 = {hashlib.md5(body.encode()).hexdigest() for body in bad_bodies}
    bad_ids = {r["id"] for _, r in journal.records() if r["md5"] in bad_md5}
    assert len(bad_ids) == len(bad_bodies)
    mixed = [
        invocation
        for invocation in journal.invocations
        if {r["id"] for r in invocation["records"]} & bad_ids
        and {r["id"] for r in invocation["records"]} - bad_ids
    ]
    assert mixed  # a batch held bad and good messages, and every one of them succeeded

    rejects = {
        body: (reason, attempts)
        for body, reason, attempts in query(
            results_db, "SELECT body, reason, attempts FROM rejects", ()
        )
    }
    outcomes: dict[str, str] = {}
    for kind, (body, reason) in rejected.items():
        assert body in rejects, kind  # stored verbatim
        assert reason in rejects[body][0], (kind, rejects[body][0])
        assert rejects[body][1] == 1, kind  # one delivery
        outcomes[kind] = f"rejected: {rejects[body][0]}"
    assert len(rejects) == len(rejected)

    errors = query(
        results_db,
        "SELECT job, status, error, attempts FROM results WHERE job = ANY(%s)",
        (list(errored),),
    )
    for job, (source, reason) in errored.items():
        rows = [r for r in errors if r[0] == job]
        assert len(rows) == 4 and {r[1] for r in rows} == {"error"}, (job, rows)
        assert all(reason in r[2] and source in r[2] for r in rows), (job, rows[0][2])
        assert {r[3] for r in rows} == {1}
        outcomes[job] = f"error rows: {rows[0][2]}"
    good = query(
        results_db, "SELECT status, count(*) FROM results WHERE job = 'good' GROUP BY status", ()
    )
    assert sum(n for _, n in good) == GOOD_TILES and "error" not in dict(good)
    report("bad-input", {"outcomes": outcomes, **figures})


def test_a_message_that_always_fails_transiently_ends_in_the_dead_letter_queue(
    aws: str, imagery: Any, torchserve: Any, results_db: str, tmp_path: Path
) -> None:
    """An unreachable source (a closed port: SourceUnavailable, transient) fails on every
    delivery; after ``maxReceiveCount`` deliveries SQS moves it to the dead-letter queue
    instead of handing it out forever. Nothing is recorded for it: no error rows, no reject."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    body = v1("unreachable", f"http://127.0.0.1:{port}/cog.tif", [[0, 0, 1]])
    # The shortest settings a pack can start with: a 6 s function (the worker keeps 5 s).
    queues = make_queues(aws, visibility=6, max_receive=2)
    db = Database.of(results_db)
    env = worker_environment(
        moto=aws,
        model_url=torchserve.predictions_url,
        secret_arn=make_secret(aws, db),
        db=db,
        allowed_sources=[f"s3://{imagery.bucket}/"],
    )
    with Pollers(queues, env, tmp_path / "pollers", function_timeout=6) as pollers:
        queues.send([body])
        pollers.start(1)
        wait_for("the message in the dead-letter queue", queues.dlq_depth, timeout=120)
    journal = pollers.journal()
    assert [c for c in journal.receive_counts().values()] == [[1, 2]]
    assert all("SourceUnavailable" in e for e in journal.errors())
    assert queues.depth() == 0 and queues.dlq_bodies() == [body]
    assert query(results_db, "SELECT count(*) FROM results", ()) == [(0,)]
    assert query(results_db, "SELECT count(*) FROM rejects", ()) == [(0,)]
    report(
        "bad-input", {"outcomes": {"unreachable source": "dead-letter queue after 2 deliveries"}}
    )
