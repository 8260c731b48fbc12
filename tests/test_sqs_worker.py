"""The SQS worker Lambda, run here as Lambda runs it: events built from real ReceiveMessage
output of moto's SQS, the handler module imported from lambdas/, results in the machine's
PostgreSQL through the stack's secret, the model in process or behind the real TorchServe."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError
from conftest import LambdaContext, import_lambda
from mercantile import Tile
from sqs_events import lambda_event

from chipscale import names
from chipscale.cloud.queue_worker import (
    DEADLINE_MARGIN_S,
    OutOfTime,
    QueueWorker,
    WorkerConfigError,
    WorkerSettings,
    source_refusal,
)
from chipscale.errors import StoreError
from chipscale.grid.packs import pack_tiles
from chipscale.pipeline.messages import PackMessage
from chipscale.results import open_store
from chipscale.sources.footprint import cover

ZOOM = 19


# ----------------------------------------------------------------------------- settings


def test_settings_come_from_the_stack_environment() -> None:
    env = {
        names.ENV_MODEL_URL: "http://model.internal:8080/predictions/m",
        names.ENV_MAX_TILES_PER_MESSAGE: "64",
        names.ENV_ALLOWED_SOURCES: "s3://tiles/a/, s3://other/",
        names.ENV_DEFAULT_JOB: "j",
    }
    settings = WorkerSettings.from_environ(env)
    assert settings.max_tiles == 64
    assert settings.allowed_sources == ("s3://tiles/a/", "s3://other/")
    assert (settings.default_job, settings.default_source) == ("j", None)
    with pytest.raises(WorkerConfigError, match=names.ENV_MODEL_URL):
        WorkerSettings.from_environ({})
    with pytest.raises(WorkerConfigError, match="not a number"):
        WorkerSettings.from_environ({**env, names.ENV_MAX_TILES_PER_MESSAGE: "ten"})


@pytest.mark.parametrize(
    ("source", "allowed", "refused"),
    [
        ("s3://tiles/a/x.tif", ["s3://tiles/a/"], False),
        ("s3://tiles/b/x.tif", ["s3://tiles/a/"], True),
        ("s3://tiles-evil/x.tif", ["s3://tiles"], True),  # a bucket name is not a prefix
        ("s3://tiles/x.tif", ["s3://tiles"], False),
        ("s3://tiles/x.tif", [], True),
        ("https://example.com/x.tif", [], False),  # http(s) is open unless listed
        ("https://example.com/x.tif", ["https://imagery.example/"], True),
        ("/var/task/chipscale/names.py", ["s3://tiles/"], True),
        ("/vsicurl/http://x/y.tif", [], True),
    ],
)
def test_source_allow_list(source: str, allowed: list[str], refused: bool) -> None:
    assert (source_refusal(source, allowed) is not None) is refused


# ----------------------------------------------------------------------------- the handler


@pytest.fixture
def queue(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """A moto queue with its dead-letter queue, as the stack makes them."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    sqs = boto3.client("sqs")
    name = f"work-{socket.gethostname()}-{id(monkeypatch)}"
    dlq = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    url = sqs.create_queue(
        QueueName=name,
        Attributes={
            "VisibilityTimeout": "1",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "3"}),
        },
    )["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    yield SimpleNamespace(url=url, arn=arn, dlq=dlq, sqs=sqs)


def receive_all(queue: SimpleNamespace, visibility: int = 30) -> list[dict[str, Any]]:
    """Every visible message, ten at a time (SQS's ReceiveMessage limit), hidden for
    ``visibility`` seconds as the event source's receive hides them."""
    messages: list[dict[str, Any]] = []
    while True:
        got = queue.sqs.receive_message(
            QueueUrl=queue.url,
            MaxNumberOfMessages=10,
            AttributeNames=["All"],
            VisibilityTimeout=visibility,
        ).get("Messages", [])
        if not got:
            return messages
        messages.extend(got)


def run_batches(module: Any, queue: SimpleNamespace, messages: list[dict[str, Any]]) -> list[str]:
    """Hand messages to the handler ten a batch, delete what succeeded (as the event source
    does) and return the ids reported as failures. An invocation that raises (Powertools
    raises when every record failed) returns its whole batch to the queue, as Lambda does."""
    failed: list[str] = []
    for start in range(0, len(messages), 10):
        batch = messages[start : start + 10]
        try:
            response = module.handler(
                lambda_event(batch, queue.arn), LambdaContext("chipscale-worker")
            )
        except BatchProcessingError:
            ids = [m["MessageId"] for m in batch]
        else:
            ids = [item["itemIdentifier"] for item in response["batchItemFailures"]]
        failed.extend(ids)
        done = [m for m in batch if m["MessageId"] not in ids]
        if done:
            queue.sqs.delete_message_batch(
                QueueUrl=queue.url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)
                ],
            )
    return failed


