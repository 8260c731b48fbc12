"""Security properties, checked on the running system rather than by reading code.

- SQL is built with parameters only: hostile text in every text column (job, source, model,
  error, output keys, message ids, rejected bodies) is stored and read back verbatim, in
  both stores and through the worker, and every table is still there afterwards.
- No secret in logs or outputs: the worker runs with a distinctive database password in the
  stack-shaped secret, through a run and through a database outage; the password (as
  written, or URL-encoded) appears nowhere in the containers' stdout/stderr (Powertools
  JSON logs, EMF metrics, chipscale's own log lines), their journals (exception texts), the
  results or the rejects, and StoreUnavailable messages show the URL redacted.
- The worker cannot read a bucket outside its configuration: tests/test_stack.py already
  asserts the worker's S3 statements (found by logical ID), its actions and its allowed
  sources; the one added here finds *every* policy that reaches the worker's role by
  following the function's role reference (so a policy added under another name is caught),
  rules out managed policies and bucket policies that grant S3, and checks that the IAM
  grant and the runtime allow-list (CHIPSCALE_ALLOWED_SOURCES) name the same places.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from harness import (
    DB_PASSWORD,
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
from mercantile import Tile

from chipscale import names
from chipscale.errors import StoreError, StoreUnavailable
from chipscale.results import open_store
from chipscale.values import JobInfo, Rejection, TileResult

__all__ = ["aws", "imagery", "no_leaked_processes"]  # fixtures used by name

#: Quotes, a statement break and a comment: harmless only if it never becomes SQL text.
HOSTILE = "x'); DROP TABLE results; --"
HOSTILE_2 = "y\"; DELETE FROM jobs WHERE ''=''; /* */"
#: The tables both stores hold (PostgreSQL has schema_version too; SQLite a user_version).
TABLES = ("jobs", "rejects", "results")
PASSWORD_FORMS = (DB_PASSWORD, quote(DB_PASSWORD, safe=""), quote_plus(DB_PASSWORD))


def tables(url: str) -> set[str]:
    if url.startswith("sqlite:"):
        import sqlite3

        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    else:
        rows = query(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {name for (name,) in rows}


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.db'}"
    return str(request.getfixturevalue("results_db"))


def test_hostile_text_is_stored_verbatim_and_the_tables_survive(store_url: str) -> None:
    job = JobInfo(
        job=HOSTILE,
        source=f"s3://bucket/{HOSTILE}.tif",
        zoom=20,
        model_name=HOSTILE_2,
        model_version=HOSTILE,
        tiles_total=2,
        classes=(HOSTILE, HOSTILE_2),
        extra={HOSTILE: HOSTILE_2},
    )
    results = [
        TileResult(HOSTILE, Tile(1, 2, 3), "error", error=HOSTILE_2, model_name=HOSTILE),
        TileResult(HOSTILE, Tile(2, 2, 3), "ok", output={HOSTILE: 0.5, HOSTILE_2: 0.25}),
    ]
    rejection = Rejection(message_id=HOSTILE_2, reason=HOSTILE, body=HOSTILE_2, job=HOSTILE)
    with open_store(store_url) as store:
        store.start_job(job)
        store.write(results)
        store.write(results[:1])  # the upsert path too
        store.reject([rejection])

        assert store.get_job(HOSTILE) == job
        rows = list(store.iter_results(HOSTILE))
        assert [(r.job, r.x, r.status, r.error) for r in rows] == [
            (HOSTILE, 1, "error", HOSTILE_2),
            (HOSTILE, 2, "ok", None),
        ]
        assert rows[0].model_name == HOSTILE and rows[0].attempts == 2
        assert rows[1].output == {HOSTILE: 0.5, HOSTILE_2: 0.25}
        (errored,) = store.iter_results(HOSTILE, status="error")
        assert errored.error == HOSTILE_2
        assert store.counts(HOSTILE)["total"] == 2
        assert store.done_tiles(HOSTILE) == {Tile(2, 2, 3)}
        assert store.rejects(HOSTILE) == [rejection]
        assert [j.job for j in store.jobs()] == [HOSTILE]
    assert set(TABLES) <= tables(store_url)


def test_hostile_messages_through_the_worker_and_no_secret_in_any_output(
    aws: str, imagery: Any, torchserve: Any, results_db: str, naip: Path, tmp_path: Path
) -> None:
    """A push with a hostile job name, a tile whose x is SQL, an unreadable source under a
    hostile job: all stored verbatim. Then the same worker environment with the database
    out of reach, so StoreUnavailable texts are produced too; the password is in none."""
    tiles = tiles_of(naip, 100)
    hostile_tile = json.dumps(
        {"v": 1, "job": HOSTILE, "source": imagery.naip, "tiles": [[HOSTILE, 0, 20]]}
    )
    unreadable = json.dumps(
        {"v": 1, "job": HOSTILE_2, "source": imagery.key("notes.txt"), "tiles": [[1, 2, 3]]}
    )
    db = Database.of(results_db)
    queues = make_queues(aws, visibility=30, max_receive=3)
    env = worker_environment(
        moto=aws,
        model_url=torchserve.predictions_url,
        secret_arn=make_secret(aws, db),
        db=db,
        allowed_sources=[f"s3://{imagery.bucket}/"],
    )
    with Pollers(queues, env, tmp_path / "run", function_timeout=30) as pollers:
        run = Run(queues, results_db, pollers)
        summary = run.push(imagery.naip, tiles, job=HOSTILE)
        queues.send([hostile_tile, unreadable])
        run.expected[HOSTILE_2] = {Tile(1, 2, 3)}
        pollers.start(1)
        run.wait_drained(timeout=120)
    run.verify(errors_allowed=True)

    assert set(TABLES) <= tables(results_db)
    assert query(results_db, "SELECT count(*) FROM results WHERE job = %s", (HOSTILE,)) == [
        (len(tiles),)
    ]
    (job_row,) = query(results_db, "SELECT job, source FROM jobs WHERE job = %s", (HOSTILE,))
    assert job_row == (HOSTILE, imagery.naip)
    (reject,) = query(results_db, "SELECT job, body, reason FROM rejects")
    assert reject[0] == HOSTILE and reject[1] == hostile_tile and HOSTILE in reject[2]
    (error_row,) = query(
        results_db, "SELECT status, error FROM results WHERE job = %s", (HOSTILE_2,)
    )
    assert error_row[0] == "error" and "notes.txt" in error_row[1]

    # The same environment with the database gone: the worker's texts about it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    down = Database("127.0.0.1", closed, db.name)
    queues_down = make_queues(aws, visibility=30, max_receive=3)
    env_down = {
        **env,
        names.ENV_DB_SECRET_ARN: make_secret(aws, down),
        names.ENV_DB_HOST: down.host,
    }
    with Pollers(queues_down, env_down, tmp_path / "down", function_timeout=30) as down_pollers:
        queues_down.send(
            [
                json.dumps(
                    {
                        "v": 1,
                        "job": "j",
                        "source": imagery.naip,
                        "tiles": [[t.x, t.y, t.z] for t in tiles[:4]],
                    }
                )
            ]
        )
        started = time.time()
        down_pollers.start(1)
        failures = wait_for(
            "the worker to fail on the missing database",
            lambda: down_pollers.journal().failures_after(started),
            timeout=60,
        )
    unavailable = [reason for _, reason in failures if "StoreUnavailable" in reason]
    assert unavailable and all("postgres:***@" in reason for reason in unavailable), failures

    outputs = {
        "container logs (Powertools JSON, EMF, log lines)": pollers.logs() + down_pollers.logs(),
        "journals (exception texts)": json.dumps(
            pollers.journal().events + down_pollers.journal().events
        ),
        "push summary": json.dumps(summary),
        "results and rejects": json.dumps(
            query(results_db, "SELECT * FROM results", ())
            + query(results_db, "SELECT * FROM rejects", ())
            + query(results_db, "SELECT * FROM jobs", ()),
            default=str,
        ),
    }
    assert '"_aws"' in outputs["container logs (Powertools JSON, EMF, log lines)"]  # EMF seen
    for where, text in outputs.items():
        for form in PASSWORD_FORMS:
            assert form not in text, f"the database password appears in the {where}"
    report(
        "security",
        {
            "checked_outputs": sorted(outputs),
            "bytes_checked": sum(len(t) for t in outputs.values()),
            "store_unavailable_example": unavailable[0][:200],
        },
    )


def test_store_errors_never_carry_the_password() -> None:
    """StoreUnavailable and StoreError texts, for URLs that fail in different places."""
    encoded = quote(DB_PASSWORD, safe="")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    urls = [
        f"postgresql://postgres:{encoded}@127.0.0.1:{closed}/db?sslmode=disable",  # refused
        f"postgresql://postgres:{encoded}@127.0.0.1:not-a-port/db",  # unparsable
        f"postgresql://postgres:{encoded}@127.0.0.1:5432/postgres?sslmode=bogus",
        f"postgresql://postgres:{encoded}@127.0.0.1:5432/chipscale_no_such_db?sslmode=disable",
    ]
    for url in urls:
        with pytest.raises((StoreError, StoreUnavailable)) as error:
            open_store(url, create=False)
        text = f"{error.value} {error.value!r}"
        for form in PASSWORD_FORMS:
            assert form not in text, (url, text)


# ----------------------------------------------------------------------------- IAM


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The stack synthesized as tests/test_stack.py does it (its ``synth`` and sources)."""
    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_stack import SOURCES, synth

    raw, _ = synth(tmp_path_factory.mktemp("cdk.out"), sourceBuckets=SOURCES)
    return raw


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _arn(value: Any) -> str:
    """An S3 ARN as CDK writes it (``Fn::Join`` of ``arn:``, the partition and the rest) as
    plain text in the ``aws`` partition."""
    if isinstance(value, str):
        return value
    parts = value["Fn::Join"][1]
    return "".join("aws" if p == {"Ref": "AWS::Partition"} else p for p in parts)


