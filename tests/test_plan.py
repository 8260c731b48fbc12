"""``chipscale plan`` and ``profile``, the system model they share with ``tune``, and
``status --plan``.

Counts are checked against ``push --dry-run`` through the CLI, the model against arithmetic in
the cases with one stage saturated (where MVA's answer is the bound), and tune against plan on
the same rates. How close the model comes to measured runs is bench/plan_accuracy.py's
business, not a test's.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import mercantile
import pytest
import shapely
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st
from mercantile import Tile
from stac_api import StacApi
from test_stac_sources import PARTS, cut, item
from test_tune import feeding_run

from chipscale.cli import cli
from chipscale.ops import system_model, tune
from chipscale.ops.plan import Counts, default_profile, make_plan
from chipscale.ops.prices import PriceError, load_prices
from chipscale.ops.system_model import Fleet, Rates, mva, solve
from chipscale.results import open_store
from chipscale.values import JobInfo, TileResult

XYZ = "https://tiles.example/{z}/{x}/{y}.jpg"
ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def rates(**changes: Any) -> Rates:
    """Round rates: a GPU of 100 tiles/s, reads 10 ms, no overheads, a fast database."""
    base = Rates(
        gpu_tiles_per_s=100.0,
        handler_cpu_s_per_request=0.0,
        tiles_per_request=8,
        predict_overhead_s=0.0,
        read_s=0.01,
        write_s=0.0,
        db_rows_per_s=1e9,
        cold_start_s=0.0,
        invocation_overhead_s=0.0,
        request_bytes_per_tile=0.0,
    )
    return replace(base, **changes)


def fleet(**changes: Any) -> Fleet:
    base = Fleet("g5.xlarge", instances=1, gpus_per_instance=1, per_gpu_concurrency=2)
    return replace(base, **changes)


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("per_message", ["100", "7"])
def test_counts_equal_push_dry_run(tmp_path: Path, per_message: str) -> None:
    """A tile list with duplicates and a bbox cover: the same tiles, messages and requests."""
    tiles = tmp_path / "tiles.txt"
    lines = [f"17/{x}/{y}" for x in range(37_000, 37_030) for y in range(50_000, 50_013)]
    tiles.write_text("\n".join(lines + lines[:40]) + "\n")
    for inputs in (
        [str(tiles)],
        ["--bbox", "-77.12,38.85,-76.95,38.97", "--zoom", "16"],
    ):
        common = [*inputs, "--source", XYZ, "--max-tiles-per-message", per_message, "--json"]
        pushed = invoke("push", "--dry-run", *common)
        assert pushed.exit_code == 0, pushed.output
        planned = invoke("plan", *common)
        assert planned.exit_code == 0, planned.output
        push_json = json.loads(pushed.stdout)
        plan_json = json.loads(planned.stdout)
        assert plan_json["counts"]["tiles"] == push_json["tiles"] > 100
        assert plan_json["counts"]["messages"] == push_json["messages"]
        assert plan_json["counts"]["requests"] == push_json["requests"]
        assert plan_json["counts"]["bytes"] == push_json["bytes"] > 0
        assert plan_json["sqs_requests"]["send"] == push_json["requests"]


def same_counts(*inputs: str) -> dict[str, Any]:
    """``plan`` and ``push --dry-run`` over the same inputs: the same tiles, messages,
    requests and bytes (the plan's counts, returned)."""
    pushed = invoke("push", "--dry-run", *inputs, "--json")
    assert pushed.exit_code == 0, pushed.output
    planned = invoke("plan", *inputs, "--json")
    assert planned.exit_code == 0, planned.output
    push_json, counts = json.loads(pushed.stdout), json.loads(planned.stdout)["counts"]
    for what in ("tiles", "messages", "requests", "bytes"):
        assert counts[what] == push_json[what], what
    return counts


@pytest.fixture(scope="module")
def naip_parts(naip: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The NAIP quarter-quad cut into three overlapping COGs, as STAC items."""
    folder = tmp_path_factory.mktemp("plan-parts")
    return [
        item(cut(naip, folder / f"{name}.tif", window), name, when, cloud)
        for name, window, when, cloud in PARTS
    ]


def test_counts_of_a_cog_list_and_a_collection_equal_push_dry_run(
    naip_parts: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Mosaic messages carry each pack's candidate assets: the list and the collection of
    the same parts count alike, and both more bytes than the same tiles of one XYZ source."""
    listing = tmp_path / "parts.txt"
    listing.write_text("".join(f"{i['assets']['visual']['href']}\n" for i in naip_parts))
    collection = tmp_path / "parts.json"
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": naip_parts}))
    common = ["--zoom", "18", "--job", "parts", "--max-tiles-per-message", "7"]
    listed = same_counts("--source", str(listing), *common)
    collected = same_counts("--source", str(collection), "--order", "newest", *common)
    assert listed["tiles"] == collected["tiles"] > 14 and listed["messages"] > 2
    assert listed["messages"] == collected["messages"]
    tiles = tmp_path / "tiles.txt"
    covered = invoke("cover", "--source", str(listing), "--zoom", "18", "-o", str(tiles))
    assert covered.exit_code == 0, covered.output
    plain = same_counts(str(tiles), "--source", XYZ, *common)
    assert plain["tiles"] == listed["tiles"] and plain["bytes"] < listed["bytes"]


def test_a_jobs_frozen_list_counts_as_push_counts_it(
    naip_parts: list[dict[str, Any]], tmp_path: Path
) -> None:
    """With --db, a mosaic job that has started keeps its frozen list, whatever the file
    says since: plan counts what push --dry-run counts, the three parts, not the one left."""
    from chipscale.sources.mosaic_source import resolve_mosaic

    collection = tmp_path / "parts.json"
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": naip_parts}))
    frozen = resolve_mosaic(str(collection), None)
    db = f"sqlite:///{tmp_path}/results.db"
    with open_store(db) as store:
        store.start_job(JobInfo("parts", str(collection), 18, extra=frozen.frozen()))
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": naip_parts[:1]}))
    common = ["--source", str(collection), "--zoom", "18", "--job", "parts"]
    kept = same_counts(*common, "--db", db)
    now = same_counts(*common)
    assert kept["tiles"] > now["tiles"] > 0


def test_mosaic_packs_split_to_fit_sqs_as_push_splits_them(tmp_path: Path) -> None:
    """60 long-named scenes inside each tile: a pack's candidates pass 256 KiB, so packs
    split; plan counts the split messages as push does."""
    tiles = list(mercantile.tiles(-77.06, 38.88, -77.0, 38.92, 15))
    items = []
    for tile in tiles:
        west, south, east, north = mercantile.bounds(tile)
        pad = (east - west) / 10
        box = (west + pad, south + pad, east - pad, north - pad)
        items += [
            {
                "type": "Feature",
                "stac_version": "1.0.0",
                "id": f"m_3807701_ne_18_060_20210924_{tile.x}_{tile.y}_{i:03d}",
                "geometry": shapely.geometry.mapping(shapely.box(*box)),
                "bbox": list(box),
                "properties": {"datetime": "2021-09-24T00:00:00Z"},
                "assets": {
                    "visual": {
                        "href": f"s3://naip-visualization/va/2021/60cm/{tile.x}/{tile.y}/{i}.tif",
                        "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                        "roles": ["data"],
                    }
                },
                "links": [],
            }
            for i in range(60)
        ]
    collection = tmp_path / "crowded.geojson"
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    listed = tmp_path / "tiles.txt"
    listed.write_text("".join(f"{t.z}/{t.x}/{t.y}\n" for t in tiles))
    mosaic = same_counts("--source", str(collection), "--zoom", "15", "--job", "crowded")
    plain = same_counts(str(listed), "--source", XYZ, "--job", "crowded")
    assert mosaic["tiles"] == plain["tiles"] == len(tiles) > 20
    assert mosaic["messages"] > plain["messages"]  # split to stay under SQS's limit
    assert mosaic["bytes"] > 256 * 1024


def test_counts_of_a_stac_api_search_equal_push_dry_run(
    stac_api: StacApi, naip_parts: list[dict[str, Any]]
) -> None:
    """--stac URL --collection C: the search runs once for each command, which count alike
    (and alike with the collection file of the same items)."""
    collection = f"plan-parts-{uuid.uuid4().hex[:8]}"
    stac_api.add_collection(collection, naip_parts)
    try:
        common = ["--zoom", "18", "--job", "parts", "--max-tiles-per-message", "7"]
        searched = same_counts("--stac", stac_api.url, "--collection", collection, *common)
    finally:
        stac_api.delete_collection(collection)
    assert searched["tiles"] > 14 and searched["messages"] > 2


def test_plan_prints_a_table_with_every_figure(tmp_path: Path) -> None:
    result = invoke("plan", "--bbox", "-77.1,38.88,-77.0,38.92", "--zoom", "17", "--source", XYZ)
    assert result.exit_code == 0, result.output
    for what in (
        "tiles", "messages", "SQS requests", "Lambda invocations", "Lambda GB-seconds",
        "GPU-hours", "PostgreSQL writes", "wall time", "bottleneck", "cost: total",
    ):  # fmt: skip
        assert what in result.stdout
    assert "us-east-1 on-demand of 2026-12-03" in result.stdout


# ----------------------------------------------------------------------------- costs


@settings(max_examples=30, deadline=None)
@given(
    tiles=st.integers(0, 10_000_000),
    instances=st.integers(1, 8),
    per_gpu=st.integers(1, 20),
    itype=st.sampled_from(["g5.xlarge", "g6.12xlarge", "g4dn.metal"]),
)
def test_cost_parts_add_up_to_the_total(
    tiles: int, instances: int, per_gpu: int, itype: str
) -> None:
    prices = load_prices()
    gpus = prices.instance(itype).gpus
    counts = Counts(tiles=tiles, messages=math.ceil(tiles / 100), requests=0, zoom=18)
    plan = make_plan(
        counts,
        fleet(
            instance_type=itype,
            instances=instances,
            gpus_per_instance=gpus,
            per_gpu_concurrency=per_gpu,
        ),
        default_profile(),
        prices,
    )
    assert sum(plan.costs.values()) == pytest.approx(plan.total_usd)
    assert all(v >= 0 for v in plan.costs.values())
    assert plan.gpu_hours == pytest.approx(plan.instance_hours * gpus)
    if tiles:
        hours = plan.instance_hours / instances
        assert plan.costs["gpu_instances"] == pytest.approx(
            instances * hours * prices.instance(itype).usd_per_hour
        )
        # the split status --plan uses gives the total back at the plan's own end
        assert plan.hourly_usd * hours + plan.per_tile_usd * tiles == pytest.approx(plan.total_usd)
    else:
        assert plan.total_usd == 0


def test_a_price_file_overrides_the_bundled_table(tmp_path: Path) -> None:
    table = json.loads((ROOT / "chipscale/ops/prices-us-east-1.json").read_text())
    table["date"] = "2030-01-01"
    table["instances"]["g5.xlarge"]["usd_per_hour"] = 10.0
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(table))
    args = ["plan", "--bbox", "-77.1,38.88,-77.0,38.92", "--zoom", "17", "--source", XYZ, "--json"]
    cheap = json.loads(invoke(*args).stdout)
    dear = json.loads(invoke(*args, "--prices", str(path)).stdout)
    assert dear["prices"]["date"] == "2030-01-01" != cheap["prices"]["date"]
    ratio = dear["costs"]["gpu_instances"] / cheap["costs"]["gpu_instances"]
    assert ratio == pytest.approx(10.0 / 1.006)


# ----------------------------------------------------------------------------- the model


def test_one_lambda_is_the_arithmetic_of_its_cycle() -> None:
    """MVA with one customer: no queue, throughput = 1 / (delay + demands)."""
    x, residence = mva(1, 2.0, [system_model.Station("a", 1, 1.0)])
    assert x == pytest.approx(1 / 3) and residence == [1.0]


def test_saturated_gpus_give_their_own_rate() -> None:
    """200 Lambdas on 2 GPUs of 100 tiles/s: the GPUs are the bound, 200 tiles/s."""
    solution = solve(rates(), fleet(instances=2, per_gpu_concurrency=100))
    assert solution.tiles_per_s == pytest.approx(200.0, rel=1e-3)
    assert solution.bottleneck == "model"
    assert solution.stations[0].utilization == pytest.approx(1.0, rel=1e-3)


def test_read_bound_lambdas_give_concurrency_over_their_read() -> None:
    """Two Lambdas reading 100-tile packs at 0.1 s a tile with a GPU of 1e6 tiles/s: each
    delivers a pack per 10 s (the predict overlaps the read), so 2 x 100 / 10 = 20 tiles/s."""
    solution = solve(rates(read_s=0.1, gpu_tiles_per_s=1e6), fleet())
    assert solution.concurrency == 2
    assert solution.tiles_per_s == pytest.approx(20.0, rel=1e-3)
    assert solution.bottleneck == "reads"
    serial = solve(rates(read_s=0.1, gpu_tiles_per_s=1000.0), fleet(read_ahead=False))
    assert serial.tiles_per_s == pytest.approx(2 * 100 / (10 + 0.1), rel=1e-3)
    # read-ahead works within an invocation's batch: alone in one, a pack reads, then predicts
    alone = solve(rates(read_s=0.1, gpu_tiles_per_s=1000.0), fleet(batch_size=1))
    assert alone.tiles_per_s == pytest.approx(serial.tiles_per_s, rel=1e-6)
    four = solve(rates(read_s=0.1, gpu_tiles_per_s=1000.0), fleet(batch_size=4))
    assert four.tiles_per_s == pytest.approx(2 * 100 / ((10 + 0.1 + 3 * 10) / 4), rel=1e-3)


def test_a_slow_database_is_the_bottleneck() -> None:
    solution = solve(rates(read_s=0.0, db_rows_per_s=50.0), fleet(per_gpu_concurrency=200))
    assert solution.tiles_per_s == pytest.approx(50.0, rel=1e-3)
    assert solution.bottleneck == "database"


def test_cpu_serving_counts_workers_up_to_the_cores() -> None:
    """Local bench: each TorchServe worker a server of its own, no more than the cores."""
    local = rates(shared_device=False, read_s=0.0)
    many = fleet(per_gpu_concurrency=200, workers_per_gpu=3)
    assert solve(local, replace(many, host_cores=2)).tiles_per_s == pytest.approx(200, rel=1e-2)
    assert solve(local, replace(many, host_cores=4)).tiles_per_s == pytest.approx(300, rel=1e-2)


def test_a_lone_lambda_spreads_its_requests_over_the_servers() -> None:
    """One Lambda, four servers of 100 tiles/s, nothing else to wait on: with four requests
    in flight its pack runs on all four (400 tiles/s), with one on one (100)."""
    local = rates(shared_device=False, read_s=0.0)
    alone = fleet(workers_per_gpu=4, host_cores=4, lambdas=1)
    assert solve(local, alone).tiles_per_s == pytest.approx(400, rel=1e-6)
    assert solve(local, replace(alone, requests_in_flight=1)).tiles_per_s == pytest.approx(100)


def test_a_queue_that_outlasts_the_timeout_is_said() -> None:
    slow = solve(rates(gpu_tiles_per_s=10.0), fleet(per_gpu_concurrency=50))
    assert slow.timeout_risk and "Lambda timeout" in slow.notes[0]
    assert slow.max_per_gpu_without_timeout == math.floor((120 - 10) * 10 / 400) == 2


# ----------------------------------------------------------------------------- tune agrees


@pytest.mark.parametrize("read", [0.005, 0.015, 0.030])
def test_tune_and_plan_agree(read: float) -> None:
    """The same feed, as tune measures it from a run's metrics and as plan takes it from a
    profile: X = 200 tiles/s a GPU, predict 0.012 s, write 0.001 s a tile."""
    tuned = tune.recommend(feeding_run(read=read))
    assert tuned.method == "feed model"
    profile_rates = rates(
        gpu_tiles_per_s=200.0, predict_overhead_s=0.012 - 1 / 200, read_s=read, write_s=0.001
    )
    planned = solve(profile_rates, fleet(instances=2))
    assert planned.recommended_per_gpu == tuned.target.per_gpu


# ----------------------------------------------------------------------------- bad input


def test_unknown_instance_type_is_one_line() -> None:
    result = invoke("plan", "--bbox", "0,0,1,1", "--zoom", "8", "--source", XYZ,
                    "--instance-type", "p9.huge")  # fmt: skip
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert "unknown instance type 'p9.huge'" in result.output
    with pytest.raises(PriceError, match=r"p9\.huge"):
        load_prices().instance("p9.huge")


def test_profile_missing_a_field_is_one_line(tmp_path: Path) -> None:
    profile = tmp_path / "profile.json"
    body = {"rates": {k: v for k, (v, _) in _defaults().items() if k != "read_s"}}
    profile.write_text(json.dumps(body))
    result = invoke("plan", "--bbox", "0,0,1,1", "--zoom", "8", "--source", XYZ,
                    "--profile", str(profile))  # fmt: skip
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert "lacks the rate 'read_s'" in result.output
    body["rates"]["read_s"] = "fast"
    profile.write_text(json.dumps(body))
    result = invoke("plan", "--bbox", "0,0,1,1", "--zoom", "8", "--source", XYZ,
                    "--profile", str(profile))  # fmt: skip
    assert "rate 'read_s' is not a number" in result.output and result.exit_code == 1


def _defaults() -> dict[str, Any]:
    from chipscale.ops.plan import DEFAULT_RATES

    return DEFAULT_RATES


# ----------------------------------------------------------------------------- status --plan


def test_status_shows_actual_against_planned(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/results.db"
    job = "plan-job"
    started = (datetime.now(UTC) - timedelta(seconds=100)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    with open_store(db) as store:
        store.start_job(JobInfo(job, XYZ, 17, tiles_total=400, extra={"push": {"at": started}}))
        store.write([TileResult(job, Tile(i, 0, 17), "ok", {"scores": {}}) for i in range(200)])
    plan_file = tmp_path / "plan.json"
    planned = invoke("plan", "--bbox", "-77.1,38.88,-77.0,38.92", "--zoom", "17",
                     "--source", XYZ, "--json")  # fmt: skip
    plan_file.write_text(planned.stdout)
    result = invoke("status", "--db", db, "--job", job, "--plan", str(plan_file), "--json")
    assert result.exit_code == 0, result.output
    versus = json.loads(result.stdout)["planned"]
    assert versus["done"] == 200
    assert versus["tiles_per_s"] == pytest.approx(2.0, rel=0.1)  # 200 tiles in ~100 s
    assert versus["remaining_s"] == pytest.approx(100, rel=0.1)
    plan = json.loads(plan_file.read_text())
    assert versus["usd_so_far"] == pytest.approx(
        plan["hourly_usd"] * versus["elapsed_s"] / 3600 + plan["per_tile_usd"] * 200
    )
    text = invoke("status", "--db", db, "--job", job, "--plan", str(plan_file))
    assert "actual 2." in text.stdout and "cost so far about $" in text.stdout
    no_job = invoke("status", "--db", db, "--plan", str(plan_file))
    assert no_job.exit_code == 2 and "--plan needs --job" in no_job.output


# ----------------------------------------------------------------------------- profile


def test_profile_writes_what_plan_reads(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    result = invoke(
        "profile", "--source", str(ROOT / "examples/rasterio_cogeo.tif"),
        "--model", str(ROOT / "examples/demo-model.pt"), "--zoom", "20", "--tiles", "20",
        "--read-latency-ms", "5", "-o", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    profile = json.loads(out.read_text())
    assert profile["rates"]["read_s"] > 0.0 and profile["rates"]["gpu_tiles_per_s"] > 0
    assert "5 ms per range request" in profile["sources"]["read_s"]
    planned = invoke("plan", "--bbox", "0,0,1,1", "--zoom", "8", "--source", XYZ,
                     "--profile", str(out), "--json")  # fmt: skip
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.stdout)["profile"] == str(out)
