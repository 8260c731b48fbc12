"""``chipscale push`` / ``sqs-push`` against a real moto SQS server.

What runs for real: moto's SQS (every push is received back and checked tile by tile),
moto's CloudFormation for ``--stack``, a SQLite results store for ``--resume``, the console
script in a subprocess. What is faked: SQS failing (a client wrapper around the real moto
client answers ``Failed`` entries or raises throttling for chosen calls), since moto's SQS
never fails on its own.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import boto3
import mercantile
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from click.testing import CliRunner, Result
from hypothesis import example, given
from hypothesis import strategies as st
from mercantile import Tile
from shapely.geometry import box, mapping
from test_stack_outputs import chipscale_template, deploy_stack

from chipscale.cli import cli
from chipscale.cloud import push_send
from chipscale.cloud.push import push, region_from_queue_url, validate_source
from chipscale.cloud.push_plan import decode_keys, encode_tiles, plan_push
from chipscale.cloud.push_send import BatchSender, Entry, PushError, batch_entries
from chipscale.grid.packs import pack_key, pack_levels
from chipscale.grid.tilelist import TileFormat, write_tile_list
from chipscale.pipeline.messages import parse_message
from chipscale.results import open_store
from chipscale.retry import RetryPolicy
from chipscale.sources.footprint import cover, source_footprint
from chipscale.values import JobInfo, TileResult

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "s3://imagery/scene.tif"
XYZ = "https://tiles.example/imagery/{z}/{x}/{y}.jpg"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def sqs(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """boto3 pointed at moto through AWS_ENDPOINT_URL, as a user's environment would be."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    return boto3.client("sqs")


@pytest.fixture
def queue(sqs: Any) -> str:
    return sqs.create_queue(QueueName=f"tiles-{uuid.uuid4().hex[:10]}")["QueueUrl"]


@pytest.fixture
def requests_made(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """SendMessageBatch HTTP requests the CLI's client sends, counted by a botocore event hook
    (retries botocore might make included), independently of the push's own count."""
    counts: Counter[str] = Counter()
    original = push_send.sqs_client

    def counting_client(**kwargs: Any) -> Any:
        client = original(**kwargs)
        client.meta.events.register(
            "before-send.sqs.SendMessageBatch", lambda **_: counts.update(["SendMessageBatch"])
        )
        return client

    monkeypatch.setattr(push_send, "sqs_client", counting_client)  # where the CLI finds it
    return counts


def drain(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    """Every message of the queue, parsed, each deleted once received."""
    bodies: list[dict[str, Any]] = []
    empty = 0
    while empty < 2:
        got = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=300
        ).get("Messages", [])
        empty = 0 if got else empty + 1
        for message in got:
            bodies.append(json.loads(message["Body"]))
        if got:
            sqs.delete_message_batch(
                QueueUrl=queue_url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)
                ],
            )
    return bodies


def check_delivery(
    bodies: list[dict[str, Any]],
    expected: Iterable[Tile],
    *,
    max_tiles: int = 100,
    job: str | None = None,
    source: str | None = SOURCE,
) -> None:
    """Every tile exactly once; each message a valid v1 pack of adjacent tiles."""
    seen: Counter[Tile] = Counter()
    levels = pack_levels(max_tiles)
    for body in bodies:
        message = parse_message(body, max_tiles=max_tiles, default_source="worker-default")
        assert len(message.tiles) <= max_tiles
        if job is not None:
            assert message.job == job
        assert message.source == (source or "worker-default")
        assert ("source" in body) == (source is not None)
        # One parent `levels` up, or neighbours merged under one grandparent.
        assert len({pack_key(pack_key(t, levels), 1) for t in message.tiles}) == 1, body
        seen.update(message.tiles)
    repeated = [t for t, n in seen.items() if n > 1]
    assert not repeated, f"{len(repeated)} tiles arrived twice"
    assert set(seen) == set(expected)


def run_cli(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["push", *args], input=input, catch_exceptions=False)


