"""``chipscale verify``'s two checks that need the VPC: the model endpoint scores a tile, and
the results schema is in the database. They run where the caller is: in the operations Lambda
(:func:`verify_action`, asked by :func:`invoke_private_checks`), or in the CLI given
``--endpoint``/``--db``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import numpy as np

from chipscale.errors import one_line
from chipscale.ops.checks import (
    CHECK_ENDPOINT,
    CHECK_SCHEMA,
    Check,
    CheckFailed,
    CheckResult,
    run_checks,
)
from chipscale.ops.operations_client import OperationError, invoke
from chipscale.redaction import redact, scrub, secrets_of

#: The results schema ``chipscale db-setup`` creates: table -> primary key columns, in order
#: (None: any key). The one place verify learns what "schema present" means. A copy of
#: ``chipscale.results.postgres_schema.TABLES`` (a test holds them equal), so that importing this
#: module does not import psycopg.
RESULTS_SCHEMA: Final[Mapping[str, tuple[str, ...] | None]] = {
    "jobs": ("job",),
    "results": ("job", "z", "x", "y"),
    "rejects": ("message_id",),
    "features": ("job", "z", "x", "y", "seq"),
    "schema_version": ("version",),
}


#: What the CLI sends the operations Lambda, and the action its handler dispatches on.
VERIFY_ACTION: Final = {"action": "verify"}


#: Endpoint check timeouts: a healthy endpoint in the VPC connects in milliseconds; a cold
#: model's first tile may take a few seconds.
ENDPOINT_CONNECT_TIMEOUT: Final = 3.0


ENDPOINT_READ_TIMEOUT: Final = 30.0


DB_CONNECT_TIMEOUT: Final = 5


#: Metadata answers the endpoint check asks for, 8 at a time, to see the workers' devices:
#: each is answered by whichever worker behind the load balancer takes it.
PLACEMENT_PROBES: Final = 32

#: A stack's endpoint is its GPU fleet: every worker seen must run on a GPU. (The tests stand
#: a CPU TorchServe in for the fleet and turn this off.)
STACK_WORKERS_ON_GPU = True


def check_endpoint(
    url: str,
    *,
    connect_timeout: float = ENDPOINT_CONNECT_TIMEOUT,
    read_timeout: float = ENDPOINT_READ_TIMEOUT,
    require_gpu: bool = False,
    probes: int = PLACEMENT_PROBES,
) -> CheckResult:
    """The model endpoint answers its metadata, then scores one tile of the model's own band
    count and size: the whole path (request, decode, model, answer) with its timings; then
    ``probes`` metadata answers say which device each worker that answered runs on, and with
    ``require_gpu`` (a stack's GPU fleet) any worker not on a GPU fails the check. No
    retries: a smoke test reports the endpoint as it is now."""
    from chipscale.models.torchserve_client import TorchServePredictor

    start = time.perf_counter()
    with TorchServePredictor(
        url,
        concurrency=1,
        retries=0,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    ) as predictor:
        metadata_ms = (time.perf_counter() - start) * 1000
        info = predictor.info
        tile = probe_tile(info.bands, info.tile_size)
        start = time.perf_counter()
        scores = predictor.predict(tile[np.newaxis])
        predict_ms = (time.perf_counter() - start) * 1000
        placement = check_placement(predictor, url, require_gpu=require_gpu, probes=probes)
    row = scores[0]
    if row.shape != (len(info.classes),) or not all(math.isfinite(float(s)) for s in row):
        raise CheckFailed(f"{url} answered scores {row.tolist()} for {len(info.classes)} classes")
    top = int(np.argmax(row))
    return CheckResult(
        CHECK_ENDPOINT,
        True,
        f"{info.name} v{info.version}: metadata in {metadata_ms:.0f} ms; one "
        f"{info.bands}x{info.tile_size}x{info.tile_size} tile scored in {predict_ms:.0f} ms "
        f"(top {info.classes[top]!r} {float(row[top]):.2f}); {placement}",
    )


def check_placement(predictor: Any, url: str, *, require_gpu: bool, probes: int) -> str:
    """Sample the workers' metadata answers; a sentence on their devices, or
    :class:`CheckFailed` when ``require_gpu`` and a worker runs elsewhere or cannot say."""
    with ThreadPoolExecutor(min(8, max(1, probes))) as pool:
        answers = [predictor.worker, *pool.map(lambda _: _worker(predictor), range(probes))]
    workers = {(w.get("host"), w.get("pid")): w for w in answers}
    devices = sorted({str(w.get("device", "unknown")) for w in workers.values()})
    off_gpu = [w for w in workers.values() if not str(w.get("device", "")).startswith("cuda")]
    seen = f"{len(workers)} worker{'s' if len(workers) != 1 else ''} seen on {', '.join(devices)}"
    if require_gpu and off_gpu:
        where = ", ".join(f"{w.get('host', '?')} pid {w.get('pid', '?')}" for w in off_gpu[:5])
        unknown = any("device" not in w for w in off_gpu)
        raise CheckFailed(
            f"{url}: {seen}; not on a GPU: {where}"
            + (
                " (a handler older than issue 17 does not report its device: repackage the "
                "model with this chipscale)"
                if unknown
                else ""
            )
        )
    precisions = sorted({str(w["precision"]) for w in workers.values() if "precision" in w})
    return seen + (f", precision {', '.join(precisions)}" if precisions else "")


def _worker(predictor: Any) -> dict[str, Any]:
    worker = predictor.read_metadata().get("worker")
    return worker if isinstance(worker, dict) else {}


def probe_tile(bands: int, size: int) -> np.ndarray:
    """A deterministic uint8 tile with structure (gradients per band), not a flat one, so
    the model runs its ordinary path; what is checked is the answer's shape, not the class."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    tile = np.empty((bands, size, size), dtype=np.uint8)
    for band in range(bands):
        tile[band] = ((ramp[:, None] * (band + 1) + ramp[None, :]) % 256).astype(np.uint8)
    return tile


def check_schema(db_url: str, *, schema: str | None = None) -> CheckResult:
    """The results tables exist in ``schema`` (default: the connection's current schema, so a
    ``search_path`` in the URL is honoured), with the results primary key of RESULTS_SCHEMA."""
    import psycopg

    from chipscale.results import is_postgres_url
    from chipscale.results.postgres import libpq_url

    if not is_postgres_url(db_url):
        raise CheckFailed(f"the schema check needs a postgresql:// URL, got {redact(db_url)}")
    where = redact(db_url)
    dsn = libpq_url(db_url)
    try:
        with psycopg.connect(dsn, connect_timeout=DB_CONNECT_TIMEOUT, autocommit=True) as conn:
            if schema is None:
                schema = str(conn.execute("SELECT current_schema()").fetchone()[0])  # type: ignore[index]
            problems = _schema_problems(conn, schema)
    except psycopg.Error as exc:
        raise CheckFailed(f"{where}: {scrub(one_line(exc), secrets_of(db_url))}") from None
    if problems:
        raise CheckFailed(
            f"{where} schema {schema}: {'; '.join(problems)}: the results schema is not set "
            "up or is out of date: run `chipscale db-setup --stack NAME` (or `--db URL`)"
        )
    tables = ", ".join(RESULTS_SCHEMA)
    return CheckResult(CHECK_SCHEMA, True, f"{where} schema {schema}: tables {tables} present")


def _schema_problems(conn: Any, schema: str) -> list[str]:
    """What is missing or different from RESULTS_SCHEMA, as short phrases."""
    found = {
        row[0]
        for row in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND c.relname = ANY(%s)",
            (schema, list(RESULTS_SCHEMA)),
        )
    }
    problems = []
    missing = [t for t in RESULTS_SCHEMA if t not in found]
    if missing:
        problems.append(f"missing table{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    for table, expected in RESULTS_SCHEMA.items():
        if expected is None or table not in found:
            continue
        key = tuple(
            row[0]
            for row in conn.execute(
                "SELECT a.attname FROM pg_index i "
                "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                "WHERE i.indrelid = format('%%I.%%I', %s::text, %s::text)::regclass "
                "AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
                (schema, table),
            )
        )
        if key != expected:
            shown = f"({', '.join(key)})" if key else "none"
            problems.append(f"{table} primary key is {shown}, expected ({', '.join(expected)})")
    return problems


def private_checks(
    endpoint_url: str | None, db_url: str | None, *, require_gpu: bool = False
) -> list[CheckResult]:
    """The two checks that need the VPC, run where the caller is (the operations Lambda, or
    the CLI with ``--endpoint``/``--db``); a missing input fails its check by name.
    ``require_gpu``: every worker seen must run on a GPU (a stack's fleet)."""
    return run_checks(
        [
            Check(
                CHECK_ENDPOINT,
                lambda: check_endpoint(
                    _given(endpoint_url, "model endpoint URL"), require_gpu=require_gpu
                ),
            ),
            Check(CHECK_SCHEMA, lambda: check_schema(_given(db_url, "database URL"))),
        ]
    )


def verify_action(endpoint_url: str | None, db_url: str | None) -> list[dict[str, Any]]:
    """The operations Lambda's answer to ``{"action": "verify"}``: the private checks as JSON
    (its endpoint is the stack's GPU fleet: every worker must be on a GPU)."""
    return [
        result.to_dict()
        for result in private_checks(endpoint_url, db_url, require_gpu=STACK_WORKERS_ON_GPU)
    ]


def invoke_private_checks(
    lambda_client: Any, function_name: str, wanted: Sequence[str]
) -> list[CheckResult]:
    """Ask the operations Lambda to run the private checks inside the VPC; keep the ``wanted``
    ones, and fail by name any it did not report."""
    try:
        answer = invoke(lambda_client, function_name, VERIFY_ACTION["action"])
    except OperationError as exc:
        raise CheckFailed(str(exc)) from exc
    if not isinstance(answer, list):
        raise CheckFailed(
            f"operations Lambda {function_name} answered {json.dumps(answer)[:200]}, not a list "
            "of check results"
        )
    by_name = {r.name: r for r in map(CheckResult.from_dict, answer)}
    return [
        by_name.get(name)
        or CheckResult(name, False, f"not reported by operations Lambda {function_name}")
        for name in wanted
    ]


def _given(value: str | None, what: str) -> str:
    if not value:
        raise CheckFailed(f"no {what} configured")
    return value
