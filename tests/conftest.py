"""Shared fixtures: real imagery, real services.

Under ``CI=true`` a missing service is an error, never a skip: a skipped test in CI is a
failed promise.
"""

from __future__ import annotations

import contextlib
import getpass
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
if not SHARED_DATA.is_dir():  # CI checks main out beside shared/
    SHARED_DATA = Path(os.environ.get("CHIPSCALE_SHARED_DATA", "/work/shared/data"))
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> None:
    """Skip locally, fail in CI: a service the suite needs must be there."""
    if IN_CI:
        pytest.fail(f"required for CI: {reason}")
    pytest.skip(reason)  # only outside CI: under CI=true the line above fails instead


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real test rasters of ../shared/data (see its SOURCES.md)."""
    if not (SHARED_DATA / "rasterio_cogeo.tif").exists():
        unavailable(f"shared test imagery not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def aerial(shared_data: Path) -> Path:
    """Real 0.6 m RGB aerial COG, EPSG:3857, with an internal mask."""
    return shared_data / "rasterio_cogeo.tif"


@pytest.fixture(scope="session")
def naip(shared_data: Path) -> Path:
    """Real NAIP RGBN COG in UTM 14N with nodata=0."""
    return shared_data / "naip_m_4709963_se_14_1_20200831.tif"


@contextmanager
def running_moto() -> Iterator[str]:
    """A ``moto_server`` process of its own on a free loopback port; yields its URL."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which(
        "moto_server"
    )
    if exe is None:
        unavailable("moto_server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if not wait_for_port(port):
            unavailable("moto_server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A real ``moto_server`` on loopback for S3, SQS and CloudWatch; yields its endpoint URL.

    Credentials and region are dummies set in the environment, where both boto3 and GDAL's
    ``/vsis3/`` read them.
    """
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        with running_moto() as url:
            yield url
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def bucket(moto_server: str, monkeypatch: pytest.MonkeyPatch, aerial: Path) -> str:
    """A moto S3 bucket holding the aerial COG as ``aerial.tif`` (public-read, so its plain
    http URL works too); boto3 and GDAL both pointed at moto through ``AWS_ENDPOINT_URL``."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    for key in ("AWS_S3_ENDPOINT", "AWS_HTTPS", "AWS_VIRTUAL_HOSTING"):
        monkeypatch.delenv(key, raising=False)
    s3 = boto3.client("s3", endpoint_url=moto_server)
    name = f"tiles-{os.getpid()}-{time.monotonic_ns()}"
    s3.create_bucket(Bucket=name)
    s3.upload_file(str(aerial), name, "aerial.tif", ExtraArgs={"ACL": "public-read"})
    return name


# ----------------------------------------------------------------------------- TorchServe


def start_torchserve(mar: Path, run_dir: Path) -> Any:
    """A real TorchServe on free loopback ports, started with model_server/config.properties
    (the GPU hosts' file) and ready (every worker READY); the caller stops it."""
    from chipscale.models.serving import ServingError, TorchServe

    if shutil.which("java") is None:
        unavailable("java (TorchServe's frontend) is not installed")
    server = TorchServe.on_free_ports(mar, run_dir)
    try:
        return server.start()
    except ServingError as exc:
        unavailable(f"TorchServe did not start: {exc}")


@pytest.fixture(scope="session")
def demo_model_file() -> Path:
    """The bundled demo model file (built on first use)."""
    from chipscale.models.predictors import demo_model_path

    return demo_model_path()


@pytest.fixture(scope="session")
def demo_mar(demo_model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model packaged as TorchServe serves it in the cloud."""
    from chipscale.models.serving import ServingConfig, package_model

    out = tmp_path_factory.mktemp("mar")
    # CPU settings: one worker, short batching delay; the rest as on a GPU host.
    return package_model(demo_model_file, out, config=ServingConfig(max_batch_delay_ms=5))


@pytest.fixture(scope="session")
def torchserve(demo_mar: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A session-wide TorchServe serving the demo model: ``.predictions_url``,
    ``.management_url``, ``.metrics_url``, ``.model_name``, ``.stop()``/``.start()``."""
    server = start_torchserve(demo_mar, tmp_path_factory.mktemp("torchserve"))
    yield server
    server.stop()


# ----------------------------------------------------------------------------- PostgreSQL

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
try:  # the real schema, as `chipscale db-setup` creates it (tests that build it by hand)
    from chipscale.results.postgres_schema import SCHEMA as RESULTS_DDL
except ImportError:  # no psycopg: every PostgreSQL fixture skips anyway
    RESULTS_DDL = ""


@pytest.fixture(scope="session")
def pg_admin() -> str:
    """The machine's PostgreSQL (trust auth); a failure under CI=true, a skip elsewhere."""
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            pass
    except Exception as exc:
        unavailable(f"PostgreSQL at {PG_ADMIN}: {exc}")
    return PG_ADMIN


@pytest.fixture
def empty_db(pg_admin: str) -> Iterator[str]:
    """A fresh database ``test_<random>``, dropped afterwards; yields its URL."""
    import psycopg

    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        # template0 takes no connections: copying template1 fails while another session
        # (a concurrent test run) is connected to it
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(pg_admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def results_db(empty_db: str) -> str:
    """A fresh database holding the results schema, set up as `chipscale db-setup` does."""
    from chipscale.results.postgres import setup_database

    setup_database(empty_db)
    return empty_db


@pytest.fixture(scope="session")
def stac_api(pg_admin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real STAC API on loopback (stac-fastapi-pgstac over a pgstac database of its own,
    tests/stac_api.py): ``.url``, ``.add_collection(id, items)``, ``.searches()``, ..."""
    from stac_api import StacApiUnavailable, running_stac_api

    try:
        with running_stac_api(pg_admin, tmp_path_factory.mktemp("stac-api")) as api:
            yield api
    except StacApiUnavailable as exc:
        unavailable(f"the STAC API: {exc}")


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server binaries on this machine (Debian's layout)."""
    found = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p, "initdb").exists()]
    return max(found, key=lambda p: int(p.parent.name), default=None) if found else None


class ThrowawayPostgres:
    """A private PostgreSQL cluster on a free loopback port, for tests that stop, restart or
    break the server: never the shared one on 5432. Run as the ``postgres`` user (the server
    refuses root), its directory owned by that user; trust auth, user ``postgres``."""

    def __init__(self, root: Path, bin_dir: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.bin = bin_dir
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        as_postgres = [] if getpass.getuser() == "postgres" else ["runuser", "-u", "postgres", "--"]
        done = subprocess.run(
            [*as_postgres, str(self.bin / tool), *args], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {done.stderr.strip()}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        log = str(self.root / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def terminate_backends(self) -> int:
        """End every client connection but this one, as a failover or RDS Proxy's idle
        timeout does; returns how many were ended."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
            ).fetchone()
        return int(row[0]) if row else 0


@pytest.fixture
def throwaway_pg() -> Iterator[ThrowawayPostgres]:
    """A private PostgreSQL cluster of this test's own (``.url``, ``.stop()``, ``.start()``,
    ``.restart()``, ``.terminate_backends()``), stopped and removed afterwards."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found")
    if getpass.getuser() != "postgres" and (os.geteuid() != 0 or not shutil.which("runuser")):
        unavailable("a throwaway PostgreSQL cluster needs root (runuser -u postgres)")
    # /tmp, not tmp_path: pytest's base folder is private to root, out of the postgres
    # user's reach.
    root = Path(tempfile.mkdtemp(prefix="chipscale-pg-"))
    shutil.chown(root, "postgres", "postgres")
    server = ThrowawayPostgres(root, bin_dir)
    try:
        server.init()
        server.start()
    except RuntimeError as exc:
        shutil.rmtree(root, ignore_errors=True)
        unavailable(f"throwaway PostgreSQL did not start: {exc}")
    try:
        yield server
    finally:
        if server.running():
            with contextlib.suppress(RuntimeError):
                server.stop()
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- Lambdas

LAMBDAS = ROOT / "lambdas"


class LambdaContext:
    """The parts of Lambda's context object the handlers and Powertools read."""

    def __init__(self, function_name: str, remaining_ms: int = 60_000) -> None:
        self.function_name = function_name
        self.memory_limit_in_mb = 1024
        self.invoked_function_arn = (
            f"arn:aws:lambda:us-east-1:123456789012:function:{function_name}"
        )
        self.aws_request_id = f"req-{uuid.uuid4().hex[:8]}"
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def import_lambda(module: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``lambdas/<module>.py`` imported fresh, as a new Lambda container would."""
    import importlib

    monkeypatch.syspath_prepend(str(LAMBDAS))
    sys.modules.pop(module, None)
    return importlib.import_module(module)


@pytest.fixture
def stack_environment(
    moto_server: str, monkeypatch: pytest.MonkeyPatch, results_db: str
) -> dict[str, str]:
    """The environment the stack gives its Lambdas, pointing here: the database secret in
    moto's Secrets Manager (host and name of ``results_db``), a results bucket in moto's S3.
    Returns the values set."""
    import json

    import boto3

    from chipscale import names

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    database = results_db.rsplit("/", 1)[1]
    secret = boto3.client("secretsmanager").create_secret(
        Name=f"chipscale-db-{database}",
        SecretString=json.dumps(
            {"username": "postgres", "password": "x y;'z", "host": "instance", "port": 5432}
        ),
    )
    results_bucket = f"results-{database.replace('_', '-')}"
    boto3.client("s3").create_bucket(Bucket=results_bucket)
    env = {
        names.ENV_DB_SECRET_ARN: secret["ARN"],
        names.ENV_DB_HOST: "127.0.0.1",  # the proxy, in the stack
        names.ENV_DB_NAME: database,
        names.ENV_RESULTS_BUCKET: results_bucket,
        "PGSSLMODE": "disable",  # the local server has no TLS
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def operations_lambda(stack_environment: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The operations Lambda's handler module with the stack's environment."""
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "chipscale-operations")
    return import_lambda("operations", monkeypatch)


@pytest.fixture
def local_lambda(operations_lambda: Any, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """boto3's Lambda client runs the operations handler in this process: moto's Lambda
    needs Docker, which this machine lacks, and what is under test is the CLI's side and the
    handler, not AWS's invoke. Answers as Lambda does, an exception as ``FunctionError``
    with ``errorType`` and ``errorMessage``. Returns the events received."""
    import io
    import json

    import boto3

    events: list[dict] = []

    class LocalLambda:
        def invoke(self, *, FunctionName: str, Payload: bytes, **_: Any) -> dict[str, Any]:
            event = json.loads(Payload)
            events.append(event)
            try:
                answer = operations_lambda.handler(event, LambdaContext(FunctionName))
            except Exception as exc:
                error = {"errorType": type(exc).__name__, "errorMessage": str(exc)}
                return {
                    "FunctionError": "Unhandled",
                    "Payload": io.BytesIO(json.dumps(error).encode()),
                }
            return {"StatusCode": 200, "Payload": io.BytesIO(json.dumps(answer).encode())}

    real_client = boto3.session.Session.client

    def client(self: Any, service_name: str, *args: Any, **kwargs: Any) -> Any:
        if service_name == "lambda":
            return LocalLambda()
        return real_client(self, service_name, *args, **kwargs)

    monkeypatch.setattr(boto3.session.Session, "client", client)
    return events
