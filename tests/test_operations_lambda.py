"""The operations Lambda's handler, run here against moto's Secrets Manager, the real
TorchServe fixture and the machine's PostgreSQL: what `chipscale verify --stack` invokes."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from conftest import LambdaContext

from chipscale import names
from chipscale.cloud.db_credentials import DatabaseSecretError, url_from_secret
from chipscale.ops.checks import CHECK_ENDPOINT, CHECK_SCHEMA

CONTEXT = LambdaContext("chipscale-operations")


@pytest.fixture(autouse=True)
def cpu_fleet(monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's CPU TorchServe stands in for a stack's GPU fleet here (placement:
    tests/test_placement.py)."""
    from chipscale.ops import private_checks

    monkeypatch.setattr(private_checks, "STACK_WORKERS_ON_GPU", False)


def test_url_from_secret_encodes_the_password_and_prefers_the_proxy_host() -> None:
    secret = {"username": "chip", "password": "p@ss/w:rd#1", "host": "db-instance", "port": 5432}
    url = url_from_secret(secret, host="proxy.internal", dbname="chipscale")
    assert (
        url == "postgresql://chip:p%40ss%2Fw%3Ard%231@proxy.internal:5432/chipscale?sslmode=require"
    )
    with pytest.raises(DatabaseSecretError, match="lacks password, dbname"):
        url_from_secret({"username": "chip", "host": "h"})


@pytest.fixture
def operations(operations_lambda: Any, monkeypatch: pytest.MonkeyPatch, torchserve: Any) -> Any:
    """The handler with the model endpoint of the stack pointing at the real TorchServe."""
    monkeypatch.setenv(names.ENV_MODEL_URL, torchserve.predictions_url)
    return operations_lambda


def test_verify_action_runs_the_private_checks_inside_the_vpc(operations: Any) -> None:
    results = operations.handler({"action": "verify"}, CONTEXT)
    by_name = {r["name"]: r for r in results}
    assert set(by_name) == {CHECK_ENDPOINT, CHECK_SCHEMA}
    assert all(r["ok"] for r in results), results
    assert "demo-landcover" in by_name[CHECK_ENDPOINT]["detail"]


def test_a_missing_schema_is_reported_not_raised(operations: Any, results_db: str) -> None:
    import psycopg

    with psycopg.connect(results_db, autocommit=True) as conn:
        conn.execute("DROP TABLE results")
    results = {r["name"]: r for r in operations.handler({"action": "verify"}, CONTEXT)}
    assert results[CHECK_ENDPOINT]["ok"]
    assert not results[CHECK_SCHEMA]["ok"]
    assert "missing table results" in results[CHECK_SCHEMA]["detail"]


def test_unknown_action_is_refused(operations: Any) -> None:
    with pytest.raises(ValueError, match="knows 'verify', 'db-setup'"):
        operations.handler({"action": "drop everything"}, CONTEXT)


def test_db_setup_is_idempotent_through_the_lambda(operations: Any, results_db: str) -> None:
    import psycopg

    with psycopg.connect(results_db, autocommit=True) as conn:
        conn.execute("DROP TABLE results, jobs, rejects, features, schema_version")
    first = operations.handler({"action": "db-setup"}, CONTEXT)["summary"]
    again = operations.handler({"action": "db-setup"}, CONTEXT)["summary"]
    assert first.startswith("created") and "up to date" in again
    assert "x y" not in first  # the password stays out of answers and logs


