"""``chipscale verify`` against moto, a real TorchServe and a real PostgreSQL.

What runs for real: the stack (moto's CloudFormation: SQS queue + DLQ, Auto Scaling group
from a launch template, SSM parameter, Lambda functions, SQS event source mapping), the
model endpoint (the session's TorchServe serving the demo model), the results database (a
PostgreSQL database each test creates and drops), and the operations Lambda's invoke (a
moto server of its own whose Lambda runs without Docker and answers what the test queues,
computed by the very function the Lambda calls, :func:`chipscale.ops.private_checks.verify_action`).

What is recorded: Service Quotas. moto implements it for the ``vpc`` service only:
GetServiceQuota answers NoSuchResourceException for ec2 and lambda, and
GetAWSDefaultServiceQuota is not implemented (HTTP 500), so the quota values come from
recorded responses played by a botocore Stubber on the one client verify makes for it.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from click.testing import CliRunner, Result
from conftest import RESULTS_DDL, free_port, running_moto
from test_stack_outputs import chipscale_template, deploy_stack

from chipscale import names
from chipscale.cli import cli
from chipscale.ops import aws_checks
from chipscale.ops import verify as verify_module
from chipscale.ops.aws import Fleet
from chipscale.ops.aws_checks import (
    Capacity,
    check_dead_letter_queue,
    check_gpu_quota,
    check_lambda_quota,
    read_quota,
)
from chipscale.ops.checks import (
    CHECK_DLQ,
    CHECK_ENDPOINT,
    CHECK_EVENT_SOURCE,
    CHECK_FLEET,
    CHECK_GPU_QUOTA,
    CHECK_LAMBDA_QUOTA,
    CHECK_QUEUE,
    CHECK_SCHEMA,
    CHECK_WORKER,
    Check,
    CheckResult,
    run_checks,
)
from chipscale.ops.private_checks import check_schema, verify_action
from chipscale.ops.stack_outputs import resolve_stack
from chipscale.ops.verify import stack_checks

ALL_CHECKS = [
    CHECK_QUEUE,
    CHECK_DLQ,
    CHECK_EVENT_SOURCE,
    CHECK_WORKER,
    CHECK_FLEET,
    CHECK_GPU_QUOTA,
    CHECK_LAMBDA_QUOTA,
    CHECK_ENDPOINT,
    CHECK_SCHEMA,
]
# ----------------------------------------------------------------------------- quotas


@pytest.fixture(autouse=True)
def cpu_fleet(monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's CPU TorchServe stands in for a stack's GPU fleet here (placement:
    tests/test_placement.py)."""
    from chipscale.ops import private_checks

    monkeypatch.setattr(private_checks, "STACK_WORKERS_ON_GPU", False)


def recorded_quota(service: str, code: str, name: str, value: float) -> dict[str, Any]:
    """A Service Quotas answer as AWS sends it (GetServiceQuota / GetAWSDefaultServiceQuota)."""
    return {
        "Quota": {
            "ServiceCode": service,
            "ServiceName": {"ec2": "Amazon Elastic Compute Cloud (Amazon EC2)"}.get(
                service, "AWS Lambda"
            ),
            "QuotaArn": f"arn:aws:servicequotas:us-east-1:123456789012:{service}/{code}",
            "QuotaCode": code,
            "QuotaName": name,
            "Value": value,
            "Unit": "None",
            "Adjustable": True,
            "GlobalQuota": False,
        }
    }


def stub_quota(stubber: Stubber, quota: tuple[str, str, str], value: float | None, default: float):
    """Queue one quota lookup: the applied ``value``, or (None) NoSuchResourceException then
    the AWS default, as an account without an applied quota answers."""
    service, code, _name = quota
    params = {"ServiceCode": service, "QuotaCode": code}
    if value is not None:
        stubber.add_response("get_service_quota", recorded_quota(*quota, value), params)
        return
    stubber.add_client_error(
        "get_service_quota",
        service_error_code="NoSuchResourceException",
        service_message="The request failed because the specified resource does not exist.",
        http_status_code=400,
        expected_params=params,
    )
    stubber.add_response("get_aws_default_service_quota", recorded_quota(*quota, default), params)


