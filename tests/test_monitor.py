"""``chipscale monitor``: the snapshot read from AWS, the regimes, the views.

Against a real moto server: a chipscale-shaped CloudFormation stack (queue, dead-letter queue,
GPU Auto Scaling group, worker Lambda and its event source mapping, per-GPU parameter; see
test_stack_outputs), its instances scaled up, and one regime's metrics put into moto's
CloudWatch under the names chipscale.names defines: the CloudWatch agent's GPU series (one per
instance and GPU index), the worker's EMF metrics, AWS/Lambda and AWS/SQS. Then ``chipscale
monitor --stack NAME --json`` runs as a subprocess, as an operator runs it.

What moto lacks, and how it is covered:

* percentiles: GetMetricData with ``p50``/``p95`` answers HTTP 500 in moto 5.2. The monitor
  asks them in a call of their own and goes on without them (a warning); the request and the
  parsing are pinned with a CloudWatch response recorded in AWS's shape, through botocore's
  Stubber, for the regime that needs them (slightly above);
* moto's GetMetricData ignores the namespace when a query has dimensions: every series here
  has dimensions no other namespace uses (checked by the regimes coming out right);
* moto publishes no AWS/SQS or AWS/Lambda metrics of its own: the tests put them, as AWS
  would have.

Every threshold of chipscale.ops.diagnosis is flipped by data just below and just at it, on
snapshots built by hand; one flip also runs end to end through moto.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import urllib3
from botocore.stub import Stubber
from click.testing import CliRunner
from conftest import ROOT
from test_stack_outputs import chipscale_template, clean_env, deploy_stack

from chipscale import names
from chipscale.cli import cli
from chipscale.ops import diagnosis
from chipscale.ops.aws import Fleet, Instance
from chipscale.ops.cloudwatch import percentile_queries
from chipscale.ops.diagnosis import Regime, diagnose
from chipscale.ops.monitor import Clients, collect, with_torchserve
from chipscale.ops.monitor_plot import plot_period
from chipscale.ops.prometheus import (
    PrometheusError,
    parse,
    scrape,
    scrape_action,
    scrape_via_lambda,
    summarize,
)
from chipscale.ops.snapshot import Gpu, Minute, Queue, Snapshot, Window, WorkerStatus
from chipscale.ops.stack_outputs import StackOutputs, resolve_stack

#: Minutes of data put before now: inside the 15-minute window even when the command starts
#: in the minute after the data was put.
MINUTES = 12


# ----------------------------------------------------------------------------- moto helpers


@dataclass
class Deployed:
    """A chipscale-shaped stack in moto with its GPU instances up."""

    name: str
    outputs: StackOutputs
    instances: list[str]
    gpus_per_instance: int


@pytest.fixture
def aws(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    return moto_server


def deploy(
    *,
    instances: int = 2,
    instance_type: str = "g5.xlarge",
    gpus_per_instance: int = 1,
    per_gpu: int = 4,
    timeout: int = 60,
    reserved: int | None = None,
) -> Deployed:
    """Deploy the stack, scale its group to ``instances`` (moto puts them InService and
    Healthy at once), and set the mapping as the fleet controller would have: enabled, at
    per-GPU x GPUs."""
    name = deploy_stack(
        chipscale_template(
            max_instances=max(instances, 2),
            instance_type=instance_type,
            per_gpu=per_gpu,
            mapping_enabled=instances > 0,
            worker_timeout=timeout,
        )
    )
    outputs = resolve_stack(name)
    autoscaling = boto3.client("autoscaling")
    autoscaling.set_desired_capacity(
        AutoScalingGroupName=outputs.asg_name, DesiredCapacity=instances
    )
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[outputs.asg_name])
    ids = [i["InstanceId"] for i in group["AutoScalingGroups"][0]["Instances"]]
    lam = boto3.client("lambda")
    if instances:
        lam.update_event_source_mapping(
            UUID=outputs.event_source_mapping_id,
            ScalingConfig={"MaximumConcurrency": per_gpu * instances * gpus_per_instance},
        )
    if reserved is not None:
        lam.put_function_concurrency(
            FunctionName=outputs.worker_function, ReservedConcurrentExecutions=reserved
        )
    return Deployed(name, outputs, ids, gpus_per_instance)


@dataclass(frozen=True)
class Load:
    """What each minute of a regime looks like in CloudWatch, and the queue now."""

    gpu_util: float | None = 70.0
    tiles: float = 600.0  # per minute
    packs: float = 6.0  # per minute (100 tiles a message)
    predict_s: float = 0.0  # worker PredictSeconds per minute
    invocations: float = 30.0
    errors: float = 0.0
    throttles: float = 0.0
    duration_ms: float = 8000.0
    concurrency: float = 8.0
    received: float | None = None
    deleted: float | None = None
    dlq: tuple[float, float] | None = None  # dead-letter depth at the first and last minute
    oldest_s: float | None = 120.0
    visible: int = 20
    in_flight: int = 0


def _minute(k: int) -> datetime:
    return datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=k)


def _datum(name: str, dims: dict[str, str], t: datetime, value: float) -> dict[str, Any]:
    return {
        "MetricName": name,
        "Dimensions": [{"Name": k, "Value": v} for k, v in dims.items()],
        "Timestamp": t,
        "Value": value,
    }


def put_load(deployed: Deployed, load: Load, minutes: int = MINUTES) -> None:
    """Put ``load`` into moto's CloudWatch for the last ``minutes`` minutes, and fill the
    queue with ``load.visible`` messages (``load.in_flight`` of them received, in flight)."""
    cw = boto3.client("cloudwatch")
    outputs = deployed.outputs
    worker = {"service": names.WORKER_SERVICE, "function_name": outputs.worker_function}
    function = {"FunctionName": outputs.worker_function}
    queue = {"QueueName": outputs.queue_url.rsplit("/", 1)[-1]}
    dlq = {"QueueName": outputs.dlq_url.rsplit("/", 1)[-1]}
    for k in range(minutes, 0, -1):
        t = _minute(k)
        if load.gpu_util is not None:
            cw.put_metric_data(
                Namespace=names.GPU_METRICS_NAMESPACE,
                MetricData=[
                    _datum(
                        metric,
                        {
                            names.GPU_DIMENSION_INSTANCE: instance,
                            names.GPU_DIMENSION_INDEX: str(index),
                        },
                        t,
                        value,
                    )
                    for instance in deployed.instances
                    for index in range(deployed.gpus_per_instance)
                    for metric, value in (
                        (names.GPU_METRIC_UTILIZATION, load.gpu_util),
                        (names.GPU_METRIC_MEMORY_UTILIZATION, 40.0),
                        (names.GPU_METRIC_MEMORY_USED, 9000.0),
                        (names.GPU_METRIC_MEMORY_TOTAL, 22888.0),
                    )
                ],
            )
        emf = []
        if load.packs:
            per_pack = load.tiles / load.packs
            emf.append(
                {
                    "MetricName": names.METRIC_TILES_OK,
                    "Dimensions": [{"Name": k, "Value": v} for k, v in worker.items()],
                    "Timestamp": t,
                    "StatisticValues": {
                        "SampleCount": load.packs,
                        "Sum": load.tiles,
                        "Minimum": per_pack,
                        "Maximum": per_pack,
                    },
                }
            )
        if load.predict_s:
            emf.append(_datum(names.METRIC_PREDICT_SECONDS, worker, t, load.predict_s))
        if emf:
            cw.put_metric_data(Namespace=names.METRICS_NAMESPACE, MetricData=emf)
        lam = [
            _datum("Invocations", function, t, load.invocations),
            _datum("Errors", function, t, load.errors),
            _datum("Throttles", function, t, load.throttles),
            _datum("ConcurrentExecutions", function, t, load.concurrency),
        ]
        if load.invocations:
            lam.append(_datum("Duration", function, t, load.duration_ms))
        cw.put_metric_data(Namespace="AWS/Lambda", MetricData=lam)
        sqs = []
        if load.oldest_s is not None:
            sqs.append(_datum("ApproximateAgeOfOldestMessage", queue, t, load.oldest_s))
        if load.received is not None:
            sqs.append(_datum("NumberOfMessagesReceived", queue, t, load.received))
        if load.deleted is not None:
            sqs.append(_datum("NumberOfMessagesDeleted", queue, t, load.deleted))
        if load.dlq is not None:
            first, last = load.dlq
            depth = first + (last - first) * (minutes - k) / max(1, minutes - 1)
            sqs.append(_datum("ApproximateNumberOfMessagesVisible", dlq, t, depth))
        if sqs:
            cw.put_metric_data(Namespace="AWS/SQS", MetricData=sqs)
    fill_queue(
        outputs.queue_url,
        load.visible + load.in_flight,
        in_flight=load.in_flight,
        mapping=outputs.event_source_mapping_id,
    )


def fill_queue(
    queue_url: str, messages: int, *, in_flight: int = 0, mapping: str | None = None
) -> None:
    """Send ``messages`` messages and receive ``in_flight`` of them (they stay in flight).

    moto's SQS hands each message sent to an enabled event source mapping's function at
    once (and deletes it), as if the worker had run: the mapping is paused while the queue
    fills, so the messages wait as they would on GPUs that do not keep up.
    """
    lam = boto3.client("lambda")
    enabled = False
    if mapping:
        enabled = lam.get_event_source_mapping(UUID=mapping)["State"] == "Enabled"
        if enabled:
            lam.update_event_source_mapping(UUID=mapping, Enabled=False)
    try:
        _send(queue_url, messages, in_flight)
    finally:
        if enabled:
            lam.update_event_source_mapping(UUID=mapping, Enabled=True)


def _send(queue_url: str, messages: int, in_flight: int) -> None:
    sqs = boto3.client("sqs")
    for first in range(0, messages, 10):
        entries = [
            {"Id": str(n), "MessageBody": json.dumps({"v": 1, "n": n})}
            for n in range(first, min(messages, first + 10))
        ]
        sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
    taken = 0
    while taken < in_flight:
        answer = sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=min(10, in_flight - taken),
            VisibilityTimeout=3600,
        )
        taken += len(answer.get("Messages", []))


def chipscale(*args: str, moto: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it: a subprocess with only the AWS settings given."""
    environment = clean_env(
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=moto,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "chipscale.cli", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def monitor_json(name: str, moto: str, *extra: str) -> dict[str, Any]:
    done = chipscale("monitor", "--stack", name, "--json", *extra, moto=moto)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# ----------------------------------------------------------------------------- regimes, e2e


def test_far_above_from_errors_and_dead_letters(aws: str) -> None:
    deployed = deploy()
    put_load(
        deployed,
        Load(gpu_util=97.0, invocations=100, errors=8, dlq=(0, 6), duration_ms=40_000),
    )
    document = monitor_json(deployed.name, aws)
    verdict = document["diagnosis"]
    assert verdict["regime"] == "far-above"
    assert "invocation errors 8.0%" in verdict["reason"]
    assert "dead-letter queue +6 messages" in verdict["reason"]
    assert "GPUs at 97%" in verdict["reason"]
    assert "lower the per-GPU concurrency (now 4" in verdict["action"]
    assert f"chipscale tune --stack {deployed.name} --apply" in verdict["action"]
    signals = verdict["signals"]
    assert signals["error_rate"] == pytest.approx(0.08)
    assert signals["dlq_growth"] == pytest.approx(6)
    assert signals["gpus_in_service"] == 2
    # moto cannot compute percentiles: the rest of the snapshot stands, with a warning
    snapshot = document["snapshot"]
    assert snapshot["worker"]["duration_p95_ms"] is None
    assert any("percentiles unavailable" in w for w in snapshot["warnings"])
    assert verdict["thresholds"]["FAR_ERROR_RATE"] == diagnosis.FAR_ERROR_RATE


def test_far_above_from_messages_going_back_to_the_queue(aws: str) -> None:
    """Failed packs are batch item failures, not Lambda errors: the sign is received vs
    deleted messages."""
    deployed = deploy()
    put_load(deployed, Load(gpu_util=92.0, received=100, deleted=80))
    verdict = monitor_json(deployed.name, aws)["diagnosis"]
    assert verdict["regime"] == "far-above"
    assert "20.0% of received messages went back to the queue" in verdict["reason"]


def test_below_at_the_cap_raises_the_per_gpu_concurrency(aws: str) -> None:
    deployed = deploy(per_gpu=4)  # MaximumConcurrency 8 for 2 GPUs
    put_load(deployed, Load(gpu_util=20.0, concurrency=8, visible=50))
    document = monitor_json(deployed.name, aws)
    verdict = document["diagnosis"]
    assert verdict["regime"] == "below"
    assert "GPUs at 20% (< 40%) while 50 messages wait (oldest 120 s)" in verdict["reason"]
    # 4 x 85 / 20 = 17: utilisation grows about in proportion to the Lambdas feeding it
    assert (
        "raise the per-GPU concurrency (now 4; 8 Lambdas at MaximumConcurrency 8)"
        in (verdict["action"])
    )
    assert "--per-gpu 17 --apply" in verdict["action"]
    assert document["tune"] is None  # no saturated minute: nothing for tune to measure


def test_below_under_the_cap_removes_gpus(aws: str) -> None:
    deployed = deploy(per_gpu=4)
    put_load(deployed, Load(gpu_util=20.0, concurrency=3, visible=50))
    verdict = monitor_json(deployed.name, aws)["diagnosis"]
    assert verdict["regime"] == "below"
    assert "below their cap (3 of MaximumConcurrency 8" in verdict["action"]
    assert "remove GPUs" in verdict["action"]


def test_balanced(aws: str) -> None:
    deployed = deploy()
    put_load(deployed, Load(gpu_util=88.0, received=100, deleted=99, dlq=(2, 2)))
    document = monitor_json(deployed.name, aws)
    verdict = document["diagnosis"]
    assert verdict["regime"] == "balanced"
    assert verdict["action"] == "nothing to change"
    queue = document["snapshot"]["queue"]
    assert queue["visible"] == 20
    assert queue["tiles_per_s"] == pytest.approx(10.0)  # 600 tiles a minute
    assert queue["tiles_per_message"] == pytest.approx(100.0)
    assert queue["remaining_tiles"] == pytest.approx(2000.0)  # 20 messages x 100 tiles
    assert queue["eta_s"] == pytest.approx(200.0)
    assert queue["dlq_growth"] == 0


def test_idle(aws: str) -> None:
    deployed = deploy()
    put_load(deployed, Load(gpu_util=3.0, tiles=0, packs=0, invocations=0, visible=0))
    verdict = monitor_json(deployed.name, aws)["diagnosis"]
    assert verdict["regime"] == "idle"
    assert "2 GPUs in service" in verdict["reason"]


def test_no_gpu_in_service(aws: str) -> None:
    deployed = deploy(instances=0)
    fill_queue(deployed.outputs.queue_url, 30)
    document = monitor_json(deployed.name, aws)
    verdict = document["diagnosis"]
    assert verdict["regime"] == "no-gpu"
    assert "30 messages wait" in verdict["reason"]
    assert "the group wants 0 instances" in verdict["action"]
    assert document["snapshot"]["gpus"] == []


def test_failing_is_not_blamed_on_concurrency(aws: str) -> None:
    deployed = deploy()
    put_load(deployed, Load(gpu_util=25.0, invocations=100, errors=10))
    verdict = monitor_json(deployed.name, aws)["diagnosis"]
    assert verdict["regime"] == "failing"
    assert "while the GPUs are at 25% (< 85%)" in verdict["reason"]


@pytest.mark.parametrize(
    ("offset", "regime"), [(-0.5, "failing"), (0.0, "far-above"), (0.5, "far-above")]
)
def test_saturation_threshold_flips_the_regime_end_to_end(
    aws: str, offset: float, regime: str
) -> None:
    """The same errors read as GPU overload only once the GPUs are saturated."""
    deployed = deploy()
    util = diagnosis.SATURATED_GPU_UTIL + offset
    put_load(deployed, Load(gpu_util=util, invocations=100, errors=5))
    document = monitor_json(deployed.name, aws)
    assert document["snapshot"]["gpu_utilization"] == pytest.approx(util)
    assert document["diagnosis"]["regime"] == regime


def test_several_gpus_an_instance_are_one_row_each(aws: str) -> None:
    deployed = deploy(instances=2, instance_type="g5.12xlarge", gpus_per_instance=4)
    put_load(deployed, Load(gpu_util=90.0))
    snapshot = monitor_json(deployed.name, aws)["snapshot"]
    rows = {(g["instance_id"], g["index"]) for g in snapshot["gpus"]}
    assert rows == {(i, n) for i in deployed.instances for n in range(4)}
    assert snapshot["fleet"]["gpus_in_service"] == 8
    assert all(g["instance_type"] == "g5.12xlarge" for g in snapshot["gpus"])
    assert all(g["memory_total_mb"] == 22888.0 for g in snapshot["gpus"])
    assert snapshot["minutes"][-2]["gpu_utilization"]  # per minute, per GPU key


def test_table_output(aws: str) -> None:
    deployed = deploy()
    put_load(deployed, Load(gpu_util=97.0, invocations=100, errors=8))
    done = chipscale("monitor", "--stack", deployed.name, moto=aws)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for instance in deployed.instances:
        assert instance in out
    assert "diagnosis: far-above" in out
    assert "Lambda concurrency far above GPU capacity" in out
    assert "MaximumConcurrency" in out and "tiles/s" in out
    assert "warning: Lambda duration percentiles unavailable" in out


def test_watch_refreshes_and_stops_after_the_iterations_asked(aws: str) -> None:
    deployed = deploy()
    put_load(deployed, Load(gpu_util=70.0))
    done = chipscale(
        "monitor", "--stack", deployed.name, "--json", "--watch", "0.01", "--iterations", "3",
        moto=aws,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    documents = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(documents) == 3
    assert {d["diagnosis"]["regime"] for d in documents} == {"balanced"}
    # Not a terminal: the views follow one another instead of a Live display.
    done = chipscale(
        "monitor", "--stack", deployed.name, "--watch", "0.01", "--iterations", "2", moto=aws
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("diagnosis: balanced") == 2


def test_plot_writes_a_png(aws: str, tmp_path: Path) -> None:
    deployed = deploy()
    put_load(deployed, Load(gpu_util=80.0))
    target = tmp_path / "gpus.png"
    done = chipscale(
        "monitor", "--stack", deployed.name, "--plot", str(target), "--plot-hours", "1",
        "--json", moto=aws,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    png = target.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 10_000
    assert f"plot -> {target}" in done.stderr
    json.loads(done.stdout)  # --json still prints its document alone on stdout


def test_gpu_monitor_script_is_chipscale_monitor(aws: str) -> None:
    deployed = deploy(instances=0)
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu-monitor"), "--stack", deployed.name, "--json"],
        env=clean_env(
            AWS_REGION="us-east-1",
            AWS_ENDPOINT_URL=aws,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["diagnosis"]["regime"] == "idle"


def test_missing_stack_is_one_clear_line(moto_server: str) -> None:
    done = chipscale("monitor", "--stack", "no-such-stack", moto=moto_server)
    assert done.returncode == 1
    assert done.stderr == (
        "Error: no CloudFormation stack 'no-such-stack' in us-east-1: check "
        "the name (`aws cloudformation list-stacks`) and AWS_REGION\n"
    )


def test_missing_credentials_is_one_clear_line(moto_server: str) -> None:
    env = clean_env(AWS_REGION="us-east-1", AWS_ENDPOINT_URL=moto_server)
    done = subprocess.run(
        [sys.executable, "-m", "chipscale.cli", "monitor", "--stack", "anything"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("Error: no usable AWS credentials")


def test_job_remaining_tiles_give_the_eta(aws: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """--job asks the operations Lambda for the job's remaining tiles (moto cannot run a
    Lambda without Docker: its status answer is given here, as the handler returns it)."""
    from chipscale.ops import operations_client as operations

    deployed = deploy()
    put_load(deployed, Load(gpu_util=70.0))
    asked = []

    def status(self: Any, job: str | None = None) -> list[dict[str, Any]]:
        asked.append(job)
        return [{"job": job, "remaining": 6000, "tiles": 9000}]

    monkeypatch.setattr(operations.StackOperations, "status", status)
    result = CliRunner().invoke(
        cli,
        ["monitor", "--stack", deployed.name, "--json", "--job", "roofs"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    queue = json.loads(result.stdout)["snapshot"]["queue"]
    assert asked == ["roofs"]
    assert queue["remaining_source"] == "job"
    assert queue["eta_s"] == pytest.approx(600.0)  # 6000 tiles at 10 tiles/s


def test_worker_metrics_without_the_function_dimension_still_count(aws: str) -> None:
    """A worker that publishes with ``service`` alone (no function_name) is still read, with
    a warning that the figures are the account's, not the stack's."""
    deployed = deploy()
    cw = boto3.client("cloudwatch")
    for k in range(MINUTES, 0, -1):
        cw.put_metric_data(
            Namespace=names.METRICS_NAMESPACE,
            MetricData=[
                _datum(names.METRIC_TILES_OK, {"service": names.WORKER_SERVICE}, _minute(k), 60)
            ],
        )
    snapshot = monitor_json(deployed.name, aws)["snapshot"]
    assert snapshot["queue"]["tiles"] >= 60 * MINUTES
    assert any("account's and region's" in w for w in snapshot["warnings"])


# ----------------------------------------------------------------------------- percentiles


def recorded_percentiles(window: Window, p50_ms: float, p95_ms: float) -> dict[str, Any]:
    """GetMetricData's answer for the p50/p95 queries, in the shape AWS returns it."""
    return {
        "MetricDataResults": [
            {
                "Id": f"lam_{stat}",
                "Label": "Duration",
                "Timestamps": [window.start],
                "Values": [value],
                "StatusCode": "Complete",
            }
            for stat, value in (("p50", p50_ms), ("p95", p95_ms))
        ],
        "Messages": [],
    }


class PercentilesRecorded:
    """A CloudWatch client: percentile queries go to a Stubber with a recorded answer, all
    other queries to moto."""

    def __init__(self, moto_client: Any, stubbed: Any) -> None:
        self.moto = moto_client
        self.stubbed = stubbed

    def get_metric_data(self, **request: Any) -> dict[str, Any]:
        stats = {q["MetricStat"]["Stat"] for q in request["MetricDataQueries"]}
        if stats & {"p50", "p95"}:
            return self.stubbed.get_metric_data(**request)
        return self.moto.get_metric_data(**request)


def test_slightly_above_from_recorded_percentiles(aws: str) -> None:
    deployed = deploy()
    put_load(deployed, Load(gpu_util=93.0))
    now = datetime.now(UTC).replace(second=5, microsecond=0)
    window = Window.ending(now, timedelta(minutes=15))
    recorded = boto3.client(
        "cloudwatch", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    clients = Clients.from_session(boto3.session.Session(region_name="us-east-1"))
    with Stubber(recorded) as stub:
        # The request is pinned: both percentiles of the worker's Duration over the whole
        # window, one period, in a call of their own.
        stub.add_response(
            "get_metric_data",
            recorded_percentiles(window, 9_800.0, 24_500.0),
            {
                "MetricDataQueries": percentile_queries(deployed.outputs.worker_function, window),
                "StartTime": window.start,
                "EndTime": window.end,
                "ScanBy": "TimestampAscending",
            },
        )
        clients = replace(clients, cloudwatch=PercentilesRecorded(clients.cloudwatch, recorded))
        snapshot = collect(deployed.outputs, clients, now=now)
        stub.assert_no_pending_responses()
    query = percentile_queries(deployed.outputs.worker_function, window)[1]["MetricStat"]
    assert (query["Stat"], query["Period"]) == ("p95", 900)
    assert snapshot.worker.duration_p50_ms == 9_800.0
    assert snapshot.worker.duration_p95_ms == 24_500.0
    assert not any("percentiles" in w for w in snapshot.warnings)
    verdict = diagnose(snapshot)
    assert verdict.regime is Regime.SLIGHTLY_ABOVE
    assert "p95 duration 24.5 s = 2.5 x p50 9.8 s (>= 2 x)" in verdict.reason
    assert "lower the per-GPU concurrency a step (now 4" in verdict.action


# ----------------------------------------------------------------------------- thresholds


def snap(
    *,
    util: float | None = 70.0,
    gpus: int = 2,
    visible: int = 10,
    in_flight: int = 5,
    invocations: float = 1000.0,
    errors: float = 0.0,
    received: float | None = None,
    deleted: float | None = None,
    dlq_growth: float | None = None,
    p50_ms: float | None = 10_000.0,
    p95_ms: float | None = 12_000.0,
    timeout_s: float = 60.0,
    concurrency_max: float | None = 8.0,
    maximum_concurrency: int | None = 8,
    per_gpu: int | None = 4,
    reserved: int | None = None,
) -> Snapshot:
    """A snapshot built by hand: ``gpus`` single-GPU instances in service at ``util``."""
    now = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    instances = tuple(
        Instance(f"i-{n:017x}", "g5.xlarge", 1, "InService", "Healthy", "running", None, True)
        for n in range(gpus)
    )
    return Snapshot(
        stack="chipscale",
        region="us-east-1",
        window=Window.ending(now, timedelta(minutes=15)),
        fleet=Fleet("chipscale-gpu", 0, 4, gpus, instances),
        gpus=tuple(
            Gpu(i.instance_id, 0, i.instance_type, True, "InService", util, util, source="x")
            for i in instances
        ),
        queue=Queue(
            visible=visible,
            in_flight=in_flight,
            oldest_age_s=60.0,
            dlq_depth=0,
            dlq_growth=dlq_growth,
            received=received,
            deleted=deleted,
        ),
        worker=WorkerStatus(
            function_name="worker",
            timeout_s=timeout_s,
            reserved_concurrency=reserved,
            mapping_state="Enabled",
            maximum_concurrency=maximum_concurrency,
            per_gpu_concurrency=per_gpu,
            concurrency_max=concurrency_max,
            invocations=invocations,
            errors=errors,
            duration_p50_ms=p50_ms,
            duration_p95_ms=p95_ms,
        ),
    )


#: Relative step "just below" and "just above" a threshold.
EPSILON = 1e-6


def around(value: float) -> tuple[float, float]:
    """Just below and just above ``value`` (an integer threshold: one less, and itself)."""
    if isinstance(value, int):
        return value - 1, value
    return value * (1 - EPSILON), value * (1 + EPSILON)


#: threshold -> (snapshot for a value of the measured figure, regime below, regime above).
FLIPS: dict[str, tuple[str, Any, Regime, Regime]] = {
    "saturated, with errors": (
        "SATURATED_GPU_UTIL",
        lambda v: snap(util=v, errors=50),
        Regime.FAILING,
        Regime.FAR_ABOVE,
    ),
    "saturated, with a long tail": (
        "SATURATED_GPU_UTIL",
        lambda v: snap(util=v, p95_ms=30_000),
        Regime.BALANCED,
        Regime.SLIGHTLY_ABOVE,
    ),
    "under-used": (
        "UNDERUSED_GPU_UTIL",
        lambda v: snap(util=v),
        Regime.BELOW,
        Regime.BALANCED,
    ),
    "error rate": (
        "FAR_ERROR_RATE",
        lambda v: snap(util=95, invocations=1000, errors=v * 1000),
        Regime.BALANCED,
        Regime.FAR_ABOVE,
    ),
    "retry rate": (
        "FAR_RETRY_RATE",
        lambda v: snap(util=95, received=1000, deleted=1000 - v * 1000),
        Regime.BALANCED,
        Regime.FAR_ABOVE,
    ),
    "dead letters": (
        "DLQ_GROWTH_MESSAGES",
        lambda v: snap(util=95, dlq_growth=v),
        Regime.BALANCED,
        Regime.FAR_ABOVE,
    ),
    "p95 near the timeout": (
        "FAR_TIMEOUT_FRACTION",
        lambda v: snap(util=95, timeout_s=60, p50_ms=40_000, p95_ms=v * 60_000),
        Regime.BALANCED,
        Regime.FAR_ABOVE,
    ),
    "p95 / p50": (
        "SLIGHT_P95_P50_RATIO",
        lambda v: snap(util=95, p50_ms=10_000, p95_ms=v * 10_000),
        Regime.BALANCED,
        Regime.SLIGHTLY_ABOVE,
    ),
    "messages waiting": (
        "WAITING_MESSAGES",
        lambda v: snap(util=20, visible=v),
        Regime.BALANCED,
        Regime.BELOW,
    ),
}


@pytest.mark.parametrize("case", list(FLIPS))
def test_each_threshold_flips_the_regime(case: str) -> None:
    name, make, regime_below, regime_above = FLIPS[case]
    under, over = around(getattr(diagnosis, name))
    assert diagnose(make(under)).regime is regime_below
    assert diagnose(make(over)).regime is regime_above


def test_every_threshold_has_a_flip() -> None:
    flipped = {name for name, *_ in FLIPS.values()} | {"AT_CAP_FRACTION"}
    assert flipped == set(diagnosis.THRESHOLD_NAMES)


def test_at_cap_fraction_chooses_between_more_concurrency_and_fewer_gpus() -> None:
    cap = 20
    under, over = around(diagnosis.AT_CAP_FRACTION * cap)
    at = diagnose(snap(util=20, concurrency_max=over, maximum_concurrency=cap))
    short = diagnose(snap(util=20, concurrency_max=under, maximum_concurrency=cap))
    assert at.regime is short.regime is Regime.BELOW
    assert at.action.startswith("raise the per-GPU concurrency")
    assert "remove GPUs" in short.action


def test_thresholds_are_read_when_diagnosing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each threshold is one constant: changing it moves the boundary."""
    snapshot = snap(util=80.0, errors=50)
    assert diagnose(snapshot).regime is Regime.FAILING
    monkeypatch.setattr(diagnosis, "SATURATED_GPU_UTIL", 80.0)
    assert diagnose(snapshot).regime is Regime.FAR_ABOVE
    assert diagnose(snapshot).to_dict()["thresholds"]["SATURATED_GPU_UTIL"] == 80.0


def test_the_docs_table_names_every_threshold_with_its_value() -> None:
    docs = (ROOT / "docs" / "operations.md").read_text()
    for name, value in diagnosis.thresholds().items():
        assert f"`{name}`" in docs, name
        shown = f"{value:g}" if value >= 1 else f"{value:.0%}"
        assert shown in docs, (name, shown)


@pytest.mark.parametrize(
    ("kwargs", "regime"),
    [
        ({"visible": 0, "in_flight": 0}, Regime.IDLE),
        ({"visible": 0, "in_flight": 0, "gpus": 0}, Regime.IDLE),  # scaled to zero, as meant
        ({"gpus": 0}, Regime.NO_GPU),
        ({"util": None, "errors": 50}, Regime.FAR_ABOVE),  # unknown: taken as saturated
        ({"util": None}, Regime.BALANCED),
        ({"util": 95, "p50_ms": None, "p95_ms": None}, Regime.BALANCED),
    ],
)
def test_edges(kwargs: dict[str, Any], regime: Regime) -> None:
    verdict = diagnose(snap(**kwargs))
    assert verdict.regime is regime
    json.dumps(verdict.to_dict())  # JSON-ready


def test_an_unreadable_fleet_is_not_a_fleet_without_gpus() -> None:
    """A failed read of the group (a missing permission) must not pass for "no GPU in
    service", nor let tune compute a MaximumConcurrency for zero GPUs."""
    from chipscale.ops.tune import TuneError, target_for

    unread = replace(
        snap(util=None),
        fleet=Fleet("chipscale-gpu", known=False),
        gpus=(),
        warnings=("cannot read the GPU fleet: AccessDenied: not authorized",),
    )
    verdict = diagnose(unread)
    assert verdict.regime is Regime.BALANCED
    assert verdict.signals.gpus_in_service is None
    with pytest.raises(TuneError, match="AccessDenied"):
        target_for(4, unread)


def test_reserved_concurrency_holding_the_cap_is_named() -> None:
    verdict = diagnose(snap(util=20, reserved=8, maximum_concurrency=8, concurrency_max=8))
    assert "raise reservedConcurrency" in verdict.action


def test_render_shows_every_part() -> None:
    from rich.console import Console

    from chipscale.cli.monitor_view import render_monitor
    from chipscale.ops.prometheus import TorchServeMetrics

    snapshot = replace(
        snap(util=97, errors=50),
        torchserve=(TorchServeMetrics("http://10.0.1.4:8082/metrics", "i-1", requests=10),),
        warnings=("cannot read something: AccessDenied",),
    )
    console = Console(record=True, width=200)
    console.print(render_monitor(snapshot, diagnose(snapshot)))
    text = console.export_text()
    assert "diagnosis: far-above" in text
    assert "i-00000000000000000" in text
    assert "TorchServe (Prometheus)" in text
    assert "warning: cannot read something" in text


# ----------------------------------------------------------------------------- TorchServe

#: /metrics of TorchServe 0.12 on a 4-GPU host with nvgpu (the Host-level gauges keyed by
#: DeviceId; counters as TorchServe writes them, trailing commas included).
RECORDED_GPU_METRICS = """\
# HELP GPUUtilization Torchserve prometheus gauge metric with unit: Percent
# TYPE GPUUtilization gauge
GPUUtilization{Level="Host",DeviceId="0",Hostname="gpu-4",} 97.0
GPUUtilization{Level="Host",DeviceId="1",Hostname="gpu-4",} 91.0
GPUUtilization{Level="Host",DeviceId="2",Hostname="gpu-4",} 0.0
GPUUtilization{Level="Host",DeviceId="3",Hostname="gpu-4",} 88.0
# HELP GPUMemoryUtilization Torchserve prometheus gauge metric with unit: Percent
# TYPE GPUMemoryUtilization gauge
GPUMemoryUtilization{Level="Host",DeviceId="0",Hostname="gpu-4",} 41.2
GPUMemoryUtilization{Level="Host",DeviceId="1",Hostname="gpu-4",} 40.9
# HELP GPUMemoryUsed Torchserve prometheus gauge metric with unit: Megabytes
# TYPE GPUMemoryUsed gauge
GPUMemoryUsed{Level="Host",DeviceId="0",Hostname="gpu-4",} 9431.0
# HELP ts_inference_requests_total Torchserve prometheus counter metric with unit: Count
# TYPE ts_inference_requests_total counter
ts_inference_requests_total{model_name="roofs",model_version="3",hostname="gpu-4",} 5120.0
# HELP ts_queue_latency_microseconds Torchserve prometheus counter metric with unit: Microseconds
# TYPE ts_queue_latency_microseconds counter
ts_queue_latency_microseconds{model_name="roofs",model_version="3",hostname="gpu-4",} 1.024E9
# TYPE ts_inference_latency_microseconds counter
ts_inference_latency_microseconds{model_name="roofs",model_version="3",hostname="gpu-4",} 2.048E9
Requests5XX{Level="Host",Hostname="gpu-4",} 7.0
"""


def test_prometheus_text_of_a_gpu_host() -> None:
    metrics = summarize(parse(RECORDED_GPU_METRICS), "http://10.0.1.4:8082/metrics", "i-1")
    assert metrics.gpus[0].utilization == 97.0
    assert metrics.gpus[0].memory_utilization == 41.2
    assert metrics.gpus[0].memory_used_mb == 9431.0
    assert metrics.gpus[2].utilization == 0.0
    assert sorted(metrics.gpus) == [0, 1, 2, 3]
    assert metrics.requests == 5120
    assert metrics.mean_queue_ms == pytest.approx(200.0)
    assert metrics.mean_inference_ms == pytest.approx(400.0)
    assert metrics.responses == {"5xx": 7.0}


def test_prometheus_labels_with_escapes_and_bad_lines() -> None:
    (sample,) = parse('m{a="x\\"y",b="line\\nnext",c="back\\\\slash"} 1.5 1700000000000')
    assert sample.labels == {"a": 'x"y', "b": "line\nnext", "c": "back\\slash"}
    assert sample.value == 1.5
    assert parse("up NaN")[0].name == "up"
    with pytest.raises(PrometheusError, match="line 1"):
        parse("<html><body>proxy error</body></html>")
    with pytest.raises(PrometheusError, match="no numeric value"):
        parse("m{} lots")


def test_torchserve_gauges_fill_in_for_gpus_cloudwatch_missed() -> None:
    base = snap(util=None, gpus=1)
    gpu = base.gpus[0]
    metrics = summarize(parse(RECORDED_GPU_METRICS), "http://10.0.1.4:8082", gpu.instance_id)
    other = summarize(parse(RECORDED_GPU_METRICS), "http://10.0.1.9:8082", "i-somebody-else")
    merged = with_torchserve(base, [metrics, other])
    (filled,) = merged.gpus
    assert (filled.utilization, filled.source) == (97.0, "torchserve")
    assert merged.gpu_utilization == 97.0
    assert len(merged.torchserve) == 2
    # CloudWatch's figure, when there is one, is kept.
    kept = with_torchserve(snap(util=50.0, gpus=1), [replace(metrics, instance_id=gpu.instance_id)])
    assert (kept.gpus[0].utilization, kept.gpus[0].source) == (50.0, "x")


def _infer(server: Any, requests: int) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 3, 256, 256), np.uint8), allow_pickle=False)
    http = urllib3.PoolManager()
    for _ in range(requests):
        answer = http.request(
            "POST",
            server.predictions_url,
            body=buffer.getvalue(),
            headers={"Content-Type": "application/octet-stream"},
        )
        assert answer.status == 200, answer.data[:200]


def test_scrape_a_real_torchserve(torchserve: Any) -> None:
    before = scrape(torchserve.metrics_url)
    _infer(torchserve, 3)
    after = scrape(torchserve.metrics_url, "i-local")
    assert after.error is None, after.error
    assert after.instance_id == "i-local"
    assert after.requests is not None and after.requests >= 3
    assert after.mean_inference_ms is not None and after.mean_inference_ms > 0
    assert after.mean_queue_ms is not None and after.mean_queue_ms >= 0
    assert after.gpus == {}  # no nvgpu on this machine: TorchServe writes only # HELP lines
    interval = after.since(before)
    assert interval.requests == after.requests - (before.requests or 0)
    assert interval.requests >= 3


def test_monitor_reads_torchserve_through_metrics_url(aws: str, torchserve: Any) -> None:
    _infer(torchserve, 2)
    deployed = deploy()
    put_load(deployed, Load(gpu_util=None))
    instance = deployed.instances[0]
    document = monitor_json(
        deployed.name, aws, "--metrics-url", f"{instance}={torchserve.metrics_url}"
    )
    (served,) = document["snapshot"]["torchserve"]
    assert served["instance_id"] == instance
    assert served["requests"] >= 2
    assert served["mean_inference_ms"] > 0
    assert served["error"] is None


def test_unreachable_metrics_endpoint_is_a_warning(aws: str) -> None:
    from conftest import free_port

    deployed = deploy()
    put_load(deployed, Load(gpu_util=70.0))
    url = f"http://127.0.0.1:{free_port()}"
    document = monitor_json(deployed.name, aws, "--metrics-url", url)
    (served,) = document["snapshot"]["torchserve"]
    assert served["error"]
    assert any(url in w for w in document["snapshot"]["warnings"])
    assert document["diagnosis"]["regime"] == "balanced"


def test_scrape_action_reads_private_hosts_only() -> None:
    with pytest.raises(ValueError, match="not a private address"):
        scrape_action({"hosts": {"i-1": "8.8.8.8"}})
    with pytest.raises(ValueError, match="not an IP address"):
        scrape_action({"hosts": {"i-1": "example.com/metrics?"}})
    with pytest.raises(ValueError, match="hosts"):
        scrape_action({})
    # A private host with nothing on the metrics port: one row with the reason.
    (row,) = scrape_action({"hosts": {"i-1": "127.0.0.1"}})["metrics"]
    assert row["instance_id"] == "i-1"
    assert row["target"] == f"http://127.0.0.1:{names.METRICS_PORT}/metrics"


def test_scrape_via_lambda_parses_the_answer_and_survives_an_old_lambda() -> None:
    client = boto3.client(
        "lambda", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    row = summarize(parse(RECORDED_GPU_METRICS), "http://10.0.1.4:8082/metrics", "i-1")
    payload = json.dumps({"metrics": [row.to_dict()]}).encode()
    unknown = json.dumps(
        {"errorType": "ValueError", "errorMessage": "unknown action 'scrape-metrics'"}
    ).encode()
    from botocore.response import StreamingBody

    with Stubber(client) as stub:
        stub.add_response(
            "invoke",
            {"StatusCode": 200, "Payload": StreamingBody(io.BytesIO(payload), len(payload))},
            {
                "FunctionName": "ops",
                "Payload": json.dumps(
                    {"action": "scrape-metrics", "hosts": {"i-1": "10.0.1.4"}}
                ).encode(),
            },
        )
        stub.add_response(
            "invoke",
            {
                "StatusCode": 200,
                "FunctionError": "Unhandled",
                "Payload": StreamingBody(io.BytesIO(unknown), len(unknown)),
            },
        )
        (got,) = scrape_via_lambda(client, "ops", {"i-1": "10.0.1.4"})
        (failed,) = scrape_via_lambda(client, "ops", {"i-1": "10.0.1.4"})
    assert got == row
    assert "unknown action 'scrape-metrics'" in (failed.error or "")


def test_plot_period_bounds_the_points() -> None:
    assert plot_period(3) == 60
    assert plot_period(24) == 60
    assert plot_period(48) == 120
    assert plot_period(24 * 14) == 60 * 14


def test_minutes_report_gpus_and_their_mean() -> None:
    minute = Minute(datetime(2026, 1, 1, tzinfo=UTC), {"i-1/0": 90.0, "i-1/1": 70.0})
    assert (minute.gpus_reporting, minute.mean_gpu_utilization) == (2, 80.0)
    assert Minute(datetime(2026, 1, 1, tzinfo=UTC)).mean_gpu_utilization is None
