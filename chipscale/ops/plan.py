"""``chipscale plan``: tiles, requests, hours and dollars of a run before it starts.

The counts are ``push --dry-run``'s (:class:`Counts`); the throughput, the bottleneck and the
per-GPU concurrency come from :mod:`chipscale.ops.system_model`; the rates from a profile
(``chipscale profile``) or :data:`DEFAULT_RATES`; the dollars from a dated price table
(:mod:`chipscale.ops.prices`). No AWS call, no numpy.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chipscale.errors import ChipscaleError
from chipscale.ops.prices import PriceTable
from chipscale.ops.system_model import Fleet, ModelError, Rates, Solution, solve

#: The version of the profile file format.
PROFILE_VERSION = 1

#: Rates for a ResNet-50-class classifier on one g5.xlarge GPU, each with its source
#: (docs/design.md 9.7 and 9.9). Replace with ``chipscale profile``'s measurements.
DEFAULT_RATES: dict[str, tuple[float | int | bool, str]] = {
    "gpu_tiles_per_s": (
        1600.0,
        "assumed: issue 17's estimate for a ResNet-50-class model on a g5.xlarge (A10G), "
        "chipscale.ops.feed.MEASURED; published: 1,130 img/s on a T4 with TensorRT FP16 at "
        "batch 32 (NVIDIA DeepLearningExamples), an A10G runs several times a T4",
    ),
    "handler_cpu_s_per_request": (
        0.0027,
        "measured: TorchServe handler CPU per request on the dev machine (FIELD-NOTES)",
    ),
    "tiles_per_request": (8, "the worker's default request shape (chipscale.ops.feed.MEASURED)"),
    "predict_overhead_s": (
        0.0001,
        "measured: TorchServe vs in-process at the default shape, 1/294.7 - 1/304.1 s "
        "(bench/results/request_shape.json)",
    ),
    "read_s": (
        0.0015,
        "measured: one worker's pack read of a local COG, 647.6 tiles/s "
        "(bench/results/pipeline_workers1.json); S3 reads are slower: profile them",
    ),
    "write_s": (
        1 / 28_918.8,
        "measured: PostgreSQL store write of 100-row batches with 0.5 ms each way, "
        "28,919 rows/s (bench/results/store.json)",
    ),
    "db_rows_per_s": (
        34_087.7,
        "measured: PostgreSQL store writes of 100-row batches on loopback, one connection, "
        "34,088 rows/s (bench/results/store.json); a lower bound of a db.t4g.medium's",
    ),
    "cold_start_s": (
        3.0,
        "assumed: a Lambda start importing rasterio, numpy and the worker (not measured)",
    ),
    "invocation_overhead_s": (
        0.05,
        "assumed: the event source's receive and delete and the handler's set-up per "
        "invocation (not measured)",
    ),
    "request_bytes_per_tile": (
        196_793.0,
        "measured: one uint8 RGB 256x256 tile through the load balancer, request and answer, "
        "plain .npy (docs/design.md 9.7; zstd bodies are 1.3x smaller)",
    ),
    "shared_device": (True, "GPUs: TorchServe's workers share each GPU"),
}

#: Seconds a GPU instance bills before it serves (boot, installs, model load) and after the
#: queue empties (scale-in and drain); both assumed, override with flags.
DEFAULT_BOOT_S = 420.0
DEFAULT_SCALE_IN_S = 600.0


class PlanError(ChipscaleError):
    """A plan's inputs are unusable: a profile missing a field, a bad fleet."""


@dataclass(frozen=True, slots=True)
class Counts:
    """What ``push --dry-run`` reports for the same inputs (``bytes``: the message bodies)."""

    tiles: int
    messages: int
    requests: int
    zoom: int | None
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class Profile:
    rates: Rates
    sources: dict[str, str]
    path: str


def default_profile() -> Profile:
    values = {k: v for k, (v, _) in DEFAULT_RATES.items()}
    return Profile(
        Rates(**values),  # type: ignore[arg-type]
        {k: s for k, (_, s) in DEFAULT_RATES.items()},
        "defaults",
    )