def test_status_export_and_resume_through_the_lambda(operations: Any, results_db: str) -> None:
    from mercantile import Tile

    from chipscale.results import open_store
    from chipscale.values import JobInfo, TileResult

    job = "roofs/2024 'north'; DROP TABLE results"  # stored and keyed verbatim
    with open_store(results_db) as store:  # the worker's model fields survive a re-push
        store.start_job(JobInfo(job=job, source="s3://b/a.tif", model_name="m", tiles_total=9))
    record = {"job": job, "source": "s3://b/a.tif", "zoom": 2, "tiles_total": 5}
    answer = operations.handler({"action": "record-job", **record, "extra": {"pushed": 5}}, CONTEXT)
    assert answer == {"job": job, "tiles_total": 5}
    with open_store(results_db) as store:
        info = store.get_job(job)
    assert info is not None and (info.model_name, info.zoom, info.extra["pushed"]) == ("m", 2, 5)
    with open_store(results_db) as store:
        store.write(
            [
                TileResult(job, Tile(0, 0, 2), "ok", {"a": 0.9, "b": 0.1}, model_name="m"),
                TileResult(job, Tile(1, 0, 2), "empty"),
                TileResult(job, Tile(2, 0, 2), "error", error="boom"),
            ]
        )
    (report,) = operations.handler({"action": "status", "job": job}, CONTEXT)["jobs"]
    assert (report["tiles"], report["ok"], report["empty"], report["error"]) == (5, 1, 1, 1)
    assert report["remaining"] == 3

    s3 = boto3.client("s3")
    answer = operations.handler({"action": "export", "job": job, "format": "csv"}, CONTEXT)
    assert answer["rows"] == 3 and answer["key"].startswith("exports/roofs_2024")
    body = s3.get_object(Bucket=answer["bucket"], Key=answer["key"])["Body"].read().decode()
    assert len(body.splitlines()) == 4 and answer["bytes"] == len(body.encode())

    done = operations.handler({"action": "done-tiles", "job": job}, CONTEXT)
    assert done["tiles"] == 2
    lines = s3.get_object(Bucket=done["bucket"], Key=done["key"])["Body"].read().decode()
    assert sorted(lines.split()) == ["0-0-2", "1-0-2"]

    with pytest.raises(Exception, match="is not in"):
        operations.handler({"action": "status", "job": "nope"}, CONTEXT)


def test_scrape_metrics_reads_private_hosts_only(operations_lambda: Any) -> None:
    with pytest.raises(ValueError, match="not a private address"):
        operations_lambda.handler(
            {"action": "scrape-metrics", "hosts": {"i-1": "8.8.8.8"}}, CONTEXT
        )


def test_job_action_answers_the_record_inline_or_through_the_bucket(
    operations_lambda: Any, results_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`job` answers the recorded job with its extra (a mosaic's frozen asset list), in the
    payload while small, else as an object under resume/ of the results bucket; it writes
    nothing to the database."""
    import json

    from chipscale.ops import operations_actions
    from chipscale.results import open_store
    from chipscale.sources.assets import Asset
    from chipscale.sources.mosaic_source import MosaicSource
    from chipscale.values import JobInfo

    assets = tuple(
        Asset(id=f"scene-{i}", href=f"s3://b/{i}.tif", footprint=(i, 0.0, i + 1.0, 1.0))
        for i in range(50)
    )
    frozen = MosaicSource("scenes.json", assets).frozen()
    info = JobInfo(job="scenes", source="scenes.json", zoom=12, tiles_total=7, extra=frozen)
    with open_store(results_db) as store:
        store.start_job(info)
    inline = operations_lambda.handler({"action": "job", "job": "scenes"}, CONTEXT)
    assert set(inline) == {"job"}
    assert inline["job"]["extra"] == frozen and inline["job"]["source"] == "scenes.json"
    assert inline["job"]["tiles_total"] == 7

    monkeypatch.setattr(operations_actions, "INLINE_ANSWER_BYTES", 1000)
    large = operations_lambda.handler({"action": "job", "job": "scenes"}, CONTEXT)
    assert large["key"].startswith("resume/scenes/") and large["bytes"] > 1000
    body = boto3.client("s3").get_object(Bucket=large["bucket"], Key=large["key"])["Body"]
    assert json.loads(body.read()) == json.loads(json.dumps(inline))  # as Lambda answers

    assert operations_lambda.handler({"action": "job", "job": "nope"}, CONTEXT) == {"job": None}
    with pytest.raises(ValueError, match="job needs a job name"):
        operations_lambda.handler({"action": "job"}, CONTEXT)
    with open_store(results_db) as store:
        assert [j.job for j in store.jobs()] == ["scenes"]


def test_a_stack_without_the_job_action_is_one_line(
    local_lambda: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stack deployed before the `job` action: push --stack of a mosaic says to deploy again
    (it cannot read the frozen list), in one line."""
    from chipscale.ops import operations_actions
    from chipscale.ops.operations_client import OperationError, StackOperations

    ops = StackOperations(boto3.session.Session(), "chipscale-operations")
    assert ops.get_job("nope") is None
    monkeypatch.delitem(operations_actions.ACTIONS, "job")
    with pytest.raises(OperationError, match="predates the 'job' action") as exc:
        ops.get_job("nope")
    assert "\n" not in str(exc.value)
