"""The reliability harness: the real local stack, driven as the cloud drives it.

What runs, all of it real except AWS itself (moto's server stands in for SQS, S3 and
Secrets Manager):

- a queue with its dead-letter queue (``RedrivePolicy``), made per test in moto's SQS;
- the imagery: the NAIP COG (and copies under other keys) in a moto bucket, read through
  GDAL's ``/vsis3/`` exactly as the Lambda reads it; optionally through :class:`Forwarder`,
  a process in front of moto's S3 that a test can kill to make the COG unreachable;
- ``chipscale push`` (the real CLI, in process) filling the queue from a tile list;
- :class:`Pollers`: N subprocesses, each one warm Lambda container running
  ``lambdas/sqs_worker.py`` under ``poller.py``, the local event source;
- the real TorchServe (the session fixture, or an instance of a test's own where the test
  kills it) and the real PostgreSQL (the shared server for load, a throwaway cluster for
  restarts), the database URL coming from the stack-shaped secret in moto.

Figures (tiles, recovery times, TorchServe requests) are reported, never asserted on: they
go to ``CHIPSCALE_RELIABILITY_REPORT`` as JSON lines when that is set (bench/reliability.py
sets it), and to stdout.

Not a conftest.py: a second ``conftest`` module beside tests/conftest.py would shadow it for
the test modules that ``from conftest import`` (pytest puts non-package conftests in
``sys.modules`` under that one name). Test modules import what they need from here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import boto3
import psutil
import pytest
from conftest import free_port, wait_for_port
from mercantile import Tile

from chipscale import names

HERE = Path(__file__).resolve().parent
POLLER = HERE / "poller.py"
FORWARDER = HERE / "forwarder.py"

#: Where the tests append their figures (JSON lines); bench/reliability.py sets it.
REPORT_ENV = "CHIPSCALE_RELIABILITY_REPORT"
#: Tiles of the load run: 10,000 under ``make test``, 100,000 under ``make soak``.
SOAK_TILES_ENV = "CHIPSCALE_SOAK_TILES"
DEFAULT_SOAK_TILES = 10_000
#: Pollers (Lambda containers) of the load run: two for the two cores of the dev machines.
SOAK_POLLERS_ENV = "CHIPSCALE_SOAK_POLLERS"
DEFAULT_SOAK_POLLERS = 2

#: The worker's settings as the stack sets them.
MAX_TILES_PER_MESSAGE = 100
#: The database password in the stack-shaped secret: distinctive, so a leak is findable. The
#: machine's PostgreSQL trusts loopback, so any password opens it.
DB_PASSWORD = "pw-Rel14bility;'\"-9f3c"

T = TypeVar("T")


# ----------------------------------------------------------------------------- reporting


def report(section: str, figures: dict[str, Any]) -> None:
    """Record a test's figures: printed, and appended to ``$CHIPSCALE_RELIABILITY_REPORT``."""
    line = json.dumps({"section": section, **figures}, sort_keys=True)
    print(line)
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(line + "\n")


def soak_tiles() -> int:
    return int(os.environ.get(SOAK_TILES_ENV) or DEFAULT_SOAK_TILES)


def soak_pollers() -> int:
    return int(os.environ.get(SOAK_POLLERS_ENV) or DEFAULT_SOAK_POLLERS)