def load_profile(path: str | Path) -> Profile:
    """A profile written by ``chipscale profile``: every rate of :class:`Rates` is needed;
    a missing or non-numeric one is a one-line error naming it."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlanError(f"cannot read profile {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise PlanError(f"profile {path} is not JSON: {exc}") from None
    rates = raw.get("rates") if isinstance(raw, dict) else None
    if not isinstance(rates, dict):
        raise PlanError(f"profile {path} has no 'rates' object (write it with chipscale profile)")
    values: dict[str, Any] = {}
    for f in fields(Rates):
        if f.name not in rates:
            if f.name == "shared_device":
                values[f.name] = True
                continue
            raise PlanError(f"profile {path} lacks the rate {f.name!r}")
        value = rates[f.name]
        if f.name == "shared_device":
            values[f.name] = bool(value)
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise PlanError(f"profile {path}: rate {f.name!r} is not a number: {value!r}")
        else:
            values[f.name] = int(value) if f.name == "tiles_per_request" else float(value)
    try:
        built = Rates(**values)
    except ModelError as exc:
        raise PlanError(f"profile {path}: {exc}") from None
    raw_sources = raw.get("sources")
    sources = dict(raw_sources) if isinstance(raw_sources, dict) else {}
    return Profile(built, {k: str(sources.get(k, f"profile {path}")) for k in values}, str(path))


def write_profile(path: str | Path, rates: Rates, sources: dict[str, str], **about: Any) -> None:
    """Write a profile file (``chipscale profile``)."""
    body = {
        "chipscale_profile": PROFILE_VERSION,
        **about,
        "rates": asdict(rates),
        "sources": sources,
    }
    Path(path).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Plan:
    counts: Counts
    fleet: Fleet
    solution: Solution
    profile: str
    lambda_invocations: int
    lambda_gb_seconds: float
    sqs_requests: dict[str, int]
    gpu_hours: float
    instance_hours: float
    db_writes: dict[str, int]
    wall_s: float
    costs: dict[str, float]
    total_usd: float
    #: Dollars an hour the fleet, database and load balancer cost while the run lasts, and
    #: dollars a tile of the rest: what ``status --plan`` estimates the cost so far with.
    hourly_usd: float
    per_tile_usd: float
    prices: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tiles"] = self.counts.tiles
        out["tiles_per_s"] = self.solution.tiles_per_s
        out["bottleneck"] = self.solution.bottleneck
        return out


def make_plan(
    counts: Counts,
    fleet: Fleet,
    profile: Profile,
    prices: PriceTable,
    *,
    db_instance_class: str = "t4g.medium",
    boot_s: float = DEFAULT_BOOT_S,
    scale_in_s: float = DEFAULT_SCALE_IN_S,
) -> Plan:
    """Counts, times and dollars of a run of ``counts`` on ``fleet`` at ``profile``'s rates."""
    instance = prices.instance(fleet.instance_type)
    db_hourly = prices.database(db_instance_class)
    rates = profile.rates
    if counts.messages:  # packs hold fewer tiles than the most where the cover is ragged
        fleet = replace(fleet, tiles_per_message=max(1, round(counts.tiles / counts.messages)))
    solution = solve(rates, fleet)
    tiles = counts.tiles
    invocations = math.ceil(counts.messages / fleet.batch_size)
    run_s = tiles / solution.tiles_per_s if tiles else 0.0
    # Every Lambda starts cold once; the event source adds 300 concurrent a minute from 5.
    ramp_s = max(0.0, (solution.concurrency - 5) / 300 * 60) if tiles else 0.0
    wall_s = boot_s + ramp_s / 2 + rates.cold_start_s + run_s if tiles else 0.0
    cold_starts = min(solution.concurrency, invocations)
    lambda_s = (
        invocations * rates.invocation_overhead_s
        + counts.messages * solution.cycle_s
        + cold_starts * rates.cold_start_s
    )
    gb_s = lambda_s * fleet.lambda_memory_mb / 1024
    instance_hours = fleet.instances * (wall_s + scale_in_s) / 3600 if tiles else 0.0
    receive_delete = 2 * invocations
    sqs = {"send": counts.requests, "receive_delete": receive_delete}
    u = prices.unit
    lb_gb = tiles * rates.request_bytes_per_tile / 1e9
    hours = (wall_s + scale_in_s) / 3600 if tiles else 0.0
    hourly = (
        fleet.instances * instance.usd_per_hour
        + db_hourly
        + u["rds_proxy_min_vcpus"] * u["rds_proxy_usd_per_vcpu_hour"]
        + u["load_balancer_usd_per_hour"]
    )
    costs = {
        "gpu_instances": instance_hours * instance.usd_per_hour,
        "lambda_compute": gb_s * u["lambda_usd_per_gb_second"],
        "lambda_requests": invocations * u["lambda_usd_per_million_requests"] / 1e6,
        "sqs_requests": (counts.requests + receive_delete)
        * u["sqs_usd_per_million_requests"]
        / 1e6,
        "load_balancer": lb_gb * u["load_balancer_usd_per_gb_processed"]
        + hours * u["load_balancer_usd_per_hour"],
        "database": hours
        * (db_hourly + u["rds_proxy_min_vcpus"] * u["rds_proxy_usd_per_vcpu_hour"]),
    }
    return Plan(
        counts=counts,
        fleet=fleet,
        solution=solution,
        profile=profile.path,
        lambda_invocations=invocations,
        lambda_gb_seconds=gb_s,
        sqs_requests={**sqs, "total": counts.requests + receive_delete},
        gpu_hours=instance_hours * instance.gpus,
        instance_hours=instance_hours,
        db_writes={"rows": tiles, "transactions": invocations},
        wall_s=wall_s,
        costs=costs,
        total_usd=sum(costs.values()),
        hourly_usd=hourly,
        per_tile_usd=(sum(costs.values()) - hourly * hours) / tiles if tiles else 0.0,
        prices={
            "region": prices.region,
            "date": prices.date,
            "table": prices.path,
            "instance": f"{instance.name} ${instance.usd_per_hour}/h",
        },
    )


