"""Mosaic sources as the CLI takes them (issue 20): STAC API searches resolved with
pystac-client against a real STAC API on loopback (stac-fastapi-pgstac over pgstac,
tests/stac_api.py): paging, --max-items, --datetime, the area, sorting; the three forms
giving the same pixels; assets in (moto) S3 read through /vsis3/; the asset list frozen with
the job; the union of footprints covered; the assets of each tile exported."""

from __future__ import annotations

import csv
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mercantile
import numpy as np
import pytest
import rasterio
import shapely
from click.testing import CliRunner, Result
from conftest import free_port
from mercantile import Tile
from rasterio.windows import Window
from stac_api import StacApi, start_server, stop_server

from chipscale.cli import cli
from chipscale.errors import SourceError
from chipscale.results import open_store
from chipscale.results.export import export_results
from chipscale.sources import read_tiles
from chipscale.sources.footprint import source_footprint_lonlat
from chipscale.sources.mosaic import MosaicReader
from chipscale.sources.mosaic_source import resolve_mosaic
from chipscale.sources.stac_search import StacSearch, search_items
from chipscale.values import ImageData, JobInfo, TileResult

COLLECTION = "naip-parts"
ZOOM = 14


# -- imagery: the NAIP quarter-quad cut into overlapping parts ------------------------------

#: (id, window col_off, row_off, width, height, datetime, eo:cloud_cover)
PARTS = [
    ("west", (0, 0, 520, 723), "2020-08-31T00:00:00Z", 30.0),
    ("east", (400, 0, 534, 723), "2021-07-01T00:00:00Z", 5.0),
    ("north", (0, 0, 934, 300), "2019-06-15T00:00:00Z", 12.0),
]


def cut(naip: Path, out: Path, window: tuple[int, int, int, int]) -> Path:
    with rasterio.open(naip) as src:
        win = Window(*window)
        profile = {
            "driver": "GTiff",
            "width": win.width,
            "height": win.height,
            "count": src.count,
            "dtype": src.dtypes[0],
            "crs": src.crs,
            "transform": src.window_transform(win),
            "nodata": 0,
            "tiled": True,
            "blockxsize": 256,
            "blockysize": 256,
        }
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(src.read(window=win))
    return out


def item(path: Path, item_id: str, when: str, cloud: float) -> dict[str, Any]:
    west, south, east, north = source_footprint_lonlat(path)
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [],
        "id": item_id,
        "collection": COLLECTION,
        "geometry": shapely.geometry.mapping(shapely.box(west, south, east, north)),
        "bbox": [west, south, east, north],
        "properties": {"datetime": when, "eo:cloud_cover": cloud},
        "assets": {
            "visual": {
                "href": str(path),
                "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "roles": ["data"],
            }
        },
        "links": [],
    }