def summary_of(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def block(x0: int, y0: int, z: int, width: int, height: int) -> list[Tile]:
    return [Tile(x, y, z) for x in range(x0, x0 + width) for y in range(y0, y0 + height)]


def write_list(path: Path, tiles: list[Tile], fmt: TileFormat = "x-y-z", seed: int = 0) -> Path:
    """A tile list in random order: packing must not depend on the file's order."""
    shuffled = list(tiles)
    random.Random(seed).shuffle(shuffled)
    with path.open("w") as handle:
        write_tile_list(shuffled, handle, fmt)
    return path


# ----------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("fmt", ["x-y-z", "z/x/y", "json"])
def test_tile_list_every_format_arrives_exactly_once_packed(
    tmp_path: Path, sqs: Any, queue: str, requests_made: Counter[str], fmt: TileFormat
) -> None:
    tiles = block(137_000, 91_000, 18, 48, 40)  # 1,920 tiles, not aligned on packs
    path = write_list(tmp_path / "tiles.txt", tiles, fmt)
    summary = summary_of(run_cli(str(path), queue, "--source", SOURCE, "--job", "j1", "--json"))
    assert summary["tiles_sent"] == len(tiles) and summary["failed_tiles"] == 0
    assert summary["requests"] == requests_made["SendMessageBatch"]
    assert summary["requests_per_1000_tiles"] <= 2
    assert 1000 * requests_made["SendMessageBatch"] / len(tiles) <= 2
    bodies = drain(sqs, queue)
    assert len(bodies) == summary["messages_sent"]
    check_delivery(bodies, tiles, job="j1")


def test_bbox_cover(sqs: Any, queue: str, requests_made: Counter[str]) -> None:
    bbox = (9.99, 49.99, 10.04, 50.02)
    summary = summary_of(
        run_cli(
            queue, "--bbox", ",".join(map(str, bbox)), "--zoom", "18", "--source", XYZ, "--json"
        )
    )
    expected = set(cover(18, bbox=bbox))
    assert summary["tiles_sent"] == len(expected) > 1000
    assert summary["job"] == "imagery-z18"  # named after the XYZ template's path
    assert summary["requests"] == requests_made["SendMessageBatch"]
    assert summary["requests_per_1000_tiles"] <= 2
    check_delivery(drain(sqs, queue), expected, source=XYZ)


def test_aoi_cover(tmp_path: Path, sqs: Any, queue: str, requests_made: Counter[str]) -> None:
    aoi = tmp_path / "area.geojson"
    ring = [[-73.99, 40.70], [-73.87, 40.71], [-73.91, 40.82], [-73.99, 40.70]]  # 4,965 tiles
    aoi.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    summary = summary_of(
        run_cli(queue, "--aoi", str(aoi), "--zoom", "18", "--source", XYZ, "--json")
    )
    expected = set(cover(18, aoi=aoi))
    assert summary["tiles_sent"] == len(expected) > 1000
    assert summary["requests_per_1000_tiles"] <= 2
    assert summary["requests"] == requests_made["SendMessageBatch"]
    check_delivery(drain(sqs, queue), expected, source=XYZ)


def test_aoi_within_a_cog_in_s3(tmp_path: Path, bucket: str, sqs: Any, queue: str) -> None:
    """An AOI and a COG footprint together are intersected, as `chipscale cover` does: here
    the western half of the aerial image, read from moto's S3."""
    source = f"s3://{bucket}/aerial.tif"
    west, south, east, north = source_footprint(source).bounds
    half = box(west - 1, south - 1, (west + east) / 2, north + 1)
    aoi = tmp_path / "west.geojson"
    aoi.write_text(json.dumps(mapping(half)))
    summary = summary_of(
        run_cli(queue, "--aoi", str(aoi), "--zoom", "21", "--source", source, "--json")
    )
    expected = set(cover(21, source=source, aoi=aoi))
    assert 0 < len(expected) < 1024 and summary["tiles_sent"] == len(expected)
    check_delivery(drain(sqs, queue), expected, source=source)


def test_cog_footprint(aerial: Path, sqs: Any, queue: str, requests_made: Counter[str]) -> None:
    summary = summary_of(run_cli(queue, "--source", str(aerial), "--zoom", "21", "--json"))
    expected = set(cover(21, source=str(aerial)))
    assert summary["tiles_sent"] == len(expected) == 1024
    assert summary["job"] == "rasterio_cogeo-z21"  # as `chipscale run` names it
    assert requests_made["SendMessageBatch"] == summary["requests"] == 2  # 16 packs of 64
    check_delivery(drain(sqs, queue), expected, source=str(aerial))


def test_stdin_and_max_tiles_per_message(sqs: Any, queue: str) -> None:
    tiles = block(1000, 2000, 12, 20, 20)
    text = "\n".join(f"{t.z}/{t.x}/{t.y}" for t in reversed(tiles))
    result = run_cli(
        "-", queue, "--source", SOURCE, "--max-tiles-per-message", "16", "--json", input=text
    )
    summary = summary_of(result)
    assert summary["job"] == "scene-z12"
    check_delivery(drain(sqs, queue), tiles, max_tiles=16)
    assert summary["messages_sent"] == 400 // 16  # 25 parents of 16 tiles, 2 zooms up


def test_tile_list_with_a_bad_line_sends_nothing(tmp_path: Path, sqs: Any, queue: str) -> None:
    path = write_list(tmp_path / "tiles.txt", block(0, 0, 10, 30, 30))
    with path.open("a") as handle:
        handle.write("5-5-3\n")  # valid, but at another zoom than --zoom
    result = run_cli(str(path), queue, "--source", SOURCE, "--zoom", "10")
    assert result.exit_code == 1
    assert "tile 3/5/5 is at zoom 3, not 10" in result.output
    with path.open("a") as handle:
        handle.write("nonsense\n")
    result = run_cli(str(path), queue, "--source", SOURCE)
    assert result.exit_code == 1 and "line 902" in result.output
    assert drain(sqs, queue) == []


# ----------------------------------------------------------------------------- chip-n-scale's call


def test_sqs_push_console_script_keeps_chip_n_scale_call(
    tmp_path: Path, sqs: Any, queue: str, moto_server: str
) -> None:
    """`sqs-push tiles.txt QUEUE_URL`, as chip-n-scale users type it: no source, the worker's
    configured imagery is read; tiles are packed all the same."""
    tiles = block(70_000, 40_000, 17, 30, 30)
    path = write_list(tmp_path / "tiles.txt", tiles)
    exe = Path(sys.executable).parent / "sqs-push"
    env = {**os.environ, "AWS_ENDPOINT_URL": moto_server}
    result = subprocess.run(
        [str(exe), str(path), queue], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "pushed 900 tiles" in result.stderr and "not recorded" in result.stderr
    check_delivery(drain(sqs, queue), tiles, job="tiles-z17", source=None)


def test_scripts_sqs_push_is_an_executable_entry(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "sqs-push"
    assert os.access(script, os.X_OK)
    path = write_list(tmp_path / "tiles.txt", block(0, 0, 8, 10, 10))
    result = subprocess.run([str(script), str(path), "--dry-run"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "would push 100 tiles" in result.stderr


def test_push_never_imports_torch(tmp_path: Path) -> None:
    path = write_list(tmp_path / "tiles.txt", block(0, 0, 8, 10, 10))
    exe = Path(sys.executable).parent / "sqs-push"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(exe), str(path), "--dry-run", "--source", XYZ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line
    }
    assert "chipscale.cloud.push" in imported
    assert not {name for name in imported if name.split(".")[0] in ("torch", "matplotlib")}


# ----------------------------------------------------------------------------- --stack


def test_stack_resolves_the_queue_records_the_job_and_resumes(
    tmp_path: Path, sqs: Any, local_lambda: list[dict], results_db: str
) -> None:
    """With --stack the queue comes from the outputs, and the job is recorded (and a resume
    learns the done tiles) through the operations Lambda, since the database is private."""
    stack = deploy_stack(chipscale_template())
    outputs = boto3.client("cloudformation").describe_stacks(StackName=stack)["Stacks"][0]
    queue_url = next(o["OutputValue"] for o in outputs["Outputs"] if o["OutputKey"] == "QueueUrl")
    tiles = block(500, 600, 11, 12, 12)
    path = write_list(tmp_path / "tiles.txt", tiles)
    summary = summary_of(run_cli(str(path), "--stack", stack, "--source", SOURCE, "--json"))
    assert summary["queue_url"] == queue_url
    check_delivery(drain(sqs, queue_url), tiles)
    with open_store(results_db) as store:
        info = store.get_job(summary["job"])
        assert info is not None and info.tiles_total == len(tiles)
        assert info.extra["pushed"] == len(tiles) and info.extra["push"]["state"] == "done"
        store.write([TileResult(info.job, t, "ok", {"a": 1.0}) for t in tiles[:100]])
    assert [e["action"] for e in local_lambda] == ["record-job", "record-job"]

    again = summary_of(
        run_cli(str(path), "--stack", stack, "--source", SOURCE, "--resume", "--json")
    )
    assert (again["skipped"], again["tiles_sent"]) == (100, len(tiles) - 100)
    check_delivery(drain(sqs, queue_url), tiles[100:])
    assert "done-tiles" in [e["action"] for e in local_lambda]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["https://sqs.us-east-1.amazonaws.com/1/q", "--stack", "s"], "not both"),
        ([], "give QUEUE_URL or --stack"),
        (["https://sqs.us-east-1.amazonaws.com/1/q", "--resume"], "--resume needs --db"),
        (["https://sqs.us-east-1.amazonaws.com/1/q", "--aoi", "a.geojson"], "not both"),
    ],
)
def test_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    path = write_list(tmp_path / "tiles.txt", block(0, 0, 8, 2, 2))
    result = run_cli(str(path), *args, "--source", SOURCE)
    assert result.exit_code == 2 and message in result.output


def test_source_is_required_unless_the_worker_default_is_asked_for(tmp_path: Path) -> None:
    path = write_list(tmp_path / "tiles.txt", block(0, 0, 8, 2, 2))
    result = run_cli(str(path), "--dry-run")
    assert result.exit_code == 2 and "--worker-source" in result.output
    assert run_cli(str(path), "--dry-run", "--worker-source").exit_code == 0
    result = run_cli(str(path), "--dry-run", "--source", "https://h/{z}/{x}.png")
    assert result.exit_code == 2 and "{y}" in result.output
    result = run_cli("--bbox", "0,0,1,1", "--zoom", "10", "--dry-run", "--source", XYZ)
    assert result.exit_code == 0  # an XYZ source is covered through --bbox, not a footprint
    result = run_cli("--zoom", "10", "--dry-run", "--source", XYZ)
    assert result.exit_code == 2 and "no footprint" in result.output


# ----------------------------------------------------------------------------- failures


class FlakyClient:
    """The real moto client, except that chosen calls fail: ``fail(call, entries)`` returns
    the Ids to answer as ``Failed`` (without sending them), or raises for the whole call."""

    def __init__(self, client: Any, fail: Callable[[int, list[dict[str, str]]], dict[str, bool]]):
        self.client = client
        self.fail = fail
        self.calls = 0

    def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, str]]) -> dict[str, Any]:
        self.calls += 1
        assert len(Entries) <= 10 and len({e["Id"] for e in Entries}) == len(Entries)
        failing = self.fail(self.calls, Entries)  # Id -> SenderFault
        send = [e for e in Entries if e["Id"] not in failing]
        response: dict[str, Any] = {"Successful": [], "Failed": []}
        if send:
            response = dict(self.client.send_message_batch(QueueUrl=QueueUrl, Entries=send))
            response.setdefault("Failed", [])
        response["Failed"] = list(response["Failed"]) + [
            {
                "Id": i,
                "SenderFault": fault,
                "Code": "InternalError" if not fault else "InvalidParameterValue",
                "Message": "injected",
            }
            for i, fault in failing.items()
        ]
        return response


