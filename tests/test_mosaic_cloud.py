"""Mosaic jobs in the cloud (issue 20): each message carries its pack's candidate assets
within SQS's 256 KiB, the worker reads them without a STAC API, every asset must pass
CHIPSCALE_ALLOWED_SOURCES (a message naming one outside is rejected, the reason naming it),
and a push over a collection, then the worker, stores each tile's assets. Run as Lambda runs
it: moto's SQS and S3, the handler of lambdas/, results in the machine's PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import mercantile
import pytest
import rasterio
import shapely
from click.testing import CliRunner
from mercantile import Tile
from rasterio.windows import Window
from test_sqs_worker import (  # noqa: F401 (fixtures)
    ZOOM,
    lambda_env,
    load_handler,
    queue,
    receive_all,
    run_batches,
    send_packs,
)
from test_stack_outputs import chipscale_template, deploy_stack

from chipscale.cli import cli
from chipscale.cloud.push_send import MAX_BATCH_BYTES, PushError, pack_entries
from chipscale.grid.packs import pack_tiles
from chipscale.pipeline.messages import AssetRef, PackMessage, parse_message
from chipscale.results import open_store
from chipscale.sources.assets import Asset
from chipscale.sources.footprint import cover, source_footprint_lonlat
from chipscale.sources.mosaic_source import MosaicSource
from chipscale.values import TileResult

# -- messages within SQS's limit ----------------------------------------------------------


def crowded_mosaic(count: int, tiles: list[Tile]) -> MosaicSource:
    """``count`` assets, each covering every tile, with long hrefs."""
    west, south, east, north = (
        min(mercantile.bounds(t).west for t in tiles),
        min(mercantile.bounds(t).south for t in tiles),
        max(mercantile.bounds(t).east for t in tiles),
        max(mercantile.bounds(t).north for t in tiles),
    )
    assets = [
        Asset(
            id=f"m_4709963_se_14_060_20200831_{i:05d}",
            href=f"s3://naip-visualization/ny/2020/60cm/rgb/47099/m_4709963_se_14_1_{i:05d}.tif",
            footprint=(west - 1e-3, south - 1e-3, east + 1e-3, north + 1e-3),
        )
        for i in range(count)
    ]
    return MosaicSource("naip.json", tuple(assets))


def refs(mosaic: MosaicSource) -> Any:
    return lambda pack: tuple(AssetRef(*c) for c in mosaic.candidates(pack))


def scattered_mosaic(tiles: list[Tile], per_tile: int) -> MosaicSource:
    """``per_tile`` small assets inside each tile (none reaching a neighbour)."""
    assets = []
    for tile in tiles:
        west, south, east, north = mercantile.bounds(tile)
        pad = (east - west) / 10
        for i in range(per_tile):
            assets.append(
                Asset(
                    id=f"m_{tile.x}_{tile.y}_{i:03d}",
                    href=f"s3://naip-visualization/ny/2020/60cm/rgb/{tile.x}/{tile.y}/m_{i:03d}.tif",
                    footprint=(west + pad, south + pad, east - pad, north - pad),
                )
            )
    return MosaicSource("naip.json", tuple(assets))


def test_a_pack_with_many_candidates_is_split_to_fit_sqs() -> None:
    tiles = sorted(mercantile.children(Tile(100, 200, 9), zoom=12), key=mercantile.quadkey)
    mosaic = scattered_mosaic(tiles, 40)  # 2,560 candidates, about 330 kB, for the 64 tiles
    entries = list(
        pack_entries(tiles, job="j", source="naip.json", max_tiles=64, candidates=refs(mosaic))
    )
    assert all(e.size <= MAX_BATCH_BYTES for e in entries)
    assert len(entries) > 1  # one pack of 64 tiles, split until each message fits
    carried: list[Tile] = []
    for entry in entries:
        message = parse_message(entry.body, max_tiles=64)
        carried += message.tiles
        wanted = {f"m_{t.x}_{t.y}_{i:03d}" for t in message.tiles for i in range(40)}
        assert {a.id for a in message.assets} == wanted  # each tile's own, no other
    assert sorted(carried) == sorted(tiles)
    sizes = [e.size for e in entries]
    print(
        json.dumps(
            {"candidates": len(mosaic.assets), "messages": len(entries), "max_bytes": max(sizes)}
        )
    )


def test_one_tile_with_too_many_candidates_is_one_line() -> None:
    tile = Tile(100, 200, 9)
    mosaic = crowded_mosaic(3000, [tile])
    with pytest.raises(PushError, match=r"tile 9/100/200 has 3,000 candidate assets") as exc:
        list(pack_entries([tile], job="j", source="x.json", candidates=refs(mosaic)))
    assert "\n" not in str(exc.value)


def test_messages_without_candidates_are_as_before() -> None:
    tiles = (Tile(1, 2, 3),)
    body = PackMessage("j", "s3://b/a.tif", tiles).to_json()
    assert "assets" not in json.loads(body)
    assert parse_message(body).assets == ()


@pytest.mark.parametrize(
    ("assets", "reason"),
    [
        ([], "non-empty list"),
        ([["a", "s3://b/a.tif"]], "is not [id, href, bbox]"),
        ([["a", "s3://b/a.tif", [0, 0, 1]]], "is not [w, s, e, n]"),
        ([["a", "s3://b/a.tif", [0, 0, 1, 1]], ["a", "s3://b/b.tif", [0, 0, 1, 1]]], "repeats"),
        ([["a\u0000", "s3://b/a.tif", [0, 0, 1, 1]]], "control character"),
    ],
)
def test_malformed_candidates_are_refused(assets: list[Any], reason: str) -> None:
    from chipscale.errors import InvalidMessageError

    body = {"v": 1, "job": "j", "source": "x.json", "tiles": [[0, 0, 1]], "assets": assets}
    with pytest.raises(InvalidMessageError, match=reason.replace("[", r"\[")):
        parse_message(json.dumps(body))


# -- the worker ---------------------------------------------------------------------------


@pytest.fixture
def mosaic_bucket(lambda_env: SimpleNamespace, aerial: Path, tmp_path: Path) -> SimpleNamespace:  # noqa: F811
    """The allowed bucket holds the aerial COG and its western half (``left.tif``), and a
    collection file names both, the half first (so it supplies the tiles it covers)."""
    left = tmp_path / "left.tif"
    with rasterio.open(aerial) as src:
        window = Window(0, 0, src.width // 2, src.height)
        profile = {**src.profile, "width": window.width, "transform": src.window_transform(window)}
        profile.pop("blockxsize", None), profile.pop("blockysize", None)
        with rasterio.open(left, "w", **{**profile, "tiled": False}) as dst:
            dst.write(src.read(window=window))
    boto3.client("s3").upload_file(str(left), lambda_env.bucket, "left.tif")
    items = []
    for name, path in (("left", left), ("aerial", aerial)):  # keys left.tif, aerial.tif
        bounds = source_footprint_lonlat(path)
        items.append(
            {
                "type": "Feature",
                "stac_version": "1.0.0",
                "id": name,
                "geometry": shapely.geometry.mapping(shapely.box(*bounds)),
                "bbox": list(bounds),
                "properties": {"datetime": "2020-01-01T00:00:00Z"},
                "assets": {"visual": {"href": f"s3://{lambda_env.bucket}/{name}.tif"}},
                "links": [],
            }
        )
    collection = tmp_path / "scenes.json"
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    return SimpleNamespace(**vars(lambda_env), collection=collection, left=left)


def test_a_message_naming_an_asset_outside_the_allow_list_is_rejected(
    mosaic_bucket: SimpleNamespace,
    queue: SimpleNamespace,  # noqa: F811 (fixture)
    monkeypatch: pytest.MonkeyPatch,
    demo_model_file: Path,
    aerial: Path,
) -> None:
    module = load_handler(monkeypatch, str(demo_model_file))
    tiles = tuple(cover(ZOOM, source=str(aerial)))[:4]
    bbox = source_footprint_lonlat(aerial)
    allowed = AssetRef("aerial", f"s3://{mosaic_bucket.bucket}/aerial.tif", bbox)
    outside = AssetRef("secret-scene", "s3://someone-else/secret.tif", bbox)
    sneaky = AssetRef("dots", f"s3://{mosaic_bucket.bucket}/../someone-else/x.tif", bbox)
    bodies = [
        PackMessage("good", "scenes.json", tiles, (allowed,)).to_json(),
        PackMessage("bad", "scenes.json", tiles, (allowed, outside)).to_json(),
        PackMessage("dots", "scenes.json", tiles, (sneaky,)).to_json(),
        # the source of a mosaic message is never read: only its assets are checked
        PackMessage("label", "/etc/passwd", tiles, (allowed,)).to_json(),
    ]
    send_packs(queue, bodies)
    assert run_batches(module, queue, receive_all(queue)) == []
    with open_store(mosaic_bucket.db) as store:
        reasons = {r.job: r.reason for r in store.rejects()}
        good = list(store.iter_results("good"))
        assert store.counts("bad")["total"] == 0 and store.counts("dots")["total"] == 0
        assert store.counts("label")["total"] == len(tiles)
    assert set(reasons) == {"bad", "dots"}
    assert "asset 'secret-scene'" in reasons["bad"]
    assert "s3://someone-else/secret.tif" in reasons["bad"]
    assert "outside the allowed sources" in reasons["bad"]
    assert "asset 'dots'" in reasons["dots"] and "dot segment" in reasons["dots"]
    assert sorted((r.x, r.y, r.z) for r in good) == sorted(tiles)
    assert {r.assets for r in good if r.status == "ok"} == {("aerial",)}
    module.worker().close()


def test_push_a_collection_then_the_worker(
    mosaic_bucket: SimpleNamespace,
    queue: SimpleNamespace,  # noqa: F811 (fixture)
    monkeypatch: pytest.MonkeyPatch,
    demo_model_file: Path,
    aerial: Path,
) -> None:
    """push over a collection: the cover of its footprints, each message with its pack's
    candidates, the list frozen with the job; a dry run counts what the push sends; the
    worker stores which asset supplied each tile."""
    runner = CliRunner()
    base = ["push", "--source", str(mosaic_bucket.collection), "--zoom", str(ZOOM), "--json"]
    dry = runner.invoke(cli, [*base, "--dry-run", "--job", "scenes"])
    assert dry.exit_code == 0, dry.output
    counted = json.loads(dry.stdout)
    pushed = runner.invoke(cli, [*base, queue.url, "--db", mosaic_bucket.db, "--job", "scenes"])
    assert pushed.exit_code == 0, pushed.output
    sent = json.loads(pushed.stdout)
    tiles = list(cover(ZOOM, source=str(aerial)))
    assert counted["tiles"] == sent["tiles_sent"] == len(tiles)
    assert counted["messages"] == sent["messages_sent"] == len(list(pack_tiles(tiles, 100)))
    assert counted["bytes"] == sent["bytes"]

    messages = receive_all(queue)
    carried = [json.loads(m["Body"]) for m in messages]
    assert all(body["source"] == str(mosaic_bucket.collection) for body in carried)
    assert all(body["assets"] for body in carried)
    module = load_handler(monkeypatch, str(demo_model_file))
    assert run_batches(module, queue, messages) == []
    with open_store(mosaic_bucket.db) as store:
        job = store.get_job("scenes")
        rows = list(store.iter_results("scenes"))
    assert job is not None and [a["id"] for a in job.extra["assets"]["list"]] == [
        "left",
        "aerial",
    ]
    errors = {r.error for r in rows if r.status == "error"}
    assert len(rows) == len(tiles) and errors == set(), errors
    supplied = {a for r in rows for a in r.assets}
    assert supplied == {"left", "aerial"}  # the half first; the whole image east of it
    west_half = shapely.box(*source_footprint_lonlat(mosaic_bucket.left)).buffer(-1e-6)
    for row in rows:
        if row.status == "ok" and west_half.contains(
            shapely.box(*mercantile.bounds(row.x, row.y, row.z))
        ):
            assert row.assets == ("left",)
    module.worker().close()


@pytest.mark.parametrize("where", ["--stack", "--db"])
def test_push_reads_the_frozen_list_back_with_stack_as_with_db(
    where: str,
    mosaic_bucket: SimpleNamespace,
    local_lambda: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """push freezes the collection's list with the job (with --stack, through record-job);
    the collection is then edited, and push --resume reads the frozen list back (with
    --stack, through the operations Lambda's `job` action, its answer through the results
    bucket here): the same assets, no new read. A tampered frozen list is refused and
    nothing is sent."""
    from dataclasses import replace

    from chipscale.ops import operations_actions
    from chipscale.sources import mosaic_source

    stack = deploy_stack(chipscale_template())
    cfn = boto3.client("cloudformation").describe_stacks(StackName=stack)["Stacks"][0]
    url = next(o["OutputValue"] for o in cfn["Outputs"] if o["OutputKey"] == "QueueUrl")
    stack_queue = SimpleNamespace(sqs=boto3.client("sqs"), url=url)
    runner = CliRunner()
    collection = mosaic_bucket.collection
    target = ["--stack", stack] if where == "--stack" else [url, "--db", mosaic_bucket.db]
    base = ["push", *target, "--source", str(collection), "--zoom", str(ZOOM)]
    first = runner.invoke(cli, [*base, "--job", "scenes", "--json"])
    assert first.exit_code == 0, first.output
    calls = ["job", "record-job", "record-job"] if where == "--stack" else []
    assert [e["action"] for e in local_lambda] == calls
    sent = json.loads(first.stdout)
    bodies = [json.loads(m["Body"]) for m in receive_all(stack_queue)]
    assert {a[0] for body in bodies for a in body["assets"]} == {"left", "aerial"}
    tiles = sorted(Tile(x, y, z) for body in bodies for x, y, z in body["tiles"])
    assert len(tiles) == sent["tiles_sent"]
    with open_store(mosaic_bucket.db) as store:
        info = store.get_job("scenes")
        assert info is not None
        frozen = info.extra["assets"]
        assert [a["id"] for a in frozen["list"]] == ["left", "aerial"]
        store.write([TileResult("scenes", t, "ok", {"a": 1.0}) for t in tiles[:3]])

    # The catalogue changes: "left" is gone, a new scene comes first.
    features = json.loads(collection.read_text())["features"]
    newer = {**features[1], "id": "newer"}
    newer["assets"] = {"visual": {"href": f"s3://{mosaic_bucket.bucket}/newer.tif"}}
    collection.write_text(
        json.dumps({"type": "FeatureCollection", "features": [newer, features[1]]})
    )

    def no_new_read(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the mosaic was resolved again")

    monkeypatch.setattr(mosaic_source, "resolve_mosaic", no_new_read)
    monkeypatch.setattr(operations_actions, "INLINE_ANSWER_BYTES", 0)  # through the bucket
    again = runner.invoke(cli, [*base, "--job", "scenes", "--resume", "--json"])
    assert again.exit_code == 0, again.output
    assert "assets as frozen when it started" in again.stderr
    resumed = json.loads(again.stdout)
    assert resumed["skipped"] == 3 and resumed["tiles_sent"] == sent["tiles_sent"] - 3
    carried = [json.loads(m["Body"]) for m in receive_all(stack_queue)]
    assert {a[0] for body in carried for a in body["assets"]} == {"left", "aerial"}
    assert sum(len(body["tiles"]) for body in carried) == resumed["tiles_sent"]
    if where == "--stack":
        assert [e["action"] for e in local_lambda[3:]] == [
            "job", "done-tiles", "record-job", "record-job"
        ]  # fmt: skip
    with open_store(mosaic_bucket.db) as store:
        info = store.get_job("scenes")
        assert info is not None and info.extra["assets"] == frozen

        # Someone edits the frozen list in the database: its digest no longer matches.
        tampered = [{**a, "href": "s3://elsewhere/x.tif"} for a in frozen["list"]]
        store.start_job(replace(info, extra={**info.extra, "assets": {**frozen, "list": tampered}}))
    refused = runner.invoke(cli, [*base, "--job", "scenes", "--resume"])
    assert refused.exit_code == 1
    assert (
        "frozen asset list of" in refused.output and "does not match its sha256" in refused.output
    )
    assert receive_all(stack_queue) == []