def wait_for(
    what: str,
    check: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.25,
    diagnose: Callable[[], str] | None = None,
) -> T:
    """Poll ``check`` until it returns something truthy; fail the test (saying what was
    awaited and the state of things) after ``timeout`` seconds, so a hang is a failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            state = diagnose() if diagnose else ""
            pytest.fail(f"{what}: not reached in {timeout:.0f} s. {state}")
        time.sleep(interval)


# ----------------------------------------------------------------------------- imagery


def tiles_of(source: Path, count: int, *, skip: int = 0, min_zoom: int = 20) -> list[Tile]:
    """``count`` tiles inside the footprint of ``source``, rows north to south, at the
    coarsest zoom from ``min_zoom`` whose cover holds ``skip + count`` tiles (NAIP: 25,205
    at zoom 20, 100,171 at 21). Whole rows of a footprint: adjacent tiles, dense packs."""
    from chipscale.sources.footprint import cover

    for zoom in range(min_zoom, 25):
        tiles = sorted(cover(zoom, source=str(source)), key=lambda t: (t.y, t.x))
        if len(tiles) >= skip + count:
            return tiles[skip : skip + count]
    raise ValueError(f"{source} has no zoom with {skip + count} tiles")


@dataclass(frozen=True)
class Imagery:
    """A moto bucket holding the real NAIP COG (and copies), a text file and an HTML page."""

    moto: str
    bucket: str
    naip_local: Path

    @property
    def naip(self) -> str:
        return f"s3://{self.bucket}/naip.tif"

    def key(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def http(self, key: str) -> str:
        """The plain http URL of a public-read object (moto, path style)."""
        return f"{self.moto}/{self.bucket}/{key}"

    def upload(self, path: Path, key: str) -> str:
        boto3.client("s3", endpoint_url=self.moto).upload_file(str(path), self.bucket, key)
        return self.key(key)

    def copies(self, count: int) -> list[str]:
        """``count`` more copies of the NAIP COG under keys of their own: each a source the
        workers have not opened yet (a fresh open reaches S3; a warm reader may not)."""
        s3 = boto3.client("s3", endpoint_url=self.moto)
        out = []
        for i in range(count):
            key = f"naip-copy-{uuid.uuid4().hex[:8]}-{i}.tif"
            s3.upload_file(str(self.naip_local), self.bucket, key)
            out.append(self.key(key))
        return out


def make_imagery(moto: str, naip: Path) -> Imagery:
    s3 = boto3.client("s3", endpoint_url=moto)
    bucket = f"imagery-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(naip), bucket, "naip.tif")
    s3.put_object(
        Bucket=bucket, Key="notes.txt", Body=b"not a raster\n" * 200, ContentType="text/plain"
    )
    page = b"<!doctype html><html><body><h1>Not a raster</h1></body></html>\n"
    s3.put_object(
        Bucket=bucket, Key="page.html", Body=page, ContentType="text/html", ACL="public-read"
    )
    return Imagery(moto=moto, bucket=bucket, naip_local=naip)


# ----------------------------------------------------------------------------- queues


@dataclass
class Queues:
    """A work queue and its dead-letter queue in moto, as the stack makes them."""

    sqs: Any
    url: str
    arn: str
    dlq: str
    visibility: int
    max_receive: int

    def _depth(self, url: str) -> int:
        attrs = self.sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )["Attributes"]
        return sum(int(v) for v in attrs.values())

    def depth(self) -> int:
        """Messages in the queue, visible, in flight or delayed."""
        return self._depth(self.url)

    def dlq_depth(self) -> int:
        return self._depth(self.dlq)

    def dlq_bodies(self) -> list[str]:
        """The bodies in the dead-letter queue (each hidden for 30 s once read here)."""
        bodies: list[str] = []
        while got := self.sqs.receive_message(
            QueueUrl=self.dlq, MaxNumberOfMessages=10, VisibilityTimeout=30
        ).get("Messages", []):
            bodies.extend(m["Body"] for m in got)
        return bodies

    def send(self, bodies: Iterable[str]) -> None:
        """Send raw bodies, ten a request (what a misbehaving producer would send)."""
        pending = list(bodies)
        for start in range(0, len(pending), 10):
            entries = [
                {"Id": str(i), "MessageBody": body}
                for i, body in enumerate(pending[start : start + 10])
            ]
            answer = self.sqs.send_message_batch(QueueUrl=self.url, Entries=entries)
            assert not answer.get("Failed"), answer["Failed"]


def make_queues(moto: str, *, visibility: int, max_receive: int) -> Queues:
    sqs = boto3.client("sqs", endpoint_url=moto)
    name = f"reliability-{uuid.uuid4().hex[:10]}"
    dlq = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive)}
    url = sqs.create_queue(
        QueueName=name,
        Attributes={"VisibilityTimeout": str(visibility), "RedrivePolicy": json.dumps(redrive)},
    )["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    return Queues(sqs, url, arn, dlq, visibility, max_receive)


# ----------------------------------------------------------------------------- database


@dataclass(frozen=True)
class Database:
    """A results database as the worker reaches it: host, port and name in the environment
    and the secret (with :data:`DB_PASSWORD`)."""

    host: str
    port: int
    name: str

    @classmethod
    def of(cls, url: str) -> Database:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5432, parts.path.lstrip("/"))


def query(url: str, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
        return conn.execute(sql, tuple(params)).fetchall()


def count_rows(url: str, jobs: Iterable[str]) -> int | None:
    """Result rows of ``jobs``; None while the database cannot be reached (a restart)."""
    import psycopg

    try:
        rows = query(url, "SELECT count(*) FROM results WHERE job = ANY(%s)", (list(jobs),))
    except psycopg.Error:
        return None
    return int(rows[0][0])


def postmaster_pid(data_dir: Path) -> int:
    """The PostgreSQL server's PID, from the first line of its ``postmaster.pid``."""
    return int((data_dir / "postmaster.pid").read_text().split()[0])


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    with suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(timeout)