class Quotas:
    """What the stubbed Service Quotas answers; set ``gpu``/``lambda_`` before a run."""

    gpu: float | None = 16  # applied
    lambda_: float | None = None  # not applied: the default below
    gpu_default: float = 0
    lambda_default: float = 1000


@pytest.fixture
def quotas(monkeypatch: pytest.MonkeyPatch) -> Iterator[Quotas]:
    """Every Service Quotas client verify makes plays the recorded answers of ``Quotas``."""
    plan = Quotas()
    stubbers: list[Stubber] = []
    real = verify_module.quick_client

    def make_client(session: Any, service: str, **kwargs: Any) -> Any:
        client = real(session, service, **kwargs)
        if service == "service-quotas":
            stubber = Stubber(client)
            stub_quota(stubber, aws_checks.GPU_QUOTA, plan.gpu, plan.gpu_default)
            stub_quota(stubber, aws_checks.LAMBDA_QUOTA, plan.lambda_, plan.lambda_default)
            stubber.activate()
            stubbers.append(stubber)
        return client

    monkeypatch.setattr(verify_module, "quick_client", make_client)
    yield plan
    for stubber in stubbers:
        stubber.deactivate()


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def aws(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    return moto_server


@pytest.fixture
def stack(aws: str) -> str:
    """A healthy chipscale stack in moto (fleet at zero, so the mapping is disabled)."""
    return deploy_stack(chipscale_template())


def run_verify(*args: str) -> tuple[Result, list[dict[str, Any]]]:
    """``chipscale verify ARGS --json`` in-process; the exit and the parsed results."""
    result = CliRunner().invoke(cli, ["verify", *args, "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result, json.loads(result.stdout)


def failed(results: list[dict[str, Any]]) -> list[str]:
    return [r["name"] for r in results if not r["ok"]]


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/predictions/demo"


# ----------------------------------------------------------------------------- the CLI


def test_healthy_stack_passes_every_check(
    stack: str, torchserve: Any, results_db: str, quotas: Quotas
) -> None:
    result = CliRunner().invoke(
        cli,
        ["verify", "--stack", stack, "--endpoint", torchserve.predictions_url, "--db", results_db],
    )
    assert result.exit_code == 0, result.output
    table = result.stdout
    for name in ALL_CHECKS:
        assert name in table
    assert "FAIL" not in table
    # the endpoint really scored a tile of the model's shape, with its timing
    assert "3x256x256 tile scored in" in table

    result, results = run_verify(
        "--stack", stack, "--endpoint", torchserve.predictions_url, "--db", results_db
    )
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in results] == ALL_CHECKS
    assert failed(results) == []
    details = {r["name"]: r["detail"] for r in results}
    assert "need 8 vCPUs (2 x g5.xlarge, 4 each); quota 16 (applied)" in details[CHECK_GPU_QUOTA]
    # 4 per GPU x 1 GPU x 2 instances + headroom, against the default (none applied)
    assert details[CHECK_LAMBDA_QUOTA].startswith("need 18 (worker up to 8 + 10 headroom)")
    assert "AWS default" in details[CHECK_LAMBDA_QUOTA]
    assert details[CHECK_EVENT_SOURCE].startswith("Disabled, MaximumConcurrency 2, batch 4")
    assert (
        "schema public: tables jobs, results, rejects, features, schema_version present"
        in details[CHECK_SCHEMA]
    )


def test_missing_queue_fails_by_name(
    stack: str, torchserve: Any, results_db: str, quotas: Quotas
) -> None:
    outputs = resolve_stack(stack)
    boto3.client("sqs").delete_queue(QueueUrl=outputs.queue_url)
    result, results = run_verify(
        "--stack", stack, "--endpoint", torchserve.predictions_url, "--db", results_db
    )
    assert result.exit_code == 1
    assert failed(results) == [CHECK_QUEUE]
    assert result.stderr == f"Error: verify failed: {CHECK_QUEUE}\n"
    detail = next(r["detail"] for r in results if r["name"] == CHECK_QUEUE)
    assert outputs.queue_url in detail and "NonExistentQueue" in detail


def test_unhealthy_endpoint_fails_by_name(stack: str, results_db: str, quotas: Quotas) -> None:
    url = closed_port_url()
    result, results = run_verify("--stack", stack, "--endpoint", url, "--db", results_db)
    assert result.exit_code == 1
    assert failed(results) == [CHECK_ENDPOINT]
    assert result.stderr == f"Error: verify failed: {CHECK_ENDPOINT}\n"
    detail = next(r["detail"] for r in results if r["name"] == CHECK_ENDPOINT)
    assert url in detail


def test_missing_schema_fails_by_name(
    stack: str, torchserve: Any, empty_db: str, quotas: Quotas
) -> None:
    result, results = run_verify(
        "--stack", stack, "--endpoint", torchserve.predictions_url, "--db", empty_db
    )
    assert result.exit_code == 1
    assert failed(results) == [CHECK_SCHEMA]
    detail = next(r["detail"] for r in results if r["name"] == CHECK_SCHEMA)
    assert "missing tables jobs, results" in detail and "chipscale db-setup" in detail


def test_every_failure_is_named_in_the_table(stack: str, empty_db: str, quotas: Quotas) -> None:
    boto3.client("sqs").delete_queue(QueueUrl=resolve_stack(stack).queue_url)
    result = CliRunner().invoke(
        cli, ["verify", "--stack", stack, "--endpoint", closed_port_url(), "--db", empty_db]
    )
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: verify failed: {CHECK_QUEUE}, {CHECK_ENDPOINT}, {CHECK_SCHEMA}\n"
    )
    assert result.stdout.count("FAIL") == 3


def test_direct_checks_need_no_stack(torchserve: Any, results_db: str) -> None:
    result, results = run_verify("--endpoint", torchserve.predictions_url, "--db", results_db)
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in results] == [CHECK_ENDPOINT, CHECK_SCHEMA]


