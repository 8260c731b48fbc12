"""A real STAC API on loopback for the tests (issue 20): stac-fastapi-pgstac over pgstac, in a
database of its own on the machine's PostgreSQL, served by uvicorn from ``.venv-stac`` (which
``make test`` builds with scripts/_stac-test-setup, PostGIS included). Collections and items
go in through the API's own Transactions extension; the uvicorn access log tells which
requests the server answered. tests/conftest.py's ``stac_api`` fixture runs one per session.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STAC_VENV = ROOT / ".venv-stac"
SETUP = "scripts/_stac-test-setup (make test runs it)"
#: An access-log line of uvicorn: ``... - "POST /search HTTP/1.1" 200 OK``.
ACCESS = re.compile(r'"(GET|POST|PUT|DELETE|PATCH) ([^ ?"]+)[^"]*" (\d{3})')


class StacApiUnavailable(Exception):
    """The set-up is missing or the server did not start (the fixture reports it)."""


class StacApi:
    """One stac-fastapi-pgstac server: ``url`` over ``database``; collections loaded and
    removed through its Transactions extension; ``requests()`` read from its access log."""

    def __init__(
        self, url: str, database: str, log: Path, process: subprocess.Popen[bytes]
    ) -> None:
        self.url = url
        self.database = database
        self.log = log
        self.process = process

    def call(self, method: str, path: str, doc: Any = None) -> Any:
        """One JSON request; an HTTP error raises with the server's answer."""
        data = None if doc is None else json.dumps(doc).encode()
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                body = answer.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise AssertionError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        return json.loads(body) if body else None

    def add_collection(self, collection_id: str, items: Sequence[dict[str, Any]]) -> None:
        """A new collection holding ``items`` (their ``collection`` set to it)."""
        self.call("POST", "/collections", collection_doc(collection_id))
        if items:
            self.add_items(collection_id, items)

    def add_items(self, collection_id: str, items: Sequence[dict[str, Any]]) -> None:
        features = [{**item, "collection": collection_id} for item in items]
        self.call(
            "POST",
            f"/collections/{collection_id}/items",
            {"type": "FeatureCollection", "features": features},
        )

    def delete_item(self, collection_id: str, item_id: str) -> None:
        self.call("DELETE", f"/collections/{collection_id}/items/{item_id}")

    def delete_collection(self, collection_id: str) -> None:
        self.call("DELETE", f"/collections/{collection_id}")

    def requests(self) -> list[str]:
        """``"POST /search"``-style lines, one per request answered so far."""
        time.sleep(0.05)  # uvicorn logs as it starts the answer; let the line land
        text = self.log.read_text(errors="replace")
        return [f"{m[1]} {m[2]}" for m in ACCESS.finditer(text)]

    def searches(self) -> int:
        """Item searches answered so far (``/search``, GET or POST)."""
        return sum(line.endswith(" /search") for line in self.requests())


def collection_doc(collection_id: str) -> dict[str, Any]:
    return {
        "type": "Collection",
        "id": collection_id,
        "stac_version": "1.0.0",
        "description": f"{collection_id}: test imagery",
        "license": "proprietary",
        "extent": {
            "spatial": {"bbox": [[-180.0, -90.0, 180.0, 90.0]]},
            "temporal": {"interval": [["2000-01-01T00:00:00Z", None]]},
        },
        "links": [],
    }


#: Queryables beyond pgstac's own (id, geometry, datetime), as a deployment declares them:
#: without a numeric type pgstac sorts ``eo:cloud_cover`` as text ("12" < "30" < "5").
QUERYABLES = [("eo:cloud_cover", '{"type": "number", "minimum": 0, "maximum": 100}', "to_float")]


def _migrate(database_url: str) -> None:
    pypgstac = STAC_VENV / "bin" / "pypgstac"
    done = subprocess.run(
        [str(pypgstac), "migrate", "--dsn", database_url],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise StacApiUnavailable(f"pypgstac migrate failed: {tail[0]}")
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET search_path TO pgstac, public")  # pgstac's triggers need it
        for name, definition, wrapper in QUERYABLES:
            conn.execute(
                "INSERT INTO pgstac.queryables (name, definition, property_wrapper) "
                "VALUES (%s, %s::jsonb, %s)",
                (name, definition, wrapper),
            )


def start_server(
    database: str, log: Path, *, extensions: str | None = None, timeout: float = 60.0
) -> StacApi:
    """uvicorn serving stac-fastapi-pgstac over ``database`` (on 127.0.0.1:5432) on a free
    loopback port, ready (its ping answers). ``extensions``: ENABLED_EXTENSIONS (default all)."""
    from conftest import free_port

    port = free_port()
    env = {
        **os.environ,
        "PGHOST": "127.0.0.1",
        "PGPORT": "5432",
        "PGUSER": "postgres",
        "PGPASSWORD": "",
        "PGDATABASE": database,
        "ENABLE_TRANSACTIONS_EXTENSIONS": "true",
        "STAC_FASTAPI_TITLE": "chipscale tests",
        "STAC_FASTAPI_DESCRIPTION": "stac-fastapi-pgstac on loopback",
        "STAC_FASTAPI_LANDING_ID": "chipscale-tests",
        "STAC_FASTAPI_VERSION": "1",
        "DB_MIN_CONN_SIZE": "1",
        "DB_MAX_CONN_SIZE": "2",
        "PYTHONUNBUFFERED": "1",
    }
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "ENABLED_EXTENSIONS"):
        env.pop(key, None)
    if extensions is not None:
        env["ENABLED_EXTENSIONS"] = extensions
    uvicorn = STAC_VENV / "bin" / "uvicorn"
    app = "stac_fastapi.pgstac.app:create_app"
    args = [str(uvicorn), app, "--factory", "--host", "127.0.0.1", "--port", str(port)]
    handle = log.open("wb")
    process = subprocess.Popen(
        args, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=log.parent
    )
    handle.close()
    api = StacApi(f"http://127.0.0.1:{port}", database, log, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise StacApiUnavailable(f"stac-fastapi-pgstac exited: {tail[0]}")
        with (
            suppress(OSError),
            urllib.request.urlopen(f"{api.url}/_mgmt/ping", timeout=2) as answer,
        ):
            if answer.status == 200:
                return api
        time.sleep(0.1)
    stop_server(api)
    raise StacApiUnavailable(f"stac-fastapi-pgstac did not answer within {timeout:.0f} s")


def stop_server(api: StacApi) -> None:
    api.process.terminate()
    try:
        api.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        api.process.kill()
        api.process.wait(timeout=15)


@contextmanager
def pgstac_database(admin_url: str) -> Iterator[str]:
    """A fresh database ``stac_test_<random>`` migrated by pypgstac (PostGIS, btree_gist and
    the pgstac schema); dropped afterwards. Yields its name."""
    import psycopg

    if not (STAC_VENV / "bin" / "uvicorn").exists():
        raise StacApiUnavailable(f"{STAC_VENV} is missing: run {SETUP}")
    name = f"stac_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        found = conn.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'postgis'"
        ).fetchone()
        if found is None:
            raise StacApiUnavailable(f"PostGIS is not installed for PostgreSQL: run {SETUP}")
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        _migrate(f"postgresql://postgres@127.0.0.1:5432/{name}")
        yield name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def running_stac_api(admin_url: str, folder: Path) -> Iterator[StacApi]:
    """A migrated database and a server over it (see :func:`start_server`)."""
    with pgstac_database(admin_url) as database:
        api = start_server(database, folder / "uvicorn.log")
        try:
            yield api
        finally:
            stop_server(api)