@pytest.fixture
def lambda_env(
    stack_environment: dict[str, str], monkeypatch: pytest.MonkeyPatch, results_db: str, bucket: str
) -> SimpleNamespace:
    """The worker's environment as the stack sets it, pointing at moto and local services,
    with the aerial COG's bucket as the one allowed source."""
    monkeypatch.setenv(names.ENV_ALLOWED_SOURCES, f"s3://{bucket}/")
    monkeypatch.setenv(names.ENV_MAX_TILES_PER_MESSAGE, "100")
    return SimpleNamespace(db=results_db, bucket=bucket, source=f"s3://{bucket}/aerial.tif")


def load_handler(monkeypatch: pytest.MonkeyPatch, model_url: str) -> Any:
    """lambdas/sqs_worker.py as a new container imports it, serving ``model_url``."""
    monkeypatch.setenv(names.ENV_MODEL_URL, model_url)
    return import_lambda("sqs_worker", monkeypatch)


def send_packs(queue: SimpleNamespace, bodies: list[str]) -> None:
    for start in range(0, len(bodies), 10):
        entries = [
            {"Id": str(i), "MessageBody": body} for i, body in enumerate(bodies[start : start + 10])
        ]
        response = queue.sqs.send_message_batch(QueueUrl=queue.url, Entries=entries)
        assert not response.get("Failed")


def job_packs(job: str, source: str, tiles: list[Tile], max_tiles: int = 100) -> list[str]:
    return [PackMessage(job, source, pack).to_json() for pack in pack_tiles(tiles, max_tiles)]


def emf_totals(out: str) -> dict[str, float]:
    """Each metric's sum over the EMF documents the handler printed."""
    totals: dict[str, float] = {}
    for line in out.splitlines():
        if '"_aws"' not in line:
            continue
        doc = json.loads(line)
        for metric in doc["_aws"]["CloudWatchMetrics"][0]["Metrics"]:
            value = doc[metric["Name"]]
            total = sum(value) if isinstance(value, list) else value
            totals[metric["Name"]] = totals.get(metric["Name"], 0) + total
    return totals


