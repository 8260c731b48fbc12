"""The worker's source allow-list cannot be walked around (issue 14, item 1).

GDAL (``/vsis3/``), curl (``/vsicurl/``) and urllib3 (XYZ tile endpoints) resolve dot
segments, percent-encoded ones included, before they send a request, so a source that
*reads* as lying under an allowed prefix could fetch another bucket. Every such form must be
refused, recorded in ``rejects`` with its reason, while the rest of the batch is stored. Run
as Lambda runs it: real ReceiveMessage output of moto's SQS, the handler of lambdas/, S3 and
plain HTTP served by moto behind a logging proxy that records every request the worker
makes, results in the machine's PostgreSQL.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import boto3
import pytest
from test_sqs_worker import (  # noqa: F401 (fixtures)
    ZOOM,
    load_handler,
    queue,
    receive_all,
    run_batches,
    send_packs,
)

from chipscale import names
from chipscale.cloud.queue_worker import WorkerConfigError, WorkerSettings, source_refusal
from chipscale.pipeline.messages import PackMessage
from chipscale.results import open_store
from chipscale.sources.footprint import cover

# ----------------------------------------------------------------------------- the rule


ALLOWED = ["s3://rtbucket", "http://host/rtbucket/", "https://tiles.example/xyz"]


@pytest.mark.parametrize(
    "source",
    [
        "s3://rtbucket/aerial.tif",
        "s3://rtbucket/a/b/c.tif",
        "s3://rtbucket/a..b/c.tif",  # dots inside a name are not a segment
        "s3://rtbucket/scene%20one.tif",
        "http://host/rtbucket/aerial.tif",
        "http://HOST/rtbucket/aerial.tif",  # host names are case-insensitive
        "http://host:80/rtbucket/aerial.tif",  # the default port is the same server
        "http://host/rtbucket/aerial.tif?X-Amz-Signature=abc%2Fdef",  # a signed URL
        "http://host/rtbucket/%61erial.tif",  # an encoded unreserved character
        "https://tiles.example/xyz/{z}/{x}/{y}.png",  # an XYZ endpoint template
        "https://tiles.example/xyz",
        "https://tiles.example:443/xyz/{z}/{x}/{-y}.jpg",
    ],
)
def test_sources_under_an_allowed_prefix_are_read(source: str) -> None:
    assert source_refusal(source, ALLOWED) is None


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("s3://rtbucket/../secretbucket/private.tif", "dot segment"),
        ("s3://rtbucket/a/b/../../../secretbucket/private.tif", "dot segment"),
        ("s3://rtbucket/./../secretbucket/private.tif", "dot segment"),
        ("s3://rtbucket/%2e%2e/secretbucket/private.tif", "dot segment"),
        ("s3://rtbucket/%252e%252e/secretbucket/private.tif", "dot segment"),
        ("s3://rtbucket/..%2fsecretbucket/private.tif", "dot segment"),
        ("s3://rtbucket/x.tif?/../../secretbucket/private.tif", "dot segment"),
        ("s3://rtbucket/x#/../../secretbucket/private.tif", "dot segment"),
        ("s3://rtbucket/..", "dot segment"),
        ("s3://rtbucket/..\\secretbucket\\private.tif", "backslash"),
        ("s3://rtbucket%2f../secretbucket/x.tif", "bucket"),
        ("s3://RTBUCKET/x.tif", "bucket"),
        ("s3://rtbucket-evil/x.tif", "outside the allowed sources"),
        ("s3:///rtbucket/x.tif", "bucket"),
        ("S3://rtbucket/x.tif", "not an s3:// or http(s):// URL"),
        ("/vsis3/rtbucket/x.tif", "not an s3:// or http(s):// URL"),
        ("/vsicurl/http://host/rtbucket/x.tif", "not an s3:// or http(s):// URL"),
        ("file:///etc/passwd", "not an s3:// or http(s):// URL"),
        ("http://host/rtbucket/../secretbucket/x.tif", "dot segment"),
        ("http://host/rtbucket/%2e%2e/secretbucket/x.tif", "dot segment"),
        ("http://host/rtbucket/.%2E/secretbucket/x.tif", "dot segment"),
        ("http://host/rtbucket/..%2Fsecretbucket/x.tif", "dot segment"),
        ("http://host/rtbucket/..;/secretbucket/x.tif", "dot segment"),
        ("http://host/rtbucket/a%2Fb.tif", "encoded"),
        ("http://host/rtbucket/..\\secretbucket/x.tif", "backslash"),
        ("http://host/rtbucket/x.tif#/../../secretbucket", "fragment"),
        ("http://host/rtbucket/../secretbucket/{z}/{x}/{y}.png", "dot segment"),
        ("http://rtbucket@host/secretbucket/x.tif", "user information"),
        ("http://host/rtbucket@evil/x.tif", "outside the allowed sources"),  # a path, on host
        ("http://host%2fevil/rtbucket/x.tif", "host"),
        ("http://host:8080/rtbucket/x.tif", "outside the allowed sources"),
        ("http://host:http/rtbucket/x.tif", "port"),
        ("https://host/rtbucket/x.tif", "outside the allowed sources"),  # another scheme
        ("http://host/rtbucket-evil/x.tif", "outside the allowed sources"),
        ("http://host/RTBUCKET/x.tif", "outside the allowed sources"),  # paths keep case
        ("https://tiles.example/xyz-evil/{z}/{x}/{y}.png", "outside the allowed sources"),
        ("http:///rtbucket/x.tif", "host"),
    ],
)
def test_sources_that_escape_an_allowed_prefix_are_refused(source: str, reason: str) -> None:
    refusal = source_refusal(source, ALLOWED)
    assert refusal is not None
    assert reason in refusal


def test_http_sources_are_open_without_an_http_prefix_but_never_malformed() -> None:
    assert source_refusal("https://anywhere.example/a.tif", ["s3://rtbucket/"]) is None
    refusal = source_refusal("https://anywhere.example/a/../b.tif", ["s3://rtbucket/"])
    assert refusal is not None and "dot segment" in refusal


@pytest.mark.parametrize(
    "prefix",
    ["s3://Bad_Bucket/", "http://host/a?x=1", "http://host/a/../b/", "ftp://host/", "rtbucket"],
)
def test_a_malformed_allowed_prefix_is_a_deploy_error(prefix: str) -> None:
    env = {names.ENV_MODEL_URL: "http://model/predictions/m", names.ENV_ALLOWED_SOURCES: prefix}
    with pytest.raises(WorkerConfigError, match=names.ENV_ALLOWED_SOURCES):
        WorkerSettings.from_environ(env)


# ----------------------------------------------------------------------------- end to end


class RecordingProxy:
    """An HTTP reverse proxy in front of moto that records every request line it forwards:
    what the worker asked for, exactly as sent."""

    def __init__(self, upstream: str) -> None:
        up = urlsplit(upstream)
        self.requests: list[tuple[str, str]] = []
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self) -> None:
                requests.append((self.command, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection"):
                        self.send_header(key, value)
                if answer.getheader("Content-Length") is None:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_HEAD = do_POST = do_PUT = forward

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(moto_server: str) -> Iterator[RecordingProxy]:
    server = RecordingProxy(moto_server)
    yield server
    server.close()


@pytest.fixture
def buckets(
    stack_environment: dict[str, str],
    results_db: str,
    monkeypatch: pytest.MonkeyPatch,
    moto_server: str,
    proxy: RecordingProxy,
    aerial: Path,
) -> SimpleNamespace:
    """An allowed bucket and a secret one beside it (``<allowed>-secret``: the same prefix
    of text), both holding the aerial COG, public-read so plain HTTP reads them too. GDAL
    reaches S3 through the recording proxy; the allow-list names the allowed bucket without a
    trailing slash and its http address through the proxy."""
    s3 = boto3.client("s3", endpoint_url=moto_server)
    allowed = f"rt-{os.getpid()}-{time.monotonic_ns()}"
    secret = f"{allowed}-secret"
    for name in (allowed, secret):
        s3.create_bucket(Bucket=name)
        s3.upload_file(str(aerial), name, "aerial.tif", ExtraArgs={"ACL": "public-read"})
    monkeypatch.setenv("AWS_S3_ENDPOINT", f"127.0.0.1:{proxy.port}")
    monkeypatch.setenv("AWS_HTTPS", "NO")
    monkeypatch.setenv("AWS_VIRTUAL_HOSTING", "FALSE")
    http_root = f"http://127.0.0.1:{proxy.port}"
    monkeypatch.setenv(names.ENV_ALLOWED_SOURCES, f"s3://{allowed}, {http_root}/{allowed}/")
    return SimpleNamespace(db=results_db, allowed=allowed, secret=secret, http=http_root)


def forbidden_sources(allowed: str, secret: str, http: str) -> list[str]:
    """Sources that name the allowed bucket or its http address but lead to the secret one."""
    name = secret.removeprefix(f"{allowed}-")  # "secret": the secret bucket is allowed-secret
    s3 = [
        f"s3://{allowed}/../{secret}/aerial.tif",
        f"s3://{allowed}/a/b/../../../{secret}/aerial.tif",
        f"s3://{allowed}/./../{secret}/aerial.tif",
        f"s3://{allowed}/aerial.tif?/../../{secret}/aerial.tif",
        f"s3://{allowed}/x#/../../{secret}/aerial.tif",
        f"s3://{allowed}/%2e%2e/{secret}/aerial.tif",
        f"s3://{allowed}/..\\{secret}\\aerial.tif",
        f"s3://{allowed}-{name}/aerial.tif",  # the prefix has no trailing slash
        f"s3://{allowed.upper()}/../{secret}/aerial.tif",
    ]
    web = [
        f"{http}/{allowed}/../{secret}/aerial.tif",
        f"{http}/{allowed}/%2e%2e/{secret}/aerial.tif",
        f"{http}/{allowed}/.%2E/{secret}/aerial.tif",
        f"{http}/{allowed}/..%2F{secret}/aerial.tif",
        f"{http}/{allowed}/..\\{secret}/aerial.tif",
        f"{http}/{allowed}-{name}/aerial.tif",
        f"{http}/{allowed}/../{secret}/{{z}}/{{x}}/{{y}}.tif",  # an XYZ endpoint
        f"{http}/{allowed}/%2e%2e/{secret}/{{z}}/{{x}}/{{y}}.tif",
        f"http://{allowed}@127.0.0.1:{http.rsplit(':', 1)[1]}/{secret}/aerial.tif",
    ]
    return s3 + web


def test_the_worker_never_reads_outside_the_allow_list(
    buckets: SimpleNamespace,
    proxy: RecordingProxy,
    queue: SimpleNamespace,  # noqa: F811 (fixture)
    monkeypatch: pytest.MonkeyPatch,
    demo_model_file: Path,
    aerial: Path,
) -> None:
    module = load_handler(monkeypatch, str(demo_model_file))
    tiles = tuple(cover(ZOOM, source=str(aerial)))[:4]
    good = {
        "s3-ok": f"s3://{buckets.allowed}/aerial.tif",
        "http-ok": f"{buckets.http}/{buckets.allowed}/aerial.tif",
    }
    bad = forbidden_sources(buckets.allowed, buckets.secret, buckets.http)
    bodies = [PackMessage(job, source, tiles).to_json() for job, source in good.items()]
    bodies += [PackMessage(f"bad-{i}", source, tiles).to_json() for i, source in enumerate(bad)]
    send_packs(queue, bodies)
    messages = receive_all(queue)
    assert len(messages) == len(bodies)

    assert run_batches(module, queue, messages) == []

    leaked = [
        f"{method} {path}"
        for method, path in proxy.requests
        if buckets.secret in unquote(unquote(path)).replace("\\", "/")
    ]
    assert leaked == [], "the worker requested the secret bucket"
    assert any(buckets.allowed in path for _, path in proxy.requests)  # the proxy saw reads

    with open_store(buckets.db) as store:
        for job in good:
            rows = list(store.iter_results(job))
            assert sorted((r.x, r.y, r.z) for r in rows) == sorted(tiles), job
            assert {r.status for r in rows} <= {"ok", "empty"}, job
            assert any(r.status == "ok" for r in rows), job
        rejects = {r.job: r.reason for r in store.rejects()}
        for i, source in enumerate(bad):
            assert store.counts(f"bad-{i}")["total"] == 0, source
    missing = [source for i, source in enumerate(bad) if f"bad-{i}" not in rejects]
    assert missing == [], "read instead of rejected"
    for i, source in enumerate(bad):
        assert source in rejects[f"bad-{i}"] or repr(source) in rejects[f"bad-{i}"], rejects
    module.worker().close()