# ----------------------------------------------------------------------------- TorchServe


def inference_requests(metrics_url: str) -> int:
    """TorchServe's ``ts_inference_requests_total``, summed over its labels (Prometheus)."""
    import urllib.request

    with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("ts_inference_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def kill_torchserve(server: Any) -> list[int]:
    """SIGKILL TorchServe's frontend JVM and its Python workers, by PID (a crashed host, not
    a stop); returns the PIDs killed. The launcher exits when its JVM is gone."""
    launcher = psutil.Process(server.process.pid)
    victims = [p for p in launcher.children(recursive=True) if p.is_running()]
    for proc in victims:
        with suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    with suppress(subprocess.TimeoutExpired):
        server.process.wait(30)
    server.stop()  # forgets the dead launcher (and reaps anything left of its group)
    return [p.pid for p in victims]


# ----------------------------------------------------------------------------- forwarder


class Forwarder:
    """``forwarder.py`` in a process of its own, on a port fixed for its life, so the test
    can kill it (S3 unreachable: connections refused) and start it again on the same port."""

    def __init__(self, upstream: str, log_dir: Path) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"forwarder-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(FORWARDER), str(self.port), self.upstream, str(os.getpid())],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not wait_for_port(self.port, timeout=30):
            self.stop()
            pytest.fail(f"the S3 forwarder did not listen on {self.port}; see {self.log}")

    def kill(self) -> int:
        """SIGKILL the forwarder by PID; returns the PID."""
        assert self.process is not None
        pid = self.process.pid
        os.kill(pid, signal.SIGKILL)
        self.process.wait(30)
        self.process = None
        return pid

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(30)


# ----------------------------------------------------------------------------- the workers


def worker_environment(
    *,
    moto: str,
    model_url: str,
    secret_arn: str,
    db: Database,
    allowed_sources: Iterable[str],
    s3_endpoint: str | None = None,
) -> dict[str, str]:
    """The environment the stack gives the worker Lambda, pointing at the local stack."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CHIPSCALE_", "AWS_", "PYTEST_", "POWERTOOLS_", "GDAL_", "CPL_"))
    }
    env.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": moto,
            "AWS_LAMBDA_FUNCTION_NAME": "chipscale-worker",
            "POWERTOOLS_SERVICE_NAME": names.WORKER_SERVICE,
            "PGSSLMODE": "disable",  # the local servers have no TLS
            names.ENV_MODEL_URL: model_url,
            names.ENV_DB_SECRET_ARN: secret_arn,
            names.ENV_DB_HOST: db.host,
            names.ENV_DB_NAME: db.name,
            names.ENV_ALLOWED_SOURCES: ",".join(allowed_sources),
            names.ENV_MAX_TILES_PER_MESSAGE: str(MAX_TILES_PER_MESSAGE),
        }
    )
    if s3_endpoint:
        env["AWS_ENDPOINT_URL_S3"] = s3_endpoint  # S3 (GDAL and boto3) through the forwarder
    return env


def make_secret(moto: str, db: Database, password: str = DB_PASSWORD) -> str:
    """The stack's database secret (RDS's shape) in moto's Secrets Manager; its ARN."""
    client = boto3.client("secretsmanager", endpoint_url=moto)
    secret = {"username": "postgres", "password": password, "host": "instance", "port": db.port}
    return client.create_secret(
        Name=f"chipscale-db-{uuid.uuid4().hex[:10]}", SecretString=json.dumps(secret)
    )["ARN"]