def fleet_from_context(context: dict[str, Any], prices: PriceTable, **flags: Any) -> Fleet:
    """The fleet of a cdk.json context, flags (not None) overriding its keys; GPUs per
    instance from the price table unless given."""

    def pick(flag: str, key: str, default: Any) -> Any:
        value = flags.get(flag)
        return value if value is not None else context.get(key, default)

    instance_type = str(pick("instance_type", "instanceType", "g5.xlarge"))
    gpus = flags.get("gpus_per_instance")
    if gpus is None:
        gpus = prices.instance(instance_type).gpus
    reserved = int(pick("reserved_concurrency", "reservedConcurrency", 0)) or None
    try:
        return Fleet(
            instance_type=instance_type,
            instances=int(pick("instances", "maxInstances", 2)),
            gpus_per_instance=int(gpus),
            per_gpu_concurrency=int(pick("per_gpu_concurrency", "perGpuConcurrency", 3)),
            workers_per_gpu=int(pick("workers_per_gpu", "workersPerGpu", 2)),
            batch_size=int(pick("batch_size", "batchSize", 4)),
            tiles_per_message=int(pick("tiles_per_message", "maxTilesPerMessage", 100)),
            lambda_memory_mb=int(pick("lambda_memory_mb", "lambdaMemoryMb", 2048)),
            lambda_timeout_s=float(pick("lambda_timeout_s", "lambdaTimeoutSeconds", 120)),
            reserved_concurrency=reserved,
        )
    except (TypeError, ValueError) as exc:
        raise PlanError(f"fleet: {exc}") from None


def load_context(path: str | Path) -> dict[str, Any]:
    """cdk.json's ``context``."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlanError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise PlanError(f"{path} is not JSON: {exc}") from None
    context = raw.get("context") if isinstance(raw, dict) else None
    return dict(context) if isinstance(context, dict) else {}


def actual_vs_planned(row: dict[str, Any], plan: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A job's progress (a ``status`` row) against a plan (``plan --json``): tiles/s and time
    so far, and the cost so far estimated with the plan's prices."""
    done = int(row.get("ok") or 0) + int(row.get("empty") or 0) + int(row.get("error") or 0)
    at = row.get("pushed_at")
    try:
        hourly, per_tile = float(plan["hourly_usd"]), float(plan["per_tile_usd"])
        planned_rate, planned_wall = float(plan["tiles_per_s"]), float(plan["wall_s"])
    except (KeyError, TypeError, ValueError):
        raise PlanError(
            "the plan file is not chipscale plan --json output (no hourly_usd, per_tile_usd, "
            "tiles_per_s or wall_s)"
        ) from None
    out: dict[str, Any] = {
        "planned_tiles_per_s": planned_rate,
        "planned_wall_s": planned_wall,
        "planned_usd": plan.get("total_usd"),
        "done": done,
        "elapsed_s": None,
        "tiles_per_s": None,
        "remaining_s": None,
        "usd_so_far": None,
    }
    if not isinstance(at, str):
        return out
    try:
        started = datetime.fromisoformat(at)
    except ValueError:
        return out
    if started.tzinfo is None:
        started = started.replace(tzinfo=UTC)
    elapsed = max(0.0, (now - started).total_seconds())
    rate = done / elapsed if elapsed > 0 else 0.0
    remaining = int(row.get("remaining") or 0)
    out.update(
        elapsed_s=elapsed,
        tiles_per_s=rate,
        remaining_s=remaining / rate if rate > 0 else None,
        usd_so_far=hourly * elapsed / 3600 + per_tile * done,
    )
    return out


def read_plan(path: str | Path) -> dict[str, Any]:
    """A plan written by ``chipscale plan --json``."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlanError(f"cannot read plan {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise PlanError(f"plan {path} is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise PlanError(f"plan {path} is not chipscale plan --json output")
    return raw