def test_verify_without_a_target_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["verify"])
    assert result.exit_code == 2
    assert "--stack" in result.stderr


# ----------------------------------------------------------------------------- single checks


def test_dead_letter_queue_with_messages_fails(stack: str) -> None:
    outputs = resolve_stack(stack)
    sqs = boto3.client("sqs")
    assert check_dead_letter_queue(sqs, outputs.dlq_url).ok
    sqs.send_message(QueueUrl=outputs.dlq_url, MessageBody="{}")
    (result,) = run_checks(
        [Check(CHECK_DLQ, lambda: check_dead_letter_queue(sqs, outputs.dlq_url))]
    )
    assert not result.ok and "holds 1 messages" in result.detail
    assert "chipscale redrive --stack" in result.detail
    assert "redrive" in cli.commands  # a command that exists


def test_queue_without_redrive_policy_fails(aws: str) -> None:
    sqs = boto3.client("sqs")
    queue = sqs.create_queue(QueueName=f"plain-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    dlq = sqs.create_queue(QueueName=f"dlq-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    (result,) = run_checks([Check(CHECK_QUEUE, lambda: aws_checks.check_queue(sqs, queue, dlq))])
    assert not result.ok and "no redrive policy" in result.detail


def test_mapping_enabled_without_gpus_fails(aws: str, quotas: Quotas) -> None:
    stack = deploy_stack(chipscale_template(mapping_enabled=True))
    session = boto3.session.Session()
    results = run_checks(stack_checks(resolve_stack(stack), session, endpoint_url="x", db_url="x"))
    mapping = next(r for r in results if r.name == CHECK_EVENT_SOURCE)
    assert not mapping.ok
    assert "with no GPU in service" in mapping.detail


def test_capacity_is_read_from_the_deployed_stack(aws: str) -> None:
    stack = deploy_stack(chipscale_template(max_instances=3, instance_type="g5.12xlarge"))
    outputs = resolve_stack(stack)
    fleet = aws_checks.read_deployed_fleet(
        boto3.client("autoscaling"), boto3.client("ec2"), outputs.asg_name or ""
    )
    assert (fleet.instance_type, fleet.max_size) == ("g5.12xlarge", 3)
    assert (fleet.vcpus_per_instance, fleet.gpus_per_instance) == (48, 4)
    capacity = aws_checks.read_capacity(
        fleet, lambda_client=boto3.client("lambda"), ssm=boto3.client("ssm"), outputs=outputs
    )
    assert capacity.gpu_vcpus == 144
    assert capacity.worker_concurrency == 4 * 4 * 3  # per GPU x GPUs x instances
    assert capacity.lambda_executions == 48 + aws_checks.LAMBDA_HEADROOM


def _capacity(max_size: int = 2, reserved: int | None = None) -> Capacity:
    fleet = Fleet(
        "asg", 0, max_size, 0, instance_type="g5.xlarge", vcpus_per_instance=4, gpus_per_instance=1
    )
    return Capacity(fleet, per_gpu_concurrency=4, max_concurrency=2, reserved_concurrency=reserved)


def _stubbed_quotas() -> tuple[Any, Stubber]:
    client = boto3.client(
        "service-quotas",
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )
    return client, Stubber(client)


def _quota_check(check: Callable[[Any, Capacity], CheckResult], client: Any, capacity: Capacity):
    name = CHECK_GPU_QUOTA if check is check_gpu_quota else CHECK_LAMBDA_QUOTA
    (result,) = run_checks([Check(name, lambda: check(client, capacity))])
    return result


def test_gpu_quota_too_small_fails_and_says_what_to_request() -> None:
    client, stubber = _stubbed_quotas()
    stub_quota(stubber, aws_checks.GPU_QUOTA, 4, 0)
    with stubber:
        result = _quota_check(check_gpu_quota, client, _capacity())
    assert not result.ok
    assert result.detail == (
        "need 8 vCPUs (2 x g5.xlarge, 4 each); quota 4 (applied): no GPU host can launch "
        "beyond it; request 'Running On-Demand G and VT instances' (ec2 L-DB2E81BA) of at "
        "least 8 vCPUs in Service Quotas"
    )
    stubber.assert_no_pending_responses()


def test_gpu_quota_falls_back_to_the_default_with_a_note() -> None:
    client, stubber = _stubbed_quotas()
    stub_quota(stubber, aws_checks.GPU_QUOTA, None, 0)  # new account: 0 G vCPUs
    with stubber:
        result = _quota_check(check_gpu_quota, client, _capacity())
    assert not result.ok
    assert "quota 0 (AWS default: no quota applied to this account)" in result.detail
    stubber.assert_no_pending_responses()


def test_lambda_quota_of_a_new_account_fails() -> None:
    client, stubber = _stubbed_quotas()
    stub_quota(stubber, aws_checks.LAMBDA_QUOTA, 10, 1000)
    with stubber:
        result = _quota_check(check_lambda_quota, client, _capacity())
    assert not result.ok
    assert result.detail.startswith("need 18 (worker up to 8 + 10 headroom); quota 10 (applied)")


def test_reserved_concurrency_needs_100_unreserved_beside_it() -> None:
    client, stubber = _stubbed_quotas()
    stub_quota(stubber, aws_checks.LAMBDA_QUOTA, 1000, 1000)
    with stubber:
        result = _quota_check(check_lambda_quota, client, _capacity(reserved=20))
    assert result.ok
    assert result.detail.startswith("need 120 (20 reserved + 100 unreserved)")


def test_moto_service_quotas_cannot_answer_for_ec2(aws: str) -> None:
    """Why the quota tests use recorded answers: moto has no ec2 quota and no default."""
    with pytest.raises(aws_checks.CheckFailed, match="none applied and no default"):
        read_quota(boto3.client("service-quotas"), "ec2", "L-DB2E81BA")


def test_wrong_results_primary_key_is_named(empty_db: str) -> None:
    import psycopg

    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE jobs (job text PRIMARY KEY)")
        conn.execute(
            "CREATE TABLE results (job text, z int, x int, y int, PRIMARY KEY (job, x, y, z))"
        )
    # The server trusts loopback: any password connects, and none may be shown.
    with_password = empty_db.replace("postgres@", "postgres:s3cretpw@", 1)
    assert with_password != empty_db
    (result,) = run_checks([Check(CHECK_SCHEMA, lambda: check_schema(with_password))])
    assert not result.ok
    assert "results primary key is (job, x, y, z), expected (job, z, x, y)" in result.detail
    assert "s3cretpw" not in result.detail  # credentials never shown


def test_schema_in_another_schema_is_found_through_search_path(empty_db: str) -> None:
    import psycopg

    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA chipscale")
        conn.execute("SET search_path TO chipscale")
        conn.execute(RESULTS_DDL)
    with pytest.raises(aws_checks.CheckFailed, match="schema public: missing tables"):
        check_schema(empty_db)
    assert check_schema(f"{empty_db}?options=-csearch_path%3Dchipscale").ok
    assert check_schema(empty_db, schema="chipscale").ok


def test_one_raising_check_never_stops_the_others() -> None:
    def boom() -> CheckResult:
        raise RuntimeError("exploded\nover two lines")

    results = run_checks(
        [
            Check("first", boom),
            Check("second", lambda: CheckResult("second", True, "fine")),
            Check("group", boom, covers=("a", "b")),
        ]
    )
    assert [(r.name, r.ok) for r in results] == [
        ("first", False),
        ("second", True),
        ("a", False),
        ("b", False),
    ]
    assert results[0].detail == "RuntimeError: exploded over two lines"


def test_verify_action_fails_unconfigured_checks_by_name() -> None:
    assert verify_action(None, None) == [
        {"name": CHECK_ENDPOINT, "ok": False, "detail": "no model endpoint URL configured"},
        {"name": CHECK_SCHEMA, "ok": False, "detail": "no database URL configured"},
    ]


# ----------------------------------------------------------------------------- inside the VPC


@pytest.fixture(scope="module")
def lambda_moto() -> Iterator[str]:
    """A moto server of its own whose Lambda runs without Docker (its invoke answers what the
    test queues): a config flip the session's shared moto server must not see."""
    with running_moto() as url:
        _post(f"{url}/moto-api/config", {"lambda": {"use_docker": False}})
        yield url


def _post(url: str, body: Any) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status in (200, 201)


def queue_lambda_answer(moto_url: str, answer: Any) -> None:
    """What the operations Lambda's next invoke returns (raw text)."""
    text = answer if isinstance(answer, str) else json.dumps(answer)
    _post(f"{moto_url}/moto-api/static/lambda-simple/response", {"results": [text]})


@pytest.fixture
def vpc_stack(
    lambda_moto: str, moto_server: str, monkeypatch: pytest.MonkeyPatch, quotas: Quotas
) -> str:
    """A healthy stack in the Docker-less moto (``moto_server`` for its dummy credentials)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", lambda_moto)
    return deploy_stack(chipscale_template())


def test_private_checks_run_through_the_operations_lambda(
    vpc_stack: str, lambda_moto: str, torchserve: Any, results_db: str
) -> None:
    # what the Lambda inside the VPC computes: the same checks, run where the services are
    answer = verify_action(torchserve.predictions_url, results_db)
    assert [(a["name"], a["ok"]) for a in answer] == [(CHECK_ENDPOINT, True), (CHECK_SCHEMA, True)]
    # The Lambda answers in another order, with a failed result the CLI did not ask for: the
    # CLI keeps the two it asked for, in its own order, and the stray one fails nothing.
    stray = {"name": "stray", "ok": False, "detail": "not asked for"}
    queue_lambda_answer(lambda_moto, [answer[1], stray, answer[0]])
    result, results = run_verify("--stack", vpc_stack)
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in results] == ALL_CHECKS
    assert results[-2:] == answer


def test_operations_lambda_failures_fail_both_private_checks_by_name(
    vpc_stack: str, lambda_moto: str
) -> None:
    queue_lambda_answer(lambda_moto, {"errorMessage": "boom"})  # not a list of results
    result, results = run_verify("--stack", vpc_stack)
    assert result.exit_code == 1
    assert failed(results) == [CHECK_ENDPOINT, CHECK_SCHEMA]
    operations = resolve_stack(vpc_stack).operations_function
    assert all(f"operations Lambda {operations} answered" in r["detail"] for r in results[-2:])
    assert result.stderr == f"Error: verify failed: {CHECK_ENDPOINT}, {CHECK_SCHEMA}\n"


def test_lambda_reporting_only_one_check_fails_the_other(
    vpc_stack: str, lambda_moto: str, torchserve: Any
) -> None:
    queue_lambda_answer(lambda_moto, verify_action(torchserve.predictions_url, None)[:1])
    _, results = run_verify("--stack", vpc_stack)
    assert failed(results) == [CHECK_SCHEMA]
    assert results[-1]["detail"].startswith("not reported by operations Lambda")


def test_a_direct_check_replaces_its_lambda_twin(
    vpc_stack: str, lambda_moto: str, torchserve: Any, empty_db: str
) -> None:
    # the Lambda says the schema is fine; --db points at an empty database: --db wins,
    # and only the endpoint is asked of the Lambda
    queue_lambda_answer(lambda_moto, verify_action(torchserve.predictions_url, None))
    _, results = run_verify("--stack", vpc_stack, "--db", empty_db)
    assert [r["name"] for r in results][-2:] == [CHECK_SCHEMA, CHECK_ENDPOINT]
    assert failed(results) == [CHECK_SCHEMA]


def test_stack_without_operations_function_names_the_output(
    lambda_moto: str, moto_server: str, monkeypatch: pytest.MonkeyPatch, quotas: Quotas
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", lambda_moto)
    stack = deploy_stack(chipscale_template(omit=[names.OUTPUT_OPERATIONS_FUNCTION]))
    _, results = run_verify("--stack", stack)
    assert failed(results) == [CHECK_ENDPOINT, CHECK_SCHEMA]
    assert names.OUTPUT_OPERATIONS_FUNCTION in results[-1]["detail"]


def test_schema_check_refuses_a_non_postgresql_url() -> None:
    (result,) = run_checks([Check(CHECK_SCHEMA, lambda: check_schema("sqlite:///results.db"))])
    assert not result.ok
    assert result.detail == "the schema check needs a postgresql:// URL, got sqlite:///results.db"


def test_worker_timeout_too_long_for_the_queue_visibility_fails(aws: str) -> None:
    stack = deploy_stack(chipscale_template(worker_timeout=300))  # 6 x 300 > 721 s
    outputs = resolve_stack(stack)
    worker = outputs.worker_function or ""
    (result,) = run_checks(
        [
            Check(
                CHECK_WORKER,
                lambda: aws_checks.check_worker(
                    boto3.client("lambda"), boto3.client("sqs"), worker, outputs.queue_url
                ),
            )
        ]
    )
    assert not result.ok
    assert result.detail.startswith(f"{worker}: python3.12, 128 MB, timeout 300 s; queue ")
    assert "visibility 721 s, under 6x the timeout" in result.detail


def test_stack_without_fleet_output_names_it_where_it_is_needed(aws: str, quotas: Quotas) -> None:
    stack = deploy_stack(chipscale_template(omit=[names.OUTPUT_ASG_NAME]))
    session = boto3.session.Session()
    results = run_checks(stack_checks(resolve_stack(stack), session, endpoint_url="x", db_url="x"))
    by_name = {r.name: r for r in results}
    assert by_name[CHECK_EVENT_SOURCE].ok  # no fleet to cross-check: the mapping alone
    for name in (CHECK_FLEET, CHECK_GPU_QUOTA, CHECK_LAMBDA_QUOTA):
        assert not by_name[name].ok
        assert names.OUTPUT_ASG_NAME in by_name[name].detail
    assert by_name[CHECK_GPU_QUOTA].detail.startswith("cannot size the need: stack ")