def test_a_batch_with_poison_messages_does_the_rest_and_records_why(
    lambda_env: SimpleNamespace,
    queue: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    demo_model_file: Path,
    aerial: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    module = load_handler(monkeypatch, str(demo_model_file))
    tiles = list(cover(ZOOM, source=str(aerial)))
    good = job_packs("lambda-job", lambda_env.source, tiles)
    poison = {
        "not json": "{nope",
        "version": json.dumps({"v": 2, "job": "lambda-job", "source": lambda_env.source}),
        "zoom 40": json.dumps(
            {"v": 1, "job": "lambda-job", "source": "s3://x/y.tif", "tiles": [[0, 0, 40]]}
        ),
        "outside": PackMessage("lambda-job", "s3://someone-else/x.tif", (Tile(0, 0, 1),)).to_json(),
        # a job no store can keep: refused, and its reject stored without it
        "nul": json.dumps(
            {"v": 1, "job": "lambda\u0000job", "source": lambda_env.source, "tiles": [[0, 0, 1]]}
        ),
    }
    send_packs(queue, good + list(poison.values()))
    messages = receive_all(queue)
    assert len(messages) == len(good) + len(poison)

    failed = run_batches(module, queue, messages)
    assert failed == []
    assert receive_all(queue) == []

    with open_store(lambda_env.db) as store:
        rows = list(store.iter_results("lambda-job"))
        assert sorted((r.x, r.y, r.z) for r in rows) == sorted(tiles)  # each tile once
        assert {r.status for r in rows} <= {"ok", "empty"}
        assert sum(r.status == "ok" for r in rows) >= len(tiles) * 0.5
        rejects = store.rejects()
    reasons = sorted(r.reason for r in rejects)
    assert len(rejects) == len(poison), reasons
    assert any("not JSON" in r for r in reasons)
    assert any("version 2" in r for r in reasons)
    assert any("zoom" in r for r in reasons)
    assert any("outside the allowed sources" in r for r in reasons)
    assert any("control character" in r for r in reasons)

    totals = emf_totals(capsys.readouterr().out)
    assert totals[names.METRIC_TILES_OK] + totals[names.METRIC_TILES_EMPTY] == len(tiles)
    assert totals[names.METRIC_MESSAGES_REJECTED] == len(poison)
    module.worker().close()


def test_only_the_message_that_failed_transiently_comes_back(
    lambda_env: SimpleNamespace,
    queue: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    demo_model_file: Path,
    aerial: Path,
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed: the source is unreachable, not wrong
    module = load_handler(monkeypatch, str(demo_model_file))
    tiles = list(cover(ZOOM, source=str(aerial)))[:150]
    good = job_packs("t", lambda_env.source, tiles)
    flaky = PackMessage("t", f"http://127.0.0.1:{port}/a.tif", (Tile(1, 1, 2),)).to_json()
    send_packs(queue, [*good, flaky])
    messages = receive_all(queue)
    flaky_id = next(m["MessageId"] for m in messages if m["Body"] == flaky)

    assert run_batches(module, queue, messages) == [flaky_id]
    with open_store(lambda_env.db) as store:
        assert store.counts("t")["total"] == len(tiles)  # the neighbours are done
        assert store.rejects() == []  # a transient failure is not a rejection
    module.worker().close()


def test_duplicate_deliveries_store_each_tile_once(
    lambda_env: SimpleNamespace,
    queue: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    demo_model_file: Path,
    aerial: Path,
) -> None:
    module = load_handler(monkeypatch, str(demo_model_file))
    tiles = list(cover(ZOOM, source=str(aerial)))[:120]
    send_packs(queue, job_packs("d", lambda_env.source, tiles))
    messages = receive_all(queue)
    event = lambda_event(messages, queue.arn)
    for _ in range(3):  # at-least-once delivery: the same messages three times
        assert module.handler(event, LambdaContext("chipscale-worker"))["batchItemFailures"] == []
    with open_store(lambda_env.db) as store:
        rows = list(store.iter_results("d"))
    assert len(rows) == len(tiles)
    assert {r.attempts for r in rows} == {3}
    module.worker().close()


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every PostgresStore.write call, as the jobs of its rows; a write with a row of job
    ``refused`` fails as a permanent store error would (bad data in one pack), the others go
    through to PostgreSQL."""
    from chipscale.results.postgres import PostgresStore

    calls: list[list[str]] = []
    write = PostgresStore.write

    def watched(self: PostgresStore, results: Any) -> None:
        jobs = [r.job for r in results]
        calls.append(jobs)
        if "refused" in jobs:
            raise StoreError("PostgreSQL store failed while writing: refused by this test")
        write(self, results)

    monkeypatch.setattr(PostgresStore, "write", watched)
    return calls


def test_a_batch_is_stored_in_one_write(
    lambda_env: SimpleNamespace,
    queue: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    demo_model_file: Path,
    aerial: Path,
    writes: list[list[str]],
) -> None:
    """The rows of every message of a batch go to the database in one write: one round trip
    and one commit per invocation, not one per message."""
    module = load_handler(monkeypatch, str(demo_model_file))
    tiles = list(cover(ZOOM, source=str(aerial)))
    bodies = job_packs("one", lambda_env.source, tiles, max_tiles=4)
    send_packs(queue, bodies)
    messages = receive_all(queue)
    assert len(messages) > 10

    assert run_batches(module, queue, messages) == []
    batches = [messages[i : i + 10] for i in range(0, len(messages), 10)]
    sizes = [sum(len(json.loads(m["Body"])["tiles"]) for m in batch) for batch in batches]
    assert [len(jobs) for jobs in writes] == sizes  # one write per batch, all of its rows
    with open_store(lambda_env.db) as store:
        rows = list(store.iter_results("one"))
    assert sorted((r.x, r.y, r.z) for r in rows) == sorted(tiles)
    assert {r.attempts for r in rows} == {1}
    module.worker().close()


def test_a_pack_the_store_refuses_fails_alone(
    lambda_env: SimpleNamespace,
    queue: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    demo_model_file: Path,
    aerial: Path,
    writes: list[list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """When the batch's write fails for a reason that may be one pack's (not an outage),
    each pack is written alone: only the message whose rows cannot be stored comes back,
    and the metrics count only the tiles stored."""
    module = load_handler(monkeypatch, str(demo_model_file))
    tiles = list(cover(ZOOM, source=str(aerial)))
    good = job_packs("kept", lambda_env.source, tiles, max_tiles=16)
    bad = PackMessage("refused", lambda_env.source, tuple(tiles[:3])).to_json()
    send_packs(queue, [*good[:2], bad, *good[2:]])
    messages = receive_all(queue)
    assert 3 <= len(messages) <= 10  # one batch
    bad_id = next(m["MessageId"] for m in messages if m["Body"] == bad)

    assert run_batches(module, queue, messages) == [bad_id]
    assert len(writes) == 1 + len(messages)  # the batch's write, then each pack alone
    assert sorted(writes[0]) == sorted(j for jobs in writes[1:] for j in jobs)
    with open_store(lambda_env.db) as store:
        assert sorted((r.x, r.y, r.z) for r in store.iter_results("kept")) == sorted(tiles)
        assert store.counts("refused")["total"] == 0
        assert store.rejects() == []  # a failed write is retried, not rejected

    totals = emf_totals(capsys.readouterr().out)
    assert totals[names.METRIC_TILES_OK] + totals[names.METRIC_TILES_EMPTY] == len(tiles)
    module.worker().close()


def test_a_pack_is_not_started_without_time_to_finish(
    lambda_env: SimpleNamespace, demo_model_file: Path
) -> None:
    settings = WorkerSettings(str(demo_model_file), allowed_sources=(f"s3://{lambda_env.bucket}/",))
    opened: list[str] = []

    def never(url: str) -> Any:
        opened.append(url)
        raise AssertionError("the model must not be called")

    worker = QueueWorker(
        settings, open_predictor=never, open_store=lambda: open_store(lambda_env.db)
    )
    body = PackMessage("late", lambda_env.source, (Tile(0, 0, 1),)).to_json()
    with pytest.raises(OutOfTime):
        worker.predict("m-1", body, remaining_s=DEADLINE_MARGIN_S - 1)
    assert opened == []
    worker.close()


def test_end_to_end_push_worker_through_torchserve_then_download(
    lambda_env: SimpleNamespace,
    queue: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    torchserve: Any,
    aerial: Path,
    tmp_path: Path,
) -> None:
    """The cloud path as a user runs it: `chipscale push` covers the COG in S3 and fills the
    queue, Lambda-shaped batches from ReceiveMessage go through the handler and the real
    TorchServe into PostgreSQL, and `chipscale download` gets every tile once."""
    from click.testing import CliRunner

    from chipscale.cli import cli

    pushed = CliRunner().invoke(
        cli,
        [
            *("push", queue.url, "--source", lambda_env.source, "--zoom", str(ZOOM), "--json"),
            *("--max-tiles-per-message", "8"),  # several messages a batch, one write
        ],
        catch_exceptions=False,
    )
    assert pushed.exit_code == 0, pushed.output
    summary = json.loads(pushed.stdout)
    tiles = set(cover(ZOOM, source=str(aerial)))
    assert summary["tiles_sent"] == len(tiles)
    assert summary["requests"] <= max(1, 2 * len(tiles) // 1000)

    module = load_handler(monkeypatch, torchserve.predictions_url)
    messages = receive_all(queue)
    assert len(messages) == summary["messages_sent"] >= 8
    assert run_batches(module, queue, messages) == []
    job = summary["job"]
    with open_store(lambda_env.db) as store:
        rows = list(store.iter_results(job))
    assert sorted((r.x, r.y, r.z) for r in rows) == sorted(tiles)  # every tile exactly once
    ok = [r for r in rows if r.status == "ok"]
    assert len(ok) >= len(tiles) // 2
    assert {r.model_name for r in ok} == {module.worker().predictor.info.name}
    module.worker().close()

    out = tmp_path / "results.csv"
    downloaded = CliRunner().invoke(
        cli, ["download", "--db", lambda_env.db, "--job", job, "-o", str(out)]
    )
    assert downloaded.exit_code == 0, downloaded.output
    lines = out.read_text().splitlines()
    assert len(lines) == len(tiles) + 1


def test_a_database_restart_mid_run_loses_and_duplicates_nothing(
    lambda_env: SimpleNamespace,
    queue: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    demo_model_file: Path,
    aerial: Path,
    throwaway_pg: Any,
) -> None:
    """The database goes away between two batches (a failover, a restart): the batch that
    meets it reports every message as failed, SQS keeps them, and once the server is back
    the same container stores each tile once."""
    from chipscale.results import setup_store

    setup_store(throwaway_pg.url)
    secret = boto3.client("secretsmanager").create_secret(
        Name=f"chipscale-db-throwaway-{throwaway_pg.port}",
        SecretString=json.dumps(
            {"username": "postgres", "password": "pw", "host": "x", "port": throwaway_pg.port}
        ),
    )
    monkeypatch.setenv(names.ENV_DB_SECRET_ARN, secret["ARN"])
    monkeypatch.setenv(names.ENV_DB_NAME, "postgres")
    module = load_handler(monkeypatch, str(demo_model_file))
    tiles = list(cover(ZOOM, source=str(aerial)))
    send_packs(queue, job_packs("restart", lambda_env.source, tiles, max_tiles=4))
    messages = receive_all(queue, visibility=2)
    first, rest = messages[:1], messages[1:]
    assert len(rest) > 10  # more than one batch meets the outage
    assert run_batches(module, queue, first) == []  # the container's connection is open

    throwaway_pg.stop()
    failed = run_batches(module, queue, rest)
    assert sorted(failed) == sorted(m["MessageId"] for m in rest)  # all kept for redelivery
    throwaway_pg.start()

    time.sleep(2.5)  # past the visibility timeout: SQS delivers the failed ones again
    redelivered = receive_all(queue)
    assert sorted(m["MessageId"] for m in redelivered) == sorted(failed)
    assert run_batches(module, queue, redelivered) == []
    with open_store(throwaway_pg.url) as store:
        rows = list(store.iter_results("restart"))
    assert sorted((r.x, r.y, r.z) for r in rows) == sorted(tiles)
    assert {r.attempts for r in rows} == {1}  # nothing was half-written before the outage
    module.worker().close()