@pytest.fixture(scope="module")
def parts(naip: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("stac-parts")
    return [
        item(cut(naip, folder / f"{name}.tif", window), name, when, cloud)
        for name, window, when, cloud in PARTS
    ]


@dataclass(frozen=True)
class Catalogue:
    """The parts as a collection of their own in the session's STAC API."""

    server: StacApi
    collection: str
    items: list[dict[str, Any]]

    @property
    def url(self) -> str:
        return self.server.url

    def search(self, **options: Any) -> StacSearch:
        return StacSearch(self.url, self.collection, **options)


@pytest.fixture
def api(stac_api: StacApi, parts: list[dict[str, Any]]) -> Iterator[Catalogue]:
    collection = f"{COLLECTION}-{uuid.uuid4().hex[:8]}"
    stac_api.add_collection(collection, parts)
    yield Catalogue(stac_api, collection, parts)
    stac_api.delete_collection(collection)


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def one_line(result: Result) -> str:
    text = result.output.strip()
    assert result.exit_code != 0, text
    assert len(text.splitlines()) == 1, text
    assert "Traceback" not in text
    return text


def ids(items: list[dict[str, Any]]) -> list[str]:
    return [i["id"] for i in items]


# -- the search -------------------------------------------------------------------------
# pgstac answers newest first when not told otherwise: east (2021), west (2020), north (2019).


def test_a_search_follows_the_pages(api: Catalogue, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("chipscale.sources.stac_search.PAGE_SIZE", 2)
    before = api.server.searches()
    items = search_items(api.search())
    assert ids(items) == ["east", "west", "north"]
    assert api.server.searches() - before == 2  # two items a page: a second page, no third
    monkeypatch.setattr("chipscale.sources.stac_search.PAGE_SIZE", 500)
    before = api.server.searches()
    assert ids(search_items(api.search())) == ["east", "west", "north"]
    assert api.server.searches() - before == 1


def test_max_items_stops_the_search(api: Catalogue, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("chipscale.sources.stac_search.PAGE_SIZE", 1)
    before = api.server.searches()
    assert ids(search_items(api.search(max_items=2))) == ["east", "west"]
    assert api.server.searches() - before == 2  # a third page was never asked for


def test_the_search_takes_datetime_and_area(api: Catalogue, parts: list[dict[str, Any]]) -> None:
    found = search_items(api.search(datetime="2020-01-01/2022-01-01"))
    assert ids(found) == ["east", "west"]
    found = search_items(api.search(datetime="2019-01-01/2020-12-31"))
    assert ids(found) == ["west", "north"]
    east = shapely.geometry.shape(parts[1]["geometry"])
    west = shapely.geometry.shape(parts[0]["geometry"])
    north = shapely.geometry.shape(parts[2]["geometry"])
    only_east = east.difference(west).difference(north).buffer(-1e-4)
    assert not only_east.is_empty
    assert ids(search_items(api.search(), area=only_east)) == ["east"]
    only_west = west.difference(east).difference(north).buffer(-1e-4)
    assert ids(search_items(api.search(), area=only_west)) == ["west"]


def test_an_empty_search_is_one_line(api: Catalogue) -> None:
    expected = f"found no item in collection '{api.collection}'"
    with pytest.raises(SourceError, match=expected) as exc:
        search_items(api.search(datetime="1990-01-01/1991-01-01"))
    assert "datetime 1990-01-01/1991-01-01" in str(exc.value)
    text = one_line(
        run(
            "cover", "--stac", api.url, "--collection", api.collection,
            "--datetime", "1990-01-01/1991-01-01", "--zoom", "12",
        )
    )  # fmt: skip
    assert expected in text
    far = shapely.box(10.0, 10.0, 10.1, 10.1)  # the search's area misses every item
    with pytest.raises(SourceError, match=r"found no item .*area 10\.0000,10\.0000"):
        search_items(api.search(), area=far)


def test_an_unknown_collection_and_an_unreachable_api_are_one_line(api: Catalogue) -> None:
    text = one_line(run("cover", "--stac", api.url, "--collection", "nope", "--zoom", "12"))
    assert "has no collection 'nope'" in text
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    text = one_line(run("cover", "--stac", dead, "--collection", api.collection, "--zoom", "12"))
    assert f"cannot open the STAC API at {dead}" in text


def test_search_options_need_stac() -> None:
    result = run("cover", "--collection", COLLECTION, "--zoom", "12")
    assert result.exit_code == 2 and "--collection need --stac" in result.output
    result = run("cover", "--source", "a.tif", "--order", "newest", "--zoom", "12")
    assert result.exit_code == 2 and "--asset and --order apply to a mosaic" in result.output
    result = run("run", "--source", "a.txt", "--stac", "http://x", "--collection", "c", "-z", "3")
    assert result.exit_code == 2 and "not both" in result.output


def test_the_api_sorts_so_max_items_keeps_the_best(api: Catalogue) -> None:
    """The API conforms to the sort extension: ``--order`` becomes its sortby, and
    ``--max-items`` keeps the API's best N, not its first N."""
    least_cloudy = search_items(api.search(order="least-cloudy"))
    assert ids(least_cloudy) == ["east", "north", "west"]  # 5, 12, 30
    assert ids(search_items(api.search(order="oldest"))) == ["north", "west", "east"]
    assert ids(search_items(api.search(max_items=1, order="least-cloudy"))) == ["east"]
    assert ids(search_items(api.search(max_items=1, order="oldest"))) == ["north"]
    mosaic = resolve_mosaic(None, api.search(order="least-cloudy"), order="least-cloudy")
    assert [a.id for a in mosaic.assets] == ["east", "north", "west"]
    newest = resolve_mosaic(None, api.search(), order="newest")
    assert [a.id for a in newest.assets] == ["east", "west", "north"]


def test_an_api_without_sorting_is_ranked_here(
    api: Catalogue, stac_api: StacApi, tmp_path: Path
) -> None:
    """The same database behind a second server without the sort extension: pystac-client
    sends no sortby, and the items are ranked on this side."""
    from pystac_client import Client

    unsorted = start_server(
        stac_api.database, tmp_path / "unsorted.log", extensions="query,fields,filter,pagination"
    )
    try:
        assert not Client.open(unsorted.url).conforms_to("SORT")
        search = StacSearch(unsorted.url, api.collection, order="least-cloudy")
        mosaic = resolve_mosaic(None, search, order="least-cloudy")
        assert [a.id for a in mosaic.assets] == ["east", "north", "west"]
        oldest = StacSearch(unsorted.url, api.collection, order="oldest")
        assert [a.id for a in resolve_mosaic(None, oldest, order="oldest").assets] == [
            "north", "west", "east",
        ]  # fmt: skip
    finally:
        stop_server(unsorted)


# -- three forms, one answer ----------------------------------------------------------------


def seam_tiles(items: list[dict[str, Any]], zoom: int) -> list[Tile]:
    """Tiles over the parts: over the seams and beyond, some only partly covered."""
    union = shapely.union_all([shapely.geometry.shape(i["geometry"]) for i in items])
    west, south, east, north = union.bounds
    return list(mercantile.tiles(west, south, east, north, zoom))


def read_search(search: StacSearch, tiles: list[Tile]) -> dict[Tile, ImageData]:
    mosaic = resolve_mosaic(None, search)
    with MosaicReader(mosaic.index, source=mosaic.label) as reader:
        return dict(reader.read(tiles))


def test_three_forms_give_the_same_tiles(api: Catalogue, tmp_path: Path) -> None:
    """A COG list, an ItemCollection file and a STAC API search of the same parts, in the
    same order (the API's, newest first), give the same pixels, masks and assets."""
    found = search_items(api.search())
    listed = tmp_path / "parts.txt"
    hrefs = [i["assets"]["visual"]["href"] for i in found]
    listed.write_text("\n".join(hrefs) + "\n")
    collection = tmp_path / "parts.json"
    by_id = {i["id"]: i for i in api.items}
    features = [by_id[i["id"]] for i in found]
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    forms = [
        resolve_mosaic(str(listed), None),
        resolve_mosaic(str(collection), None),
        resolve_mosaic(None, api.search()),
    ]
    assert [[a.href for a in m.assets] for m in forms] == [hrefs] * 3

    tiles = seam_tiles(api.items, 16)
    assert len(tiles) >= 9
    from_list = dict(read_tiles(listed, tiles))
    from_collection = dict(read_tiles(collection, tiles))
    from_search = read_search(api.search(), tiles)
    assert set(from_list) == set(from_collection) == set(from_search) == set(tiles)
    seams = 0
    for tile in tiles:
        a, b, c = from_list[tile], from_collection[tile], from_search[tile]
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.mask, c.mask), tile
        assert np.array_equal(a.data, b.data) and np.array_equal(a.data, c.data), tile
        assert b.assets == c.assets, tile
        seams += len(c.assets) > 1
    assert seams >= 1  # some tile took pixels from two parts
    assert any(img.mask.all() for img in from_search.values())
    assert any(img.mask.any() and not img.mask.all() for img in from_search.values())

    forms_options = [
        ["--source", str(listed)],
        ["--source", str(collection)],
        ["--stac", api.url, "--collection", api.collection],
    ]
    covered = []
    for n, options in enumerate(forms_options):
        out = tmp_path / f"cover-{n}.txt"
        result = run("cover", *options, "--zoom", str(ZOOM), "-o", str(out))
        assert result.exit_code == 0, result.output
        covered.append(sorted(out.read_text().split()))
    assert covered[0] and covered[0] == covered[1] == covered[2]


# -- remote assets: a collection of s3:// hrefs, read through /vsis3/ -------------------------


def test_a_search_of_assets_in_s3_reads_them_through_vsis3(
    api: Catalogue,
    stac_api: StacApi,
    moto_server: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The same parts uploaded to (moto) S3, catalogued with ``s3://`` hrefs in a collection
    of the STAC API: a search reads them through GDAL's /vsis3/, the same pixels as the
    local files; ``chipscale tile --stac`` too."""
    import boto3

    from chipscale.sources import clear_reader_cache

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)  # boto3 and GDAL (gdal_env) use it
    for key in ("AWS_S3_ENDPOINT", "AWS_HTTPS", "AWS_VIRTUAL_HOSTING"):
        monkeypatch.delenv(key, raising=False)
    bucket = f"parts-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.create_bucket(Bucket=bucket)
    remote = []
    for item in api.items:
        local = Path(item["assets"]["visual"]["href"])
        s3.upload_file(str(local), bucket, f"naip/{local.name}")
        asset = {**item["assets"]["visual"], "href": f"s3://{bucket}/naip/{local.name}"}
        remote.append({**item, "assets": {"visual": asset}})
    collection = f"{COLLECTION}-s3-{uuid.uuid4().hex[:8]}"
    stac_api.add_collection(collection, remote)
    try:
        search = StacSearch(stac_api.url, collection)
        mosaic = resolve_mosaic(None, search)
        assert all(a.href.startswith(f"s3://{bucket}/naip/") for a in mosaic.assets)
        tiles = seam_tiles(api.items, 16)
        clear_reader_cache()
        from_s3 = read_search(search, tiles)
        from_disk = read_search(api.search(), tiles)
        for tile in tiles:
            assert np.array_equal(from_s3[tile].mask, from_disk[tile].mask), tile
            assert np.array_equal(from_s3[tile].data, from_disk[tile].data), tile
            assert from_s3[tile].assets == from_disk[tile].assets, tile
        assert any(img.mask.any() for img in from_s3.values())

        seam = next(t for t in tiles if len(from_s3[t].assets) > 1)
        out = tmp_path / "t.npz"
        name = f"{seam.z}/{seam.x}/{seam.y}"
        result = run(
            "tile", "--stac", stac_api.url, "--collection", collection, name, "-o", str(out)
        )
        assert result.exit_code == 0, result.output
        assert f"assets read: {', '.join(from_s3[seam].assets)}" in result.output
        # one tile alone (a pack of one warps its own window): as the local files give it
        alone = read_search(api.search(), [seam])[seam]
        assert np.array_equal(np.load(out)["data"], alone.data) and alone.data.any()

        # an item whose object is not in the bucket, newest so read first: one line naming it
        ghost = {**remote[0], "id": "ghost", "properties": {"datetime": "2025-01-01T00:00:00Z"}}
        ghost["assets"] = {"visual": {**ghost["assets"]["visual"], "href": f"s3://{bucket}/no.tif"}}
        stac_api.add_items(collection, [ghost])
        result = run(
            "tile", "--stac", stac_api.url, "--collection", collection, name, "-o", str(out)
        )
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, result.output
        assert errors[0].startswith(f"Error: asset ghost: cannot read raster s3://{bucket}/no.tif")
    finally:
        stac_api.delete_collection(collection)


# -- cover: the union of the footprints ---------------------------------------------------


def test_cover_of_an_l_shaped_union_leaves_the_corner_out(tmp_path: Path) -> None:
    """Three footprints in an L: the bbox of the union holds a corner no asset covers, and
    no tile of the cover lies wholly inside it."""
    boxes = {"a": (0.0, 0.0, 0.1, 0.1), "b": (0.1, 0.0, 0.2, 0.1), "c": (0.0, 0.1, 0.1, 0.2)}
    features = [
        {
            "type": "Feature",
            "stac_version": "1.0.0",
            "id": name,
            "geometry": shapely.geometry.mapping(shapely.box(*bounds)),
            "properties": {"datetime": "2020-01-01T00:00:00Z"},
            "assets": {"visual": {"href": f"s3://bucket/{name}.tif"}},
            "links": [],
        }
        for name, bounds in boxes.items()
    ]
    collection = tmp_path / "l.geojson"
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    out = tmp_path / "tiles.txt"
    result = run("cover", "--source", str(collection), "--zoom", "14", "-o", str(out))
    assert result.exit_code == 0, result.output
    tiles = [Tile(*map(int, line.split("-"))) for line in out.read_text().split()]
    corner = shapely.box(0.1, 0.1, 0.2, 0.2)
    inside = [t for t in tiles if corner.contains(shapely.box(*mercantile.bounds(t)))]
    assert inside == []
    whole = set(mercantile.tiles(0, 0, 0.2, 0.2, 14))
    corner_tiles = {t for t in whole if corner.contains(shapely.box(*mercantile.bounds(t)))}
    assert len(corner_tiles) >= 9  # the corner is a real part of the bbox
    union = shapely.union_all([shapely.box(*b) for b in boxes.values()])
    boxes_of = {t: shapely.box(*mercantile.bounds(t)) for t in whole}
    expected = {t for t, b in boxes_of.items() if union.intersects(b) and not union.touches(b)}
    assert set(tiles) == expected and len(tiles) == len(set(tiles))


# -- freezing -----------------------------------------------------------------------------


def test_the_asset_list_is_frozen_with_the_job(
    api: Catalogue, tmp_path: Path, demo_model_file: Path
) -> None:
    """A run of a search freezes what it found; the catalogue then changes (an item goes, a
    new one comes first), and the re-run of the job reads the frozen list, with no search."""
    out = tmp_path / "out"
    args = [
        "run", "--stac", api.url, "--collection", api.collection, "--order", "least-cloudy",
        "--zoom", str(ZOOM), "--model", str(demo_model_file), "--out", str(out),
        "--no-preview", "--workers", "1",
    ]  # fmt: skip
    first = run(*args)
    assert first.exit_code == 0, first.output
    db = f"sqlite:///{out / 'results.db'}"
    with open_store(db) as store:
        (job,) = store.jobs()
        frozen = job.extra["assets"]
        rows = {(r.x, r.y): r for r in store.iter_results(job.job)}
    assert [a["id"] for a in frozen["list"]] == ["east", "north", "west"]
    assert job.source.startswith(f"stac:{api.url} collection={api.collection}")
    ok = [r for r in rows.values() if r.status == "ok"]
    assert ok and all(r.assets for r in ok)
    assert {a for r in ok for a in r.assets} <= {"east", "north", "west"}
    with (out / "results.csv").open() as handle:
        exported = list(csv.DictReader(handle))
    assert exported and all(json.loads(row["assets"]) for row in exported if row["status"] == "ok")

    api.server.delete_item(api.collection, "north")  # north goes, a newer item comes first
    newer = {**api.items[0], "id": "newer", "properties": {"datetime": "2024-01-01T00:00:00Z"}}
    api.server.add_items(api.collection, [newer])
    assert ids(search_items(api.search()))[0] == "newer"
    searches = api.server.searches()
    (out / "results.csv").unlink()
    (out / "results.geojson").unlink()
    again = run(*args)
    assert again.exit_code == 0, again.output
    assert "as frozen when it started" in again.output
    assert api.server.searches() == searches  # the worker-side of a re-run never searched
    with open_store(db) as store:
        (rerun,) = store.jobs()
    assert rerun.extra["assets"] == frozen


# -- exports carry the assets -------------------------------------------------------------


def test_exports_carry_the_assets_of_a_mosaic_job(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    tiles = [Tile(10, 20, 6), Tile(11, 20, 6)]
    with open_store(db) as store:
        store.start_job(JobInfo("m", "parts.txt", classes=("a",), extra={"assets": {}}))
        store.start_job(JobInfo("plain", "one.tif", classes=("a",)))
        store.write(
            [
                TileResult("m", tiles[0], "ok", {"a": 1.0}, assets=("east", "west")),
                TileResult("m", tiles[1], "empty"),
                TileResult("plain", tiles[0], "ok", {"a": 1.0}),
            ]
        )
        for name in ("m.csv", "m.geojson", "m.parquet"):
            export_results(store, "m", tmp_path / name)
        export_results(store, "plain", tmp_path / "plain.csv")
    with (tmp_path / "m.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [json.loads(r["assets"]) for r in rows] == [["east", "west"], []]
    features = json.loads((tmp_path / "m.geojson").read_text())["features"]
    assert [f["properties"]["assets"] for f in features] == [["east", "west"], []]
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "m.parquet")
    assert table.column("assets").to_pylist() == [["east", "west"], []]
    with (tmp_path / "plain.csv").open() as handle:
        assert "assets" not in next(csv.reader(handle))  # a one-raster job: no column


def test_frozen_assets_round_trip_and_candidates(parts: list[dict[str, Any]]) -> None:
    from chipscale.sources.assets import assets_from_items
    from chipscale.sources.mosaic_source import MosaicSource, thaw

    mosaic = MosaicSource("x", tuple(assets_from_items(json.loads(json.dumps(parts)))))
    assert thaw(mosaic.frozen(), "x") == mosaic
    tampered = json.loads(json.dumps(mosaic.frozen()))
    tampered["assets"]["list"][0]["href"] = "s3://elsewhere/a.tif"
    with pytest.raises(SourceError, match="does not match its sha256"):
        thaw(tampered, "x")
    west = shapely.geometry.shape(parts[0]["geometry"])
    lon, lat = west.representative_point().coords[0]
    tile = mercantile.tile(lon, lat, 18)
    ids = [c[0] for c in mosaic.candidates([tile])]
    assert "west" in ids and ids == sorted(ids, key=["west", "east", "north"].index)
    assert np.isfinite(np.array([c[2] for c in mosaic.candidates([tile])])).all()


def test_tile_reads_one_tile_of_a_search_and_of_a_list(api: Catalogue, tmp_path: Path) -> None:
    west = shapely.geometry.shape(api.items[0]["geometry"])
    east = shapely.geometry.shape(api.items[1]["geometry"])
    lon, lat = west.intersection(east).centroid.coords[0]  # on the seam of two parts
    tile = mercantile.tile(lon, lat, 16)
    out = tmp_path / "t.npz"
    name = f"{tile.z}/{tile.x}/{tile.y}"
    searched = run("tile", "--stac", api.url, "--collection", api.collection, name, "-o", str(out))
    assert searched.exit_code == 0, searched.output
    assert "assets read: east" in searched.output  # the newest first, and it fills the tile
    from_search = np.load(out)["data"]
    listed = tmp_path / "parts.txt"
    found = search_items(api.search())  # the list in the API's order
    listed.write_text("\n".join(i["assets"]["visual"]["href"] for i in found) + "\n")
    result = run("tile", str(listed), name, "-o", str(out))
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.load(out)["data"], from_search) and from_search.any()
    result = run(
        "tile", "--stac", api.url, "--collection", api.collection, "a.tif", name, "-o", "x"
    )
    assert result.exit_code == 2 and "give TILE alone" in result.output