def test_every_policy_reaching_the_worker_role_stays_inside_its_sources(
    template: dict[str, Any],
) -> None:
    resources = template["Resources"]
    (worker,) = [
        r["Properties"]
        for r in resources.values()
        if r["Type"] == "AWS::Lambda::Function"
        and r["Properties"].get("Handler") == "sqs_worker.handler"
    ]
    role = worker["Role"]["Fn::GetAtt"][0]
    role_props = resources[role]["Properties"]

    statements = [
        s for p in role_props.get("Policies", []) for s in p["PolicyDocument"]["Statement"]
    ]
    for resource in resources.values():
        if resource["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy") and {
            "Ref": role
        } in resource["Properties"].get("Roles", []):
            statements.extend(resource["Properties"]["PolicyDocument"]["Statement"])
    s3 = [s for s in statements if any(a.startswith("s3:") for a in _as_list(s["Action"]))]
    granted = {_arn(r) for s in s3 for r in _as_list(s["Resource"])}
    actions = {a for s in s3 for a in _as_list(s["Action"])}
    assert all(s["Effect"] == "Allow" for s in s3)
    assert actions == {"s3:GetObject", "s3:ListBucket"}

    # The runtime allow-list names exactly the places IAM grants: prefixes' objects, and
    # their buckets for listing.
    allowed = worker["Environment"]["Variables"][names.ENV_ALLOWED_SOURCES].split(",")
    expected = set()
    for prefix in allowed:
        path = prefix.removeprefix("s3://")
        expected |= {f"arn:aws:s3:::{path}*", f"arn:aws:s3:::{path.split('/', 1)[0]}"}
    assert granted == expected

    # Managed policies: only Lambda's logging and VPC networking, which grant no S3.
    managed = {_arn(a).rsplit("/", 1)[1] for a in role_props.get("ManagedPolicyArns", [])}
    assert managed <= {"AWSLambdaBasicExecutionRole", "AWSLambdaVPCAccessExecutionRole"}
    # No bucket policy lets the worker (or any AWS principal) read: the one grant to an
    # account is the load balancer's log delivery (PutObject into the access-log bucket).
    for resource in resources.values():
        if resource["Type"] == "AWS::S3::BucketPolicy":
            for statement in resource["Properties"]["PolicyDocument"]["Statement"]:
                principal = json.dumps(statement.get("Principal", {}))
                if statement["Effect"] == "Allow" and '"AWS"' in principal:
                    assert role not in principal, statement
                    assert set(_as_list(statement["Action"])) == {"s3:PutObject"}, statement
