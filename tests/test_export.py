"""CSV / GeoJSON export, thresholds, convert-geojson and the preview picture."""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path

import mercantile
import pytest
import rasterio
from mercantile import Tile
from rasterio.warp import transform_bounds

from chipscale.results import open_store
from chipscale.results.export import csv_to_geojson, export_results
from chipscale.results.export_csv import write_csv
from chipscale.results.export_geojson import write_geojson
from chipscale.results.export_rows import ExportError, filter_rows
from chipscale.values import JobInfo, ResultRow, TileResult

CLASSES = ("road", "field")


def row(x: int, y: int, status: str = "ok", road: float = 0.7, z: int = 18) -> ResultRow:
    output = {"scores": {"road": road, "field": round(1 - road, 6)}} if status == "ok" else None
    error = "boom" if status == "error" else None
    return ResultRow("job1", z, x, y, status, output, error, "net", "2", 1, "t", "t")  # type: ignore[arg-type]


ROWS = [
    row(100, 200, road=0.9),
    row(101, 200, road=0.2),
    row(102, 200, "empty"),
    row(103, 200, "error"),
]


@pytest.fixture
def store(tmp_path: Path):
    with open_store(str(tmp_path / "r.db")) as s:
        s.start_job(JobInfo("job1", "img.tif", zoom=18, classes=CLASSES))
        s.write(
            [
                TileResult(r.job, Tile(r.x, r.y, r.z), r.status, r.output, r.error, "net", "2")
                for r in ROWS
            ]
        )
        yield s


def test_csv_columns_and_values() -> None:
    out = io.StringIO()
    assert write_csv(ROWS, out, CLASSES) == 4
    lines = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert list(lines[0]) == [
        *("job", "z", "x", "y", "quadkey", "status", "road", "field"),
        *("model_name", "model_version", "error"),
    ]
    first = lines[0]
    assert first["quadkey"] == mercantile.quadkey(Tile(100, 200, 18))
    assert float(first["road"]) == 0.9
    assert [line["road"] for line in lines[2:]] == ["", ""]
    assert lines[3]["error"] == "boom"
    assert first["model_name"] == "net"


def test_output_without_scores_key() -> None:
    r = ResultRow("j", 1, 0, 0, "ok", {"road": 0.3, "field": 0.7}, None, None, None, 1, "", "")
    out = io.StringIO()
    write_csv([r], out, CLASSES)
    assert ",0.3,0.7," in out.getvalue()


def test_geojson_valid() -> None:
    out = io.StringIO()
    assert write_geojson(ROWS, out, CLASSES) == 4
    doc = json.loads(out.getvalue())
    assert doc["type"] == "FeatureCollection"
    assert len(doc["features"]) == 4
    feature = doc["features"][0]
    ring = feature["geometry"]["coordinates"][0]
    assert feature["geometry"]["type"] == "Polygon"
    assert ring[0] == ring[-1]
    area2 = sum(a[0] * b[1] - b[0] * a[1] for a, b in itertools.pairwise(ring))
    assert area2 > 0  # counter-clockwise
    west, south, east, north = mercantile.bounds(Tile(100, 200, 18))
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    assert min(xs) == pytest.approx(west, abs=1e-7) and max(xs) == pytest.approx(east, abs=1e-7)
    assert min(ys) == pytest.approx(south, abs=1e-7) and max(ys) == pytest.approx(north, abs=1e-7)
    assert -180 <= west <= 180 and -90 <= south <= 90
    props = feature["properties"]
    assert props["road"] == 0.9 and props["z"] == 18 and props["status"] == "ok"
    assert doc["features"][2]["properties"]["road"] is None


def test_empty_geojson_is_valid() -> None:
    out = io.StringIO()
    assert write_geojson([], out, CLASSES) == 0
    assert json.loads(out.getvalue()) == {"type": "FeatureCollection", "features": []}


def test_filters() -> None:
    assert len(list(filter_rows(ROWS, None, None))) == 4
    kept = list(filter_rows(ROWS, "road", 0.5))
    assert [(r.x, r.y) for r in kept] == [(100, 200)]
    assert [r.x for r in filter_rows(ROWS, "field", None)] == [101]  # top class
    assert [r.x for r in filter_rows(ROWS, None, 0.85)] == [100]  # top score
    with pytest.raises(ExportError, match=r"'forest'.*'road', 'field'"):
        filter_rows(ROWS, "forest", 0.5, classes=CLASSES)
    with pytest.raises(ExportError, match="Unknown class 'forest'"):
        list(filter_rows(ROWS, "forest", 0.5))


