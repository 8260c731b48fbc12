"""Features and class-mask exports of a segmentation job, read back by tools that are not ours
(geopandas, GDAL through pyogrio and rasterio, rio-cogeo's port of GDAL's COG validator)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mercantile
import numpy as np
import pytest
import rasterio
import shapely
from mercantile import Tile
from pyproj import CRS, Geod
from shapely.geometry import Polygon, box
from test_feature_merge import NODATA, blobs, polygonize

from chipscale.results import open_store
from chipscale.results.base import ResultStore
from chipscale.results.export_features import (
    area_m2,
    export_features,
    read_features_geojson,
    to_lonlat,
)
from chipscale.results.mask_cog import write_mask_cog
from chipscale.values import JobInfo, TileFeature, TileResult

LONLAT = CRS.from_epsg(4326)
CLASSES = ("land", "water", "road")
Z, X0, Y0, SIZE = 17, 38000, 50000, 16


def store_mask(store: ResultStore, mask: np.ndarray, job: str = "seg", size: int = SIZE) -> None:
    """Write ``mask`` tile by tile as the pipeline does: fractions as output, every class's
    4-connected polygons as features, ``land`` the background."""
    store.start_job(JobInfo(job, "mask.tif", zoom=Z, classes=CLASSES))
    results = []
    for ty in range(mask.shape[0] // size):
        for tx in range(mask.shape[1] // size):
            block = np.ascontiguousarray(
                mask[ty * size : (ty + 1) * size, tx * size : (tx + 1) * size]
            )
            features = tuple(
                TileFeature(
                    CLASSES[v], shapely.to_wkb(p), background=CLASSES[v] == "land", size=size
                )
                for v, p in polygonize(block)
            )
            valid = block[block != NODATA]
            output = {
                c: float(np.mean(valid == i)) if valid.size else 0.0 for i, c in enumerate(CLASSES)
            }
            results.append(
                TileResult(job, Tile(X0 + tx, Y0 + ty, Z), "ok", output=output, features=features)
            )
    store.write(results)


@pytest.fixture
def mask() -> np.ndarray:
    m = blobs(np.random.default_rng(11), 4 * SIZE, 6 * SIZE, classes=3, cell=4)
    m[0:SIZE, 2 * SIZE : 3 * SIZE] = NODATA  # a tile with no class anywhere
    return m


@pytest.fixture
def sqlite_store(tmp_path: Path, mask: np.ndarray) -> ResultStore:
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    store_mask(store, mask)
    return store


def expected_regions(mask: np.ndarray) -> list[tuple[str, Polygon]]:
    """The whole mask polygonized at once, background left out, in lon/lat."""
    out = []
    for value, polygon in polygonize(mask):
        if CLASSES[value] == "land":
            continue
        moved = shapely.transform(polygon, lambda c: c + np.array([X0 * SIZE, Y0 * SIZE]))
        out.append((CLASSES[value], to_lonlat(moved, Z, SIZE)))
    return out


def test_area_is_the_ellipsoid_area() -> None:
    """The exact pixel-region formula against pyproj's geodesic area of the same outline with
    its parallel edges densified (a geodesic between close points hugs the parallel)."""
    z, size = 14, 256
    polygon = box(3_000_000, 1_500_000, 3_000_900, 1_500_700) - box(
        3_000_100, 1_500_100, 3_000_300, 1_500_200
    )
    lonlat = to_lonlat(polygon, z, size)
    dense = shapely.segmentize(lonlat, max_segment_length=1e-4)
    geodesic, _ = Geod(ellps="WGS84").geometry_area_perimeter(dense)
    ours = area_m2(polygon, z, size)
    assert ours == pytest.approx(abs(geodesic), rel=1e-7)
    web_mercator = polygon.area * (2 * 20037508.342789244 / (2**z * size)) ** 2
    assert ours < 0.5 * web_mercator  # at about 57 degrees north: not the projected area


def test_geojson_features_match_the_whole_mask(
    sqlite_store: ResultStore, mask: np.ndarray, tmp_path: Path
) -> None:
    import geopandas

    out = tmp_path / "regions.geojson"
    count = export_features(sqlite_store, "seg", out, "geojson")
    expected = expected_regions(mask)
    assert count == len(expected)
    frame = geopandas.read_file(out)  # GDAL's GeoJSON driver (pyogrio)
    assert len(frame) == count and set(frame["class"]) == {"water", "road"}
    assert frame.crs.to_epsg() == 4326
    left = list(expected)
    for cls, geometry, area, tiles in zip(
        frame["class"], frame.geometry, frame["area_m2"], frame["tiles"], strict=True
    ):
        assert geometry.exterior.is_ccw  # RFC 7946's right-hand rule
        assert all(not ring.is_ccw for ring in geometry.interiors)
        match = next(
            i for i, (c, p) in enumerate(left)
            if c == cls and p.intersection(geometry).area / p.union(geometry).area > 0.999
        )  # fmt: skip
        del left[match]
        assert area > 0 and tiles >= 1
    assert not left
    top_left = mercantile.ul(X0, Y0, Z)
    assert (
        frame.total_bounds[0] >= top_left.lng - 1e-9
        and frame.total_bounds[3] <= top_left.lat + 1e-9
    )


def test_geoparquet_and_flatgeobuf_agree_with_geojson(
    sqlite_store: ResultStore, tmp_path: Path
) -> None:
    import geopandas

    counts = {
        suffix: export_features(sqlite_store, "seg", tmp_path / f"r.{suffix}", fmt)
        for suffix, fmt in (
            ("geojson", "geojson"),
            ("parquet", "geoparquet"),
            ("fgb", "flatgeobuf"),
        )
    }
    assert len(set(counts.values())) == 1
    frames = {
        "geojson": geopandas.read_file(tmp_path / "r.geojson"),
        "parquet": geopandas.read_parquet(tmp_path / "r.parquet"),
        "fgb": geopandas.read_file(tmp_path / "r.fgb"),
    }
    for name, frame in frames.items():  # FlatGeobuf's packed R-tree orders features its way
        frame["key"] = [
            (c, round(a, 1), g.bounds)
            for c, a, g in zip(frame["class"], frame["area_m2"], frame.geometry, strict=True)
        ]
        frames[name] = frame.sort_values("key", ignore_index=True)
    for frame in frames.values():
        assert LONLAT.equals(frame.crs, ignore_axis_order=True)
        assert list(frame["class"]) == list(frames["geojson"]["class"])
        assert np.allclose(frame["area_m2"], frames["geojson"]["area_m2"], atol=1e-3)
        for a, b in zip(frame.geometry, frames["geojson"].geometry, strict=True):
            assert a.equals_exact(b, tolerance=1e-7)
    meta = json.loads(
        __import__("pyarrow.parquet").parquet.read_metadata(tmp_path / "r.parquet").metadata[b"geo"]
    )
    assert meta["columns"]["geometry"]["geometry_types"] == ["Polygon"]


def test_class_filter_and_round_trip(sqlite_store: ResultStore, tmp_path: Path) -> None:
    out = tmp_path / "roads.geojson"
    count = export_features(sqlite_store, "seg", out, "geojson", classes=["road"])
    back = list(read_features_geojson(out))
    assert count == len(back) > 0 and {f.cls for f in back} == {"road"}


def test_postgres_and_sqlite_give_identical_exports(
    sqlite_store: ResultStore, results_db: str, mask: np.ndarray, tmp_path: Path
) -> None:
    with open_store(results_db) as pg:
        store_mask(pg, mask)
        export_features(pg, "seg", tmp_path / "pg.geojson", "geojson")
        write_mask_cog(pg, "seg", tmp_path / "pg.tif")
    export_features(sqlite_store, "seg", tmp_path / "lite.geojson", "geojson")
    write_mask_cog(sqlite_store, "seg", tmp_path / "lite.tif")
    assert (tmp_path / "pg.geojson").read_bytes() == (tmp_path / "lite.geojson").read_bytes()
    with rasterio.open(tmp_path / "pg.tif") as a, rasterio.open(tmp_path / "lite.tif") as b:
        assert np.array_equal(a.read(1), b.read(1))


def test_mask_cog_validates_and_equals_the_mask(tmp_path: Path, mask: np.ndarray) -> None:
    from rio_cogeo.cogeo import cog_validate

    size = 128  # 5 x 5 tiles: 640 px, more than one COG block, so an overview
    coarse = np.random.default_rng(5).integers(0, 3, (5 * size // 20, 5 * size // 20))
    big = np.kron(coarse, np.ones((20, 20), dtype=np.uint8))[: 5 * size, : 5 * size]
    big[300:303, 200:207] = NODATA  # no class inside a tile too
    big[:size, :size] = NODATA  # a tile with no class
    big = np.ascontiguousarray(big, dtype=np.uint8)
    with open_store(f"sqlite:///{tmp_path / 'big.db'}") as store:
        store_mask(store, big, job="big", size=size)
        tiles = write_mask_cog(store, "big", tmp_path / "mask.tif")
    assert tiles == 24
    valid, errors, warnings = cog_validate(str(tmp_path / "mask.tif"), strict=True)
    assert valid, (errors, warnings)
    with rasterio.open(tmp_path / "mask.tif") as cog:
        assert cog.crs.to_epsg() == 3857 and cog.nodata == NODATA and cog.dtypes == ("uint8",)
        assert np.array_equal(cog.read(1), big)
        assert cog.overviews(1) == [2]
        half = cog.read(1, out_shape=(big.shape[0] // 2, big.shape[1] // 2))
        assert set(np.unique(half)) <= {0, 1, 2, NODATA}  # by mode: only values that exist
        assert (half == NODATA).any() and (half == 2).any()
        assert cog.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        west, _, _, north = cog.bounds
        ul = mercantile.xy_bounds(X0, Y0, Z)
        assert west == pytest.approx(ul.left) and north == pytest.approx(ul.top)
        assert cog.res[0] == pytest.approx((ul.right - ul.left) / size)


def test_mask_cog_of_one_class(sqlite_store: ResultStore, mask: np.ndarray, tmp_path: Path) -> None:
    write_mask_cog(sqlite_store, "seg", tmp_path / "water.tif", classes=["water"])
    with rasterio.open(tmp_path / "water.tif") as cog:
        assert np.array_equal(cog.read(1), np.where(mask == 1, 1, NODATA))


def cli_run(*args: str) -> Any:
    from click.testing import CliRunner

    from chipscale.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_download_writes_features_by_default_and_tiles_when_asked(
    sqlite_store: ResultStore, mask: np.ndarray, tmp_path: Path
) -> None:
    db = sqlite_store.url
    sqlite_store.close()
    result = cli_run("download", "--db", db, "--job", "seg", "-o", str(tmp_path / "f.geojson"))
    assert result.exit_code == 0, result.output
    regions = len(expected_regions(mask))
    assert f"{regions} features -> " in result.output
    result = cli_run(
        "download",
        "--db",
        db,
        "--job",
        "seg",
        "--layer",
        "tiles",
        "-o",
        str(tmp_path / "t.geojson"),
    )
    assert result.exit_code == 0 and "24 rows -> " in result.output  # 4 x 6 tiles
    tiles = json.loads((tmp_path / "t.geojson").read_text())["features"]
    assert {"water", "road", "land"} <= set(tiles[0]["properties"])
    result = cli_run("download", "--db", db, "--job", "seg", "-o", str(tmp_path / "t.csv"))
    assert result.exit_code == 0 and "24 rows -> " in result.output  # CSV: tiles
    result = cli_run(
        "download", "--db", db, "--job", "seg", "--class", "road", "-o", str(tmp_path / "r.fgb")
    )
    assert result.exit_code == 0, result.output
    road = sum(1 for c, _ in expected_regions(mask) if c == "road")
    assert f"{road} features -> " in result.output
    result = cli_run("download", "--db", db, "--job", "seg", "-o", str(tmp_path / "mask.tif"))
    assert result.exit_code == 0 and "23 tiles -> " in result.output  # one holds no class
    with rasterio.open(tmp_path / "mask.tif") as cog:
        assert np.array_equal(cog.read(1), mask)
    for args, message in (
        (["--layer", "features", "-o", str(tmp_path / "x.csv")], "not CSV"),
        (["--class", "sky", "-o", str(tmp_path / "x.geojson")], "Unknown class 'sky'"),
        (["--min-score", "0.5", "-o", str(tmp_path / "y.geojson")], "--layer tiles"),
    ):
        result = cli_run("download", "--db", db, "--job", "seg", *args)
        assert result.exit_code != 0 and message in result.output, result.output
    result = cli_run("download", "--db", db, "--layer", "features", "-o", str(tmp_path / "z.fgb"))
    assert result.exit_code != 0 and "give --job" in result.output


def test_download_through_the_stack_equals_a_direct_download(
    results_db: str, local_lambda: list[dict], mask: np.ndarray, tmp_path: Path
) -> None:
    from test_stack_outputs import chipscale_template, deploy_stack

    stack = deploy_stack(chipscale_template())
    with open_store(results_db) as pg:
        store_mask(pg, mask)
    for name in ("r.geojson", "r.parquet", "r.fgb", "mask.tif"):
        direct, via = tmp_path / "direct" / name, tmp_path / "via" / name
        for where, out in (("--db", results_db), ("--stack", stack)):
            target = direct if where == "--db" else via
            result = cli_run("download", where, out, "--job", "seg", "-o", str(target))
            assert result.exit_code == 0, result.output
        if name == "mask.tif":
            with rasterio.open(direct) as a, rasterio.open(via) as b:
                assert np.array_equal(a.read(1), b.read(1))
            continue
        import geopandas

        read = geopandas.read_parquet if name.endswith(".parquet") else geopandas.read_file
        a, b = read(direct), read(via)

        def key(frame: Any) -> list[Any]:
            bounds = frame.geometry.bounds.round(6).values.tolist()
            return sorted(zip(bounds, frame["class"], frame["tiles"], strict=True))

        assert len(a) == len(b) > 0 and key(a) == key(b)
        assert np.allclose(sorted(a["area_m2"]), sorted(b["area_m2"]), atol=1e-3)
    exports = [e for e in local_lambda if e["action"] == "export"]
    assert [(e["format"], e.get("convert_to")) for e in exports] == [
        ("geojson", None),
        ("csv", "geoparquet"),
        ("csv", "flatgeobuf"),
        ("mask", None),
    ]
    assert sorted(p.name for p in (tmp_path / "via").iterdir()) == sorted(
        ["r.geojson", "r.parquet", "r.fgb", "mask.tif"]
    )


def test_a_segmentation_run_writes_features_and_draws_them(aerial: Path, tmp_path: Path) -> None:
    import geopandas

    from chipscale.models import demo_segmentation
    from chipscale.sources.footprint import cover

    model = demo_segmentation.build(tmp_path / "seg.pt")
    covered = sorted(cover(19, source=str(aerial)))
    x0, y0 = covered[0].x + 2, min(t.y for t in covered) + 2
    (tmp_path / "tiles.txt").write_text(
        "".join(f"{x}-{y}-19\n" for x in (x0, x0 + 1) for y in (y0, y0 + 1))
    )
    out = tmp_path / "out"
    args = ["--source", str(aerial), "--zoom", "19", "--tiles", str(tmp_path / "tiles.txt")]
    result = cli_run("run", *args, "--model", str(model), "--out", str(out), "--workers", "1")
    assert result.exit_code == 0, result.output
    frame = geopandas.read_file(out / "features.geojson")
    assert len(frame) > 0 and frame["tiles"].max() > 1  # merged across the 2 x 2 tiles
    assert set(frame["class"]) <= {"snow", "forest", "bare_ground", "road"}
    with rasterio.open(out / "preview.png") as png:
        assert png.width > 500
    plain = tmp_path / "plain.png"
    from chipscale.results.preview import render_preview

    with open_store(f"sqlite:///{out / 'results.db'}") as store:
        rows = list(store.iter_results())
        render_preview(aerial, rows, ["snow", "forest", "bare_ground", "road"], plain)
    with rasterio.open(out / "preview.png") as a, rasterio.open(plain) as b:
        assert a.shape == b.shape and not np.array_equal(a.read(), b.read())