def throttled() -> ClientError:
    return ClientError(
        {
            "Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"},
            "ResponseMetadata": {"HTTPStatusCode": 400},
        },
        "SendMessageBatch",
    )


def test_failed_entries_and_errors_are_retried_until_every_tile_is_sent_once(
    sqs: Any, queue: str
) -> None:
    def fail(call: int, entries: list[dict[str, str]]) -> dict[str, bool]:
        if call == 1:
            raise throttled()
        if call == 2:
            raise EndpointConnectionError(endpoint_url="http://sqs")
        return {e["Id"]: False for e in entries if call <= 6 and int(e["Id"]) % 3 == 0}

    client = FlakyClient(sqs, fail)
    sleeps: list[float] = []
    tiles = block(3000, 3000, 13, 40, 40)
    summary = push(
        tiles,
        job="j",
        source=SOURCE,
        queue_url=queue,
        client=client,
        concurrency=1,
        sleep=sleeps.append,
    )
    assert summary.ok and summary.tiles_sent == len(tiles)
    assert summary.requests == client.calls > summary.messages / 10
    assert sleeps and all(s >= 0 for s in sleeps)
    check_delivery(drain(sqs, queue), tiles)


def test_backoff_grows_with_jitter_and_gives_up() -> None:
    policy = RetryPolicy(max_attempts=5, base_delay=0.5, max_delay=2.0)
    rng = random.Random(7)
    caps = [min(2.0, 0.5 * 2 ** (n - 1)) for n in range(1, 5)]
    delays = [policy.delay(n, rng) for n in range(1, 5)]
    assert all(0 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    assert caps == [0.5, 1.0, 2.0, 2.0]

    class AlwaysFailing:
        calls = 0

        def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, str]]) -> Any:
            self.calls += 1
            return {
                "Failed": [
                    {
                        "Id": e["Id"],
                        "SenderFault": False,
                        "Code": "InternalError",
                        "Message": "try later",
                    }
                    for e in Entries
                ]
            }

    client, sleeps = AlwaysFailing(), []
    sender = BatchSender(client, "q", policy=policy, sleep=sleeps.append, rng=rng)
    outcome = sender.send([Entry("{}", 3, 2), Entry("{}", 4, 2)])
    assert client.calls == outcome.requests == 5 and len(sleeps) == 4
    assert [e.tiles for e, _ in outcome.failed] == [3, 4] and not outcome.sent
    assert outcome.failed[0][1] == "InternalError: try later (gave up after 5 tries)"