@dataclass
class PollerProcess:
    process: subprocess.Popen[bytes]
    journal: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL by PID: a container that dies, with nothing cleaned up."""
        os.kill(self.pid, signal.SIGKILL)
        self.process.wait(30)


@dataclass
class Pollers:
    """Poller subprocesses sharing one queue and one environment; stopped on exit."""

    queues: Queues
    env: dict[str, str]
    workdir: Path
    batch_size: int = 4
    window: float = 0.5
    function_timeout: float = 30.0
    started: list[PollerProcess] = field(default_factory=list)

    @property
    def stop_file(self) -> Path:
        return self.workdir / "stop"

    def start(self, count: int = 1, extra_env: dict[str, str] | None = None) -> list[PollerProcess]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        out = []
        for _ in range(count):
            n = len(self.started)
            journal, log = self.workdir / f"journal-{n}.jsonl", self.workdir / f"poller-{n}.log"
            command = [
                sys.executable,
                str(POLLER),
                "--queue-url", self.queues.url,
                "--queue-arn", self.queues.arn,
                "--journal", str(journal),
                "--stop-file", str(self.stop_file),
                "--batch-size", str(self.batch_size),
                "--window", str(self.window),
                "--function-timeout", str(self.function_timeout),
                "--parent-pid", str(os.getpid()),
            ]  # fmt: skip
            with log.open("ab") as log_file:
                process = subprocess.Popen(
                    command,
                    env={**self.env, **(extra_env or {})},
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                )
            poller = PollerProcess(process, journal, log)
            self.started.append(poller)
            out.append(poller)
        return out

    def stop(self, timeout: float = 60.0) -> None:
        """Ask every poller to finish its invocation and exit; kill what does not."""
        self.stop_file.touch()
        deadline = time.monotonic() + timeout
        for poller in self.started:
            with suppress(subprocess.TimeoutExpired):
                poller.process.wait(max(0.1, deadline - time.monotonic()))
            if poller.process.poll() is None:
                poller.process.kill()
                poller.process.wait(30)

    def crashed(self) -> list[str]:
        """Pollers that exited on their own with an error (a bug in the harness or worker)."""
        return [
            f"poller {p.pid} exited {p.process.returncode}: {tail(p.log)}"
            for p in self.started
            if p.process.poll() not in (None, 0, -signal.SIGKILL)
        ]

    def journal(self) -> Journal:
        events: list[dict[str, Any]] = []
        for poller in self.started:
            if poller.journal.exists():
                for line in poller.journal.read_text().splitlines():
                    with suppress(ValueError):  # a line cut short by a kill
                        events.append(json.loads(line))
        return Journal(events)

    def logs(self) -> str:
        return "".join(p.log.read_text(errors="replace") for p in self.started if p.log.exists())

    def __enter__(self) -> Pollers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(timeout=60 if exc[0] is None else 5)


def tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Journal:
    """What the pollers recorded: one event per invocation (see poller.py)."""

    events: list[dict[str, Any]]

    @property
    def invocations(self) -> list[dict[str, Any]]:
        return sorted(
            (e for e in self.events if e["event"] in ("batch", "hold")), key=lambda e: e["t0"]
        )

    def records(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        for invocation in self.invocations:
            for record in invocation["records"]:
                yield invocation, record

    def receive_counts(self) -> dict[str, list[int]]:
        counts: dict[str, list[int]] = {}
        for _, record in self.records():
            counts.setdefault(record["id"], []).append(record["receive_count"])
        return counts

    def failures_after(self, t: float, until: float | None = None) -> list[tuple[float, str]]:
        """(end time, error) of each failed record of invocations that ended after ``t``
        (and before ``until``)."""
        out = []
        for invocation in self.invocations:
            if invocation["t1"] < t or (until is not None and invocation["t1"] >= until):
                continue
            failed = [r for r in invocation["records"] if not r["ok"]]
            reasons = invocation["errors"] or [invocation.get("raised") or "?"]
            out.extend(
                (invocation["t1"], reasons[min(i, len(reasons) - 1)]) for i in range(len(failed))
            )
        return out

    def failed_ids_after(self, t: float, until: float | None = None) -> set[str]:
        return {
            r["id"]
            for i, r in self.records()
            if i["t1"] >= t and (until is None or i["t1"] < until) and not r["ok"]
        }

    def first_success(self, *, ended_after: float, ids: set[str] | None = None) -> float | None:
        """End of the first invocation, ended after ``ended_after``, that completed a message
        (one of ``ids``, if given)."""
        ends = [
            i["t1"]
            for i, r in self.records()
            if i["event"] == "batch"
            and i["t1"] >= ended_after
            and r["ok"]
            and (ids is None or r["id"] in ids)
        ]
        return min(ends, default=None)

    def errors(self) -> list[str]:
        return [e for i in self.invocations for e in i["errors"]] + [
            i["raised"] for i in self.invocations if i.get("raised")
        ]

    def delete_failures(self) -> list[str]:
        return [m for i in self.invocations for m in i.get("delete_failed", [])]


# ----------------------------------------------------------------------------- a run


def push(
    queue_url: str, source: str, tiles: list[Tile], *, job: str, db_url: str, work: Path
) -> dict[str, Any]:
    """``chipscale push TILES QUEUE --source ... --db ...`` in process; its JSON summary."""
    from click.testing import CliRunner

    from chipscale.cli import cli

    work.mkdir(parents=True, exist_ok=True)
    tile_list = work / f"{uuid.uuid4().hex[:8]}.tiles"
    tile_list.write_text("".join(f"{t.z}/{t.x}/{t.y}\n" for t in tiles))
    done = CliRunner().invoke(
        cli,
        [
            "push",
            str(tile_list),
            queue_url,
            "--source",
            source,
            "--job",
            job,
            "--db",
            db_url,
            "--json",
        ],
        catch_exceptions=False,
    )
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["tiles_sent"] == len(set(tiles)), summary
    return summary


@dataclass
class Run:
    """One run of the stack over some jobs: what was pushed, and the checks every run must
    pass afterwards (each tile exactly once, nothing in error from a transient fault, queue
    and dead-letter queue empty)."""

    queues: Queues
    db_url: str
    pollers: Pollers
    expected: dict[str, set[Tile]] = field(default_factory=dict)
    summaries: list[dict[str, Any]] = field(default_factory=list)

    def push(self, source: str, tiles: list[Tile], job: str) -> dict[str, Any]:
        summary = push(
            self.queues.url, source, tiles, job=job, db_url=self.db_url, work=self.pollers.workdir
        )
        self.expected.setdefault(job, set()).update(tiles)
        self.summaries.append(summary)
        return summary

    @property
    def total(self) -> int:
        return sum(len(t) for t in self.expected.values())

    def done(self) -> int:
        return count_rows(self.db_url, self.expected) or 0

    def state(self) -> str:
        """For failure messages: progress, queues, poller crashes and recent errors."""
        try:
            depth, dlq = self.queues.depth(), self.queues.dlq_depth()
        except Exception as exc:
            depth = dlq = f"? ({exc})"  # type: ignore[assignment]
        journal = self.pollers.journal()
        return (
            f"rows {self.done()}/{self.total}, queue {depth}, dlq {dlq}, "
            f"crashed {self.pollers.crashed()}, last errors {journal.errors()[-3:]}"
        )

    def wait_progress(self, fraction: float, timeout: float) -> None:
        target = int(self.total * fraction)
        wait_for(
            f"{target} of {self.total} tiles written",
            lambda: self.done() >= target,
            timeout=timeout,
            diagnose=self.state,
        )

    def wait_failure(self, since: float, timeout: float) -> float:
        """Wait until a poller reports a failed message after ``since`` (the fault bit);
        returns the time of that failure."""

        def first() -> float | None:
            failures = self.pollers.journal().failures_after(since)
            return min((t for t, _ in failures), default=None)

        return wait_for(
            "a failure caused by the fault", first, timeout=timeout, diagnose=self.state
        )

    def wait_drained(self, timeout: float) -> float:
        """Wait until every tile has its row and the queue is empty; returns that time."""

        def drained() -> bool:
            return self.done() >= self.total and self.queues.depth() == 0

        wait_for(
            "queue drained with every tile written",
            drained,
            timeout=timeout,
            interval=0.5,
            diagnose=self.state,
        )
        return time.time()

    def verify(self, *, errors_allowed: bool = False) -> dict[str, int]:
        """The checks after a run; returns figures (rows, ok, empty, reprocessed)."""
        assert not self.pollers.crashed()
        rows = query(
            self.db_url,
            "SELECT job, z, x, y, status, attempts, error FROM results WHERE job = ANY(%s)",
            (list(self.expected),),
        )
        seen: dict[tuple[str, int, int, int], int] = {}
        for job, z, x, y, *_ in rows:
            seen[(job, z, x, y)] = seen.get((job, z, x, y), 0) + 1
        duplicates = sum(n - 1 for n in seen.values())
        assert duplicates == 0
        for job, tiles in self.expected.items():
            stored = {Tile(x, y, z) for (j, z, x, y) in seen if j == job}
            missing, extra = tiles - stored, stored - tiles
            assert not missing and not extra, (
                f"job {job}: {len(missing)} tiles missing (e.g. {sorted(missing)[:3]}), "
                f"{len(extra)} not pushed (e.g. {sorted(extra)[:3]})"
            )
        statuses = {s: sum(1 for r in rows if r[4] == s) for s in ("ok", "empty", "error")}
        if not errors_allowed:
            errors = [r[6] for r in rows if r[4] == "error"]
            assert not errors, f"{len(errors)} error rows from a transient fault: {errors[:3]}"
        assert self.queues.depth() == 0
        assert self.queues.dlq_depth() == 0, self.queues.dlq_bodies()[:3]
        assert not self.pollers.journal().delete_failures()
        return {
            "tiles_pushed": self.total,
            "rows": len(rows),
            "duplicates": duplicates,
            "lost": sum(len(t) for t in self.expected.values()) - len(seen),
            "ok": statuses["ok"],
            "empty": statuses["empty"],
            "error": statuses["error"],
            "reprocessed_tiles": sum(r[5] - 1 for r in rows),
            "messages": sum(s["messages_sent"] for s in self.summaries),
        }


def fault_figures(
    fault: str,
    journal: Journal,
    *,
    injected: float,
    healed: float | None,
    drained: float,
    until: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The recovery figures of one fault (seconds from its injection):

    - ``outage_s``: until the test healed it (restarted the process; None: nothing to heal);
    - ``first_success_after_heal_s``: until the first message completed after the heal (or
      after the injection when there is nothing to heal): the service is usable again;
    - ``failed_work_done_s``: until the first message that failed during the fault was
      done, on a redelivery (so it includes the visibility timeout); None: nothing failed;
    - ``drained_s``: until every tile had its row and the queue was empty.

    ``until`` ends the fault's window where a later fault of the same run begins.
    """
    failed = journal.failed_ids_after(injected, until)
    back = journal.first_success(ended_after=healed or injected)
    redone = journal.first_success(ended_after=injected, ids=failed) if failed else None

    def since(t: float | None) -> float | None:
        return None if t is None else round(t - injected, 2)

    return {
        "fault": fault,
        "outage_s": since(healed),
        "first_success_after_heal_s": since(back),
        "failed_work_done_s": since(redone),
        "drained_s": since(drained),
        "failed_deliveries": len(journal.failures_after(injected, until)),
        "messages_failed": len(failed),
        "max_receive_count": max(
            (
                r["receive_count"]
                for i, r in journal.records()
                if i["t1"] >= injected and (until is None or i["t1"] < until)
            ),
            default=0,
        ),
        **extra,
    }


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def imagery(moto_server: str, naip: Path) -> Imagery:
    """A bucket of the module's own holding the NAIP COG, a text file and an HTML page."""
    return make_imagery(moto_server, naip)


@pytest.fixture
def aws(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """boto3 in this process (the push) pointed at moto; yields moto's URL."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_S3_ENDPOINT", "AWS_HTTPS", "AWS_VIRTUAL_HOSTING"):
        monkeypatch.delenv(key, raising=False)
    return moto_server


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Every process a test starts (pollers, the S3 forwarder, a TorchServe of its own) is
    gone when it ends. Session services started before it (moto, the session TorchServe)
    are not the test's."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    leaked = []
    for proc in psutil.Process().children(recursive=True):
        with suppress(psutil.NoSuchProcess):
            if proc.pid not in before and proc.status() != psutil.STATUS_ZOMBIE:
                leaked.append(f"{proc.pid} {' '.join(proc.cmdline()[:3])}")
    assert not leaked, leaked