def test_export_results_by_suffix(store, tmp_path: Path) -> None:
    assert export_results(store, "job1", tmp_path / "out.csv") == 4
    assert (
        export_results(store, "job1", tmp_path / "out.geojson", class_name="road", min_score=0.5)
        == 1
    )
    doc = json.loads((tmp_path / "out.geojson").read_text())
    assert [f["properties"]["x"] for f in doc["features"]] == [100]
    assert export_results(store, None, tmp_path / "all.json") == 4
    with pytest.raises(ExportError, match="'forest'"):
        export_results(store, "job1", tmp_path / "f.csv", class_name="forest", min_score=0.1)
    with pytest.raises(ExportError, match="No job 'nope'"):
        export_results(store, "nope", tmp_path / "n.csv")


def test_export_bad_suffix_leaves_nothing(store, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"\.csv"):
        export_results(store, "job1", tmp_path / "out.xlsx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.db", "r.db-shm", "r.db-wal"]


def test_export_failure_leaves_no_partial_file(store, tmp_path: Path) -> None:
    store.write([TileResult("job1", Tile(5, 5, 18), "ok", {"scores": {"other": 1.0}})])
    target = tmp_path / "f.csv"
    with pytest.raises(ExportError):  # the row lacking 'road' fails mid-stream
        export_results(store, "job1", target, class_name="road", min_score=0.0)
    assert not target.exists()
    assert not list(tmp_path.glob("*.part"))


def test_classes_fall_back_to_output_keys(tmp_path: Path) -> None:
    with open_store(str(tmp_path / "r.db")) as s:
        s.write([TileResult("j", Tile(1, 1, 5), "ok", {"cat": 0.2, "dog": 0.8})])
        export_results(s, "j", tmp_path / "o.csv")
    header = (tmp_path / "o.csv").read_text().splitlines()[0]
    assert header == "job,z,x,y,quadkey,status,cat,dog,model_name,model_version,error"


def test_csv_to_geojson_round_trip(store, tmp_path: Path) -> None:
    export_results(store, "job1", tmp_path / "out.csv")
    assert csv_to_geojson(tmp_path / "out.csv", tmp_path / "all.geojson") == 4
    direct = io.StringIO()
    write_geojson(store.iter_results("job1"), direct, CLASSES)
    assert json.loads((tmp_path / "all.geojson").read_text()) == json.loads(direct.getvalue())
    n = csv_to_geojson(
        tmp_path / "out.csv", tmp_path / "r.geojson", class_name="road", min_score=0.5
    )
    assert n == 1


def test_csv_to_geojson_chip_n_scale_format(tmp_path: Path) -> None:
    # chip-n-scale's download wrote the JSON output unquoted after the x-y-z tile
    src = tmp_path / "cns.csv"
    src.write_text("tile,output\n100-200-18,[0.1,0.9]\n101-200-18,[0.8,0.2]\n")
    out = io.StringIO()
    assert csv_to_geojson(src, out, class_name="p1", min_score=0.75) == 1
    feature = json.loads(out.getvalue())["features"][0]
    assert feature["properties"]["p1"] == 0.9
    assert (feature["properties"]["x"], feature["properties"]["y"]) == (100, 200)
    out = io.StringIO()
    csv_to_geojson(src, out, tms=True)
    assert json.loads(out.getvalue())["features"][0]["properties"]["y"] == (1 << 18) - 1 - 200


def test_render_preview(aerial: Path, tmp_path: Path) -> None:
    from chipscale.results.preview import render_preview

    with rasterio.open(aerial) as src:
        bounds = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    tiles = sorted(mercantile.tiles(*bounds, 17))
    statuses = ["ok", "empty", "error"]
    rows = [row(t.x, t.y, statuses[i % 3] if i else "ok", z=17) for i, t in enumerate(tiles)]
    out = render_preview(
        str(aerial), iter(rows), CLASSES, tmp_path / "p" / "preview.png", max_size=512
    )
    from matplotlib.image import imread

    picture = imread(out)
    height, width = picture.shape[:2]
    assert out.suffix == ".png"
    assert 400 <= width <= 1200 and 400 <= height <= 1200
    assert picture[..., :3].std() > 0.05  # not a blank picture