def test_sender_fault_is_not_retried_and_exits_1(
    tmp_path: Path, sqs: Any, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fakes: list[FlakyClient] = []

    def fake_client(**_: Any) -> FlakyClient:
        fakes.append(FlakyClient(sqs, lambda call, entries: {"0": True} if call == 1 else {}))
        return fakes[-1]

    monkeypatch.setattr(push_send, "sqs_client", fake_client)
    tiles = block(3000, 3000, 13, 40, 40)
    path = write_list(tmp_path / "tiles.txt", tiles)
    result = run_cli(str(path), queue, "--source", SOURCE, "--concurrency", "1")
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: 64 tiles in 1 message could not be queued: ")
    assert "InvalidParameterValue: injected" in last
    bodies = drain(sqs, queue)
    assert fakes[0].calls == len(bodies) // 10 + 1  # nothing sent twice, nothing retried
    sent = {Tile(*t) for body in bodies for t in body["tiles"]}
    assert len(sent) == len(tiles) - 64


def test_a_missing_queue_stops_the_push_with_one_line(tmp_path: Path, sqs: Any) -> None:
    path = write_list(tmp_path / "tiles.txt", block(0, 0, 12, 60, 60))
    missing = sqs.create_queue(QueueName="gone")["QueueUrl"]
    sqs.delete_queue(QueueUrl=missing)
    db = f"sqlite:///{tmp_path / 'results.db'}"
    result = run_cli(str(path), missing, "--source", SOURCE, "--db", db)
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: SQS refused the batch") and "(0 tiles were sent before)" in last
    assert "Traceback" not in result.output
    with open_store(db) as store:
        job = store.get_job("scene-z12")
    assert job is not None and job.tiles_total == 3600
    assert job.extra["pushed"] == 0 and job.extra["push"]["state"] == "aborted"


def test_without_db_the_job_is_said_not_recorded(tmp_path: Path, sqs: Any, queue: str) -> None:
    path = write_list(tmp_path / "tiles.txt", block(0, 0, 9, 8, 8))
    result = run_cli(str(path), queue, "--source", SOURCE)
    assert result.exit_code == 0
    assert "job scene-z9 not recorded in a results store (give --db or --stack)" in result.output


# ----------------------------------------------------------------------------- dry run, resume


def test_dry_run_makes_no_aws_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.client import BaseClient

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("an AWS call in a dry run")

    monkeypatch.setattr(BaseClient, "_make_api_call", refuse)
    tiles = block(3000, 3000, 13, 40, 40)
    path = write_list(tmp_path / "tiles.txt", tiles)
    result = run_cli(
        str(path), "--stack", "never-resolved", "--source", SOURCE, "--dry-run", "--json"
    )
    summary = summary_of(result)
    assert summary["dry_run"] and summary["tiles"] == 1600
    assert summary["messages"] == 25 and summary["requests"] == 3
    assert summary["bytes"] > 1600 * 10
    assert "would push 1,600 tiles in 25 messages with 3 SQS requests" in result.output


def test_dry_run_needs_no_aws_configuration(tmp_path: Path) -> None:
    path = write_list(tmp_path / "tiles.txt", block(0, 0, 10, 32, 32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    result = subprocess.run(
        [sys.executable, "-m", "chipscale.cli", "push", str(path), "--dry-run", "--worker-source"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "would push 1,024 tiles in 16 messages with 2 SQS requests" in result.stderr


def test_resume_skips_done_tiles_and_records_the_job(tmp_path: Path, sqs: Any, queue: str) -> None:
    tiles = block(3000, 3000, 13, 40, 40)
    db = f"sqlite:///{tmp_path / 'results.db'}"
    done, errored = tiles[:700], tiles[700:710]
    with open_store(db) as store:
        store.start_job(
            JobInfo(
                job="j",
                source=SOURCE,
                zoom=13,
                model_name="m",
                model_version="3",
                classes=("a", "b"),
                extra={"note": 1},
            )
        )
        store.write([TileResult(job="j", tile=t, status="ok", output={"a": 1.0}) for t in done])
        store.write([TileResult(job="j", tile=t, status="error", error="x") for t in errored])
        store.write([TileResult(job="other", tile=t, status="ok") for t in tiles[700:]])
    path = write_list(tmp_path / "tiles.txt", tiles)
    summary = summary_of(
        run_cli(
            str(path), queue, "--source", SOURCE, "--job", "j", "--db", db, "--resume", "--json"
        )
    )
    assert summary["skipped"] == 700 and summary["tiles_sent"] == 900
    check_delivery(drain(sqs, queue), tiles[700:])  # error tiles are pushed again
    with open_store(db) as store:
        job = store.get_job("j")
    assert job is not None
    assert job.tiles_total == 1600 and job.zoom == 13 and job.source == SOURCE
    assert (job.model_name, job.model_version, job.classes) == ("m", "3", ("a", "b"))
    assert job.extra["note"] == 1 and job.extra["pushed"] == 900
    assert job.extra["push"]["state"] == "done" and job.extra["push"]["queue"] == queue


def test_dry_run_with_resume_counts_without_recording(tmp_path: Path) -> None:
    tiles = block(0, 0, 10, 10, 10)
    db = f"sqlite:///{tmp_path / 'results.db'}"
    with open_store(db) as store:
        store.write([TileResult(job="j", tile=t, status="empty") for t in tiles[:40]])
    path = write_list(tmp_path / "tiles.txt", tiles)
    result = run_cli(
        str(path), "--source", SOURCE, "--job", "j", "--db", db, "--resume", "--dry-run"
    )
    assert result.exit_code == 0 and "would push 60 tiles (40 skipped as done)" in result.output
    with open_store(db) as store:
        assert store.get_job("j") is None


# ----------------------------------------------------------------------------- the library


@given(
    st.integers(0, 30).flatmap(
        lambda z: st.tuples(st.integers(0, 2**z - 1), st.integers(0, 2**z - 1), st.just(z))
    )
)
@example((2**30 - 1, 2**30 - 1, 30))
@example((0, 0, 0))
def test_keys_round_trip(xyz: tuple[int, int, int]) -> None:
    x, y, z = xyz
    keys = encode_tiles([x], [y], [z])
    assert [int(v[0]) for v in decode_keys(keys)] == [x, y, z]


@given(st.lists(st.tuples(st.integers(0, 2**18 - 1), st.integers(0, 2**18 - 1)), max_size=50))
def test_key_order_is_zoom_then_quadkey(points: list[tuple[int, int]]) -> None:
    tiles = [Tile(x, y, 18) for x, y in points] + [Tile(x >> 5, y >> 5, 13) for x, y in points]
    with plan_push(tiles) as plan:
        ordered = list(plan.tiles())
    assert ordered == sorted(set(tiles), key=lambda t: (t.z, mercantile.quadkey(t)))


def test_plan_in_small_chunks_merges_runs_and_cleans_up(tmp_path: Path) -> None:
    """A list bigger than one chunk is sorted in runs on disk and merged: the same tiles in
    the same order as in memory, duplicates across runs dropped, temporary files removed."""
    tiles = block(100, 100, 12, 30, 30)
    shuffled = tiles + tiles[::7]
    random.Random(3).shuffle(shuffled)
    with plan_push(shuffled) as whole:
        expected = list(whole.tiles())
    with plan_push(shuffled, chunk_tiles=97, workdir=tmp_path) as plan:
        assert plan.total == len(tiles) and len(list(tmp_path.iterdir())) == 1
        assert list(plan.tiles()) == expected
        assert {b.dtype.name for b in plan.blocks(size=64)} == {"uint64"}
        assert plan.skip_done(set(tiles[:100]) | {Tile(0, 0, 5)}) == 100
        assert list(plan.tiles()) == [t for t in expected if t not in set(tiles[:100])]
    assert list(tmp_path.iterdir()) == []


def test_batches_respect_entry_count_and_payload_limits() -> None:
    small = [Entry("x", 1, 10)] * 25
    assert [len(b) for b in batch_entries(small)] == [10, 10, 5]
    big = [Entry("x", 1, 100_000)] * 5
    assert [len(b) for b in batch_entries(big)] == [2, 2, 1]  # 256 KiB a batch


@pytest.mark.parametrize(
    "source",
    ["s3://b/scene.tif", "https://h/{z}/{x}/{y}.png", "http://h/t?z={z}&x={x}&y={y}", "a.tif"],
)
def test_valid_sources(source: str) -> None:
    assert validate_source(source) == source


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("https://h/{z}/{x}.png", "no {y}"),
        ("https://h/{s}/{z}/{x}/{y}", "unknown {s}"),
        ("https://h/{z}/{x}/{y", "unmatched"),
        ("s3://b/{z}/{x}/{y}.png", "http(s)"),
        (" ", "empty"),
    ],
)
def test_invalid_sources(source: str, reason: str) -> None:
    with pytest.raises(PushError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        validate_source(source)


def test_region_comes_from_the_queue_url() -> None:
    assert region_from_queue_url("https://sqs.ap-southeast-2.amazonaws.com/1/q") == (
        "ap-southeast-2"
    )
    assert region_from_queue_url("https://eu-west-1.queue.amazonaws.com/1/q") == "eu-west-1"
    assert region_from_queue_url("http://localhost:4566/000000000000/q") is None


@pytest.mark.parametrize(
    ("job", "reason"),
    [
        ("", "job is empty"),
        ("x" * 201, "longer than 200"),
        ("tab\there", "control character"),
        ("nul\x00", "control character"),
    ],
)
def test_a_job_the_workers_would_refuse_is_refused_before_pushing(
    tmp_path: Path, job: str, reason: str
) -> None:
    path = write_list(tmp_path / "tiles.txt", block(0, 0, 8, 2, 2))
    result = run_cli(str(path), "--source", SOURCE, "--job", job, "--dry-run")
    assert result.exit_code == 2 and reason in result.output
