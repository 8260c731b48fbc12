"""`chipscale db-setup | status | download` against a results store reached directly (--db,
the machine's PostgreSQL) and through a stack (--stack: moto's CloudFormation for the
outputs, the operations Lambda's handler run in process, exports through moto's S3). Both
ways must give the same answers and the same files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import boto3
import psycopg
import pytest
from click.testing import CliRunner, Result
from mercantile import Tile
from test_stack_outputs import chipscale_template, clean_env, deploy_stack

from chipscale import names
from chipscale.cli import cli
from chipscale.cloud.job_record import push_record, record_job
from chipscale.ops.stack_outputs import resolve_stack
from chipscale.results import open_store
from chipscale.values import JobInfo, TileResult

JOB = "fields 'north'; --"


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def stack(local_lambda: list[dict]) -> str:
    return deploy_stack(chipscale_template())


@pytest.fixture
def filled(results_db: str) -> str:
    with open_store(results_db) as store:
        store.start_job(
            JobInfo(
                JOB,
                "s3://b/a.tif",
                zoom=3,
                model_name="m",
                model_version="1",
                classes=("a", "b"),
                tiles_total=6,
            )
        )
        store.write(
            [
                TileResult(
                    JOB, Tile(x, 1, 3), "ok", {"a": 0.1 * x, "b": 1 - 0.1 * x}, model_name="m"
                )
                for x in range(4)
            ]
            + [TileResult(JOB, Tile(5, 1, 3), "error", error="source timed out")]
        )
    return results_db


def test_db_setup_directly_and_through_the_stack(empty_db: str, stack: str) -> None:
    with psycopg.connect(empty_db, autocommit=True) as conn:  # the stack's fixture set it up
        conn.execute("DROP TABLE results, jobs, rejects, features, schema_version")
    first = run("db-setup", "--db", empty_db)
    assert first.exit_code == 0 and "created the results schema" in first.output
    assert "up to date" in run("db-setup", "--db", empty_db).output
    with psycopg.connect(empty_db, autocommit=True) as conn:
        tables = {
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
    assert {"jobs", "results", "rejects"} <= tables

    through = run("db-setup", "--stack", stack)  # the stack's database is results_db
    assert through.exit_code == 0, through.output
    assert "up to date" in through.output and "x y" not in through.output


def test_status_is_the_same_directly_and_through_the_stack(filled: str, stack: str) -> None:
    direct = run("status", "--db", filled, "--json")
    via = run("status", "--stack", stack, "--json")
    assert direct.exit_code == 0 and via.exit_code == 0, via.output
    assert json.loads(direct.stdout)["jobs"] == json.loads(via.stdout)["jobs"]
    (job,) = json.loads(direct.stdout)["jobs"]
    assert (job["job"], job["tiles"], job["ok"], job["error"], job["remaining"]) == (
        JOB,
        6,
        4,
        1,
        2,
    )
    table = run("status", "--stack", stack)
    assert f"jobs in stack {stack}" in table.output and "rejected" in table.output


def test_status_through_the_stack_shows_its_queues(filled: str, stack: str) -> None:
    outputs = resolve_stack(stack)
    sqs = boto3.client("sqs")
    for i in range(3):
        sqs.send_message(QueueUrl=outputs.queue_url, MessageBody=f"pack {i}")
    received = sqs.receive_message(QueueUrl=outputs.queue_url, VisibilityTimeout=600)
    assert len(received["Messages"]) == 1  # one in flight, two waiting
    for i in range(4):
        sqs.send_message(QueueUrl=outputs.dlq_url, MessageBody=f"dead {i}")

    result = run("status", "--stack", stack, "--json")

    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert [job["job"] for job in answer["jobs"]] == [JOB]
    assert answer["queue"] == {
        "url": outputs.queue_url,
        "visible": 2,
        "in_flight": 1,
        "delayed": 0,
        "dlq": {"url": outputs.dlq_url, "visible": 4, "in_flight": 0},
    }
    table = run("status", "--stack", stack)
    assert table.exit_code == 0, table.output
    queue_line, dlq_line = table.stdout.splitlines()[-2:]
    assert queue_line == f"queue {outputs.queue_url.rsplit('/', 1)[1]}: 2 waiting, 1 in flight"
    assert dlq_line.startswith(f"dead-letter queue {outputs.dlq_url.rsplit('/', 1)[1]}: 4 messages")
    assert f"chipscale redrive --stack {stack}" in dlq_line


def test_status_of_one_job_shows_pushed_beside_the_counts(filled: str, stack: str) -> None:
    with open_store(filled) as store:  # as `chipscale push --db` records it
        record_job(
            store,
            job=JOB,
            source="s3://b/a.tif",
            zoom=3,
            tiles_total=6,
            extra=push_record(None, queue="https://sqs/q") | {"pushed": 6},
        )
    for where in (["--db", filled], ["--stack", stack]):
        result = run("status", *where, "--job", JOB, "--json")
        assert result.exit_code == 0, result.output
        (job,) = json.loads(result.stdout)["jobs"]
        assert (job["pushed"], job["ok"], job["empty"], job["error"], job["remaining"]) == (
            6,
            4,
            0,
            1,
            2,
        )
        table = run("status", *where, "--job", JOB)
        lines = table.stdout.splitlines()
        header = next(line for line in lines if line.startswith("┃"))
        row = next(line for line in lines if line.startswith("│"))
        cells = dict(zip(_cells(header), _cells(row), strict=True))
        assert (cells["pushed"], cells["ok"], cells["error"], cells["remaining"]) == (
            "6",
            "4",
            "1",
            "2",
        )
    with open_store(filled) as store:  # a job no push recorded (a local run): pushed null
        store.start_job(JobInfo("local", "a.tif", zoom=3))
    pushed, local = json.loads(run("status", "--db", filled, "--json").stdout)["jobs"]
    assert (pushed["pushed"], local["pushed"]) == (6, None)


def _cells(line: str) -> list[str]:
    """The cells of one line of a rich table (header lines are drawn with ┃, rows with │)."""
    bar = line[0]
    return [cell.strip() for cell in line.strip().strip(bar).split(bar)]


def test_status_through_a_stack_whose_queue_is_gone_is_one_line(filled: str, stack: str) -> None:
    outputs = resolve_stack(stack)
    boto3.client("sqs").delete_queue(QueueUrl=outputs.dlq_url)
    result = run("status", "--stack", stack)
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: the dead-letter queue {outputs.dlq_url} does not exist: check the URL (or the "
        "stack's outputs) and the region\n"
    )


def test_status_through_a_missing_stack_is_one_line(local_lambda: list[dict]) -> None:
    result = run("status", "--stack", "no-such-stack")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: no CloudFormation stack 'no-such-stack' in us-east-1")
    assert result.stderr.count("\n") == 1


def test_status_through_a_stack_without_credentials_is_one_line(moto_server: str) -> None:
    env = clean_env(AWS_REGION="us-east-1", AWS_ENDPOINT_URL=moto_server)
    done = subprocess.run(
        [sys.executable, "-m", "chipscale.cli", "status", "--stack", "anything"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(
        "Error: no usable AWS credentials"
    )


@pytest.mark.parametrize("suffix", [".csv", ".geojson"])
def test_download_through_the_stack_equals_a_direct_download(
    filled: str, stack: str, tmp_path: Path, suffix: str
) -> None:
    direct, via = tmp_path / f"direct{suffix}", tmp_path / f"via{suffix}"
    assert run("download", "--db", filled, "--job", JOB, "-o", str(direct)).exit_code == 0
    result = run("download", "--stack", stack, "--job", JOB, "-o", str(via), "--min-score", "0.5")
    assert result.exit_code == 0, result.output
    assert "rows ->" in result.output and "s3://results-" in result.output
    assert run("download", "--stack", stack, "--job", JOB, "-o", str(via)).exit_code == 0
    assert via.read_bytes() == direct.read_bytes()


def test_a_missing_job_through_the_stack_is_one_line(filled: str, stack: str) -> None:
    result = run("status", "--stack", stack, "--job", "nope")
    assert result.exit_code == 1
    assert "job 'nope' is not in" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", ["db-setup", "status"])
def test_db_or_stack_exactly_one(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert "give --db URL" in run(command).output
    assert "not both" in run(command, "--db", "x.db", "--stack", "s").output


def test_a_stack_without_the_operations_function_names_the_output(
    local_lambda: list[dict],
) -> None:
    stack = deploy_stack(chipscale_template(omit=[names.OUTPUT_OPERATIONS_FUNCTION]))
    result = run("status", "--stack", stack)
    assert result.exit_code == 1 and names.OUTPUT_OPERATIONS_FUNCTION in result.output


def test_results_commands_are_in_the_help() -> None:
    help_text = run("--help").output
    assert all(c in help_text for c in ("db-setup", "download", "status", "push"))
