"""GeoParquet export: the CSV's rows and columns, typed, plus tile footprints (WKB) and their
bbox covering, with GeoParquet 1.1 metadata; read back with pyarrow and shapely, directly
(--db) and through a stack (--stack: a CSV export in the Lambda, converted by the CLI)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mercantile
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
from click.testing import CliRunner, Result
from mercantile import Tile
from test_stack_outputs import chipscale_template, deploy_stack

from chipscale.cli import cli
from chipscale.ops.operations_actions import OperationsEnvironment, run_action
from chipscale.ops.operations_client import StackOperations
from chipscale.results import open_store
from chipscale.results.export import export_results, format_for
from chipscale.results.export_geoparquet import write_geoparquet
from chipscale.results.export_rows import ExportError
from chipscale.values import JobInfo, ResultRow, TileResult

CLASSES = ("road", "field")
TILES = [Tile(100, 200, 18), Tile(101, 200, 18), Tile(102, 201, 18), Tile(103, 199, 18)]
RESULTS = [
    TileResult("job1", TILES[0], "ok", {"scores": {"road": 0.9, "field": 0.1}}, None, "net", "2"),
    TileResult("job1", TILES[1], "ok", {"scores": {"road": 0.2, "field": 0.8}}, None, "net", "2"),
    TileResult("job1", TILES[2], "empty", None, None, "net", "2"),
    TileResult("job1", TILES[3], "error", None, "source timed out"),
]
CSV_HEADER = [
    *("job", "z", "x", "y", "quadkey", "status", "road", "field"),
    *("model_name", "model_version", "error"),
]


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Any]:
    with open_store(str(tmp_path / "r.db")) as s:
        s.start_job(JobInfo("job1", "img.tif", zoom=18, classes=CLASSES))
        s.start_job(JobInfo("nothing-yet", "img.tif", zoom=18, classes=CLASSES))
        s.write(RESULTS)
        yield s


def geo_of(path: Path) -> dict[str, Any]:
    return json.loads(pq.read_metadata(path).metadata[b"geo"])


def as_csv_text(value: Any) -> str:
    """A Parquet value as the CSV export writes it."""
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def synthetic_row(i: int, n: int) -> ResultRow:
    """Row ``i`` of ``n``: a block of zoom-16 tiles 97 wide, every fifth one empty."""
    ok = i % 5 != 0
    output = {"road": i / n, "field": 1 - i / n} if ok else None
    tile = (16, 30000 + i % 97, 20000 + i // 97)
    return ResultRow("big", *tile, "ok" if ok else "empty", output, None, "net", "2", 1, "", "")


# ----------------------------------------------------------------------------- the file


def test_columns_types_and_values_are_the_csvs(store: Any, tmp_path: Path) -> None:
    assert format_for("out.parquet") == format_for("out.GeoParquet") == "geoparquet"
    assert export_results(store, "job1", tmp_path / "out.parquet") == 4
    export_results(store, "job1", tmp_path / "out.csv")
    table = pq.read_table(tmp_path / "out.parquet")

    assert table.column_names == [*CSV_HEADER, "geometry", "bbox"]
    types = dict(zip(table.column_names, table.schema.types, strict=True))
    assert (types["job"], types["quadkey"], types["status"], types["error"]) == (pa.string(),) * 4
    assert types["z"] == pa.int8() and types["x"] == types["y"] == pa.int64()
    assert types["road"] == types["field"] == pa.float64()
    assert types["geometry"] == pa.binary()
    assert [f.name for f in types["bbox"]] == ["xmin", "ymin", "xmax", "ymax"]
    assert {f.type for f in types["bbox"]} == {pa.float64()}

    with (tmp_path / "out.csv").open(newline="") as handle:
        csv_rows = list(csv.reader(handle))[1:]
    parquet_rows = table.drop_columns(["geometry", "bbox"]).to_pylist()
    assert [[as_csv_text(v) for v in row.values()] for row in parquet_rows] == csv_rows
    assert parquet_rows[0]["road"] == 0.9 and parquet_rows[2]["road"] is None  # empty: null
    assert parquet_rows[3]["error"] == "source timed out"
    assert parquet_rows[3]["model_name"] is None


def test_geometry_is_each_tiles_footprint_counter_clockwise(store: Any, tmp_path: Path) -> None:
    export_results(store, "job1", tmp_path / "out.parquet")
    table = pq.read_table(tmp_path / "out.parquet")
    polygons = shapely.from_wkb(table["geometry"].to_pylist())
    for polygon, bbox, x, y, z in zip(
        polygons,
        table["bbox"].to_pylist(),
        *(table[c].to_pylist() for c in ("x", "y", "z")),
        strict=True,
    ):
        west, south, east, north = mercantile.bounds(x, y, z)
        assert polygon.geom_type == "Polygon" and polygon.is_valid
        assert shapely.is_ccw(polygon.exterior)
        assert list(polygon.exterior.coords) == [
            (west, south), (east, south), (east, north), (west, north), (west, south),
        ]  # fmt: skip  # tile_polygon's ring, unrounded
        assert polygon.bounds == (west, south, east, north)
        assert (bbox["xmin"], bbox["ymin"], bbox["xmax"], bbox["ymax"]) == polygon.bounds


def test_geo_metadata_is_geoparquet_1_1(store: Any, tmp_path: Path) -> None:
    path = tmp_path / "out.parquet"
    export_results(store, "job1", path)
    geo = geo_of(path)
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    column = geo["columns"]["geometry"]
    assert column["encoding"] == "WKB" and column["geometry_types"] == ["Polygon"]
    assert "crs" not in column  # OGC:CRS84, lon/lat
    assert column["covering"] == {
        "bbox": {name: ["bbox", name] for name in ("xmin", "ymin", "xmax", "ymax")}
    }
    union = shapely.union_all([shapely.box(*mercantile.bounds(t)) for t in TILES])
    assert column["bbox"] == list(union.bounds)
    # Readers that take the schema's metadata (pyarrow, GeoPandas) see the footer's, bbox too.
    assert json.loads(pq.read_schema(path).metadata[b"geo"]) == geo


def test_geopandas_reads_it_and_filters_by_the_bbox_covering(store: Any, tmp_path: Path) -> None:
    """A reader of the format, not ours: GeoPandas finds the geometry, its CRS and, through
    the covering, the one tile a small area touches."""
    import geopandas

    path = tmp_path / "out.parquet"
    export_results(store, "job1", path)
    frame = geopandas.read_parquet(path)
    assert frame.crs == "OGC:CRS84"
    assert list(frame.columns) == [*CSV_HEADER, "geometry"]  # the covering is not a column
    assert [tuple(g.bounds) for g in frame.geometry] == [mercantile.bounds(t) for t in TILES]
    west, south, east, north = mercantile.bounds(TILES[1])
    inside = (west + 1e-6, south + 1e-6, east - 1e-6, north - 1e-6)
    touched = geopandas.read_parquet(path, bbox=inside)
    assert list(zip(touched["x"], touched["y"], strict=True)) == [(TILES[1].x, TILES[1].y)]


def test_row_groups_stream_and_keep_every_row(tmp_path: Path) -> None:
    rows = [synthetic_row(i, 23) for i in range(23)]
    assert write_geoparquet(rows, tmp_path / "small.parquet", CLASSES, batch_rows=5) == 23
    write_geoparquet(rows, tmp_path / "one.parquet", CLASSES)

    meta = pq.read_metadata(tmp_path / "small.parquet")
    assert meta.num_rows == 23
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [5, 5, 5, 5, 3]
    assert pq.read_table(tmp_path / "small.parquet").equals(pq.read_table(tmp_path / "one.parquet"))
    assert geo_of(tmp_path / "small.parquet") == geo_of(tmp_path / "one.parquet")
    # Each row group's bbox statistics let a reader skip it by area: that is the covering.
    xmin = meta.schema.names.index("xmin")
    assert meta.schema.column(xmin).path == "bbox.xmin"
    table = pq.read_table(tmp_path / "small.parquet")
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(xmin).statistics
        group = table.slice(5 * i, 5)["bbox"].to_pylist()
        assert stats.min == min(b["xmin"] for b in group)


def test_thresholds_apply_as_for_csv(store: Any, tmp_path: Path) -> None:
    thresholds = {"t": {"class_name": "road", "min_score": 0.5}, "f": {"class_name": "field"}}
    for name, kwargs in thresholds.items():
        n = export_results(store, "job1", tmp_path / f"{name}.parquet", **kwargs)
        assert n == export_results(store, "job1", tmp_path / f"{name}.csv", **kwargs) == 1
        table = pq.read_table(tmp_path / f"{name}.parquet")
        with (tmp_path / f"{name}.csv").open(newline="") as handle:
            (line,) = list(csv.DictReader(handle))
        assert table.num_rows == 1 and table["x"][0].as_py() == int(line["x"])
    assert geo_of(tmp_path / "t.parquet")["columns"]["geometry"]["bbox"] == list(
        mercantile.bounds(TILES[0])
    )
    with pytest.raises(ExportError, match="'forest'"):
        export_results(store, "job1", tmp_path / "x.parquet", class_name="forest", min_score=0.1)
    assert not (tmp_path / "x.parquet").exists() and not list(tmp_path.glob("*.part"))


def test_an_empty_result_set_is_a_valid_zero_row_file(store: Any, tmp_path: Path) -> None:
    assert export_results(store, "nothing-yet", tmp_path / "empty.parquet") == 0
    assert export_results(store, "job1", tmp_path / "none.parquet", min_score=0.95) == 0
    for name in ("empty", "none"):
        table = pq.read_table(tmp_path / f"{name}.parquet")
        assert table.num_rows == 0
        assert table.column_names == [*CSV_HEADER, "geometry", "bbox"]
        geo = geo_of(tmp_path / f"{name}.parquet")
        assert geo["version"] == "1.1.0" and "bbox" not in geo["columns"]["geometry"]


def test_class_names_that_clash_with_the_geometry_columns(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="clash"):
        write_geoparquet([], tmp_path / "x.parquet", ["bbox"])
    with pytest.raises(ExportError, match="batch_rows"):
        write_geoparquet([], tmp_path / "x.parquet", CLASSES, batch_rows=0)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- without pyarrow


def test_without_pyarrow_the_error_says_how_to_install_it(
    store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ExportError, match=r"needs pyarrow, from the 'parquet' extra: .*install"):
        export_results(store, "job1", tmp_path / "out.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.db", "r.db-shm", "r.db-wal"]
    assert export_results(store, "job1", tmp_path / "out.csv") == 4  # CSV never needs it

    result = run("download", "--db", str(tmp_path / "r.db"), "-o", str(tmp_path / "x.parquet"))
    assert result.exit_code == 1 and "[parquet]'" in result.output

    class NoLambda:  # the check comes before the export is asked for
        def client(self, _service: str) -> Any:
            return self

        def invoke(self, **_: Any) -> Any:
            raise AssertionError("the Lambda was invoked")

    with pytest.raises(ExportError, match="needs pyarrow"):
        StackOperations(NoLambda(), "ops").download(tmp_path / "s.parquet", fmt="geoparquet")
    assert not list(tmp_path.glob("*parquet*"))


def test_csv_and_geojson_exports_never_import_pyarrow() -> None:
    probe = (
        "import sys, chipscale.results.export, chipscale.ops.operations_actions\n"
        "import chipscale.ops.operations_client\n"
        "assert 'pyarrow' not in sys.modules, 'pyarrow imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------- the CLI


def test_download_to_parquet_from_a_database(store: Any, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    result = run("download", "--db", f"sqlite:///{tmp_path / 'r.db'}", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert f"4 rows -> {out}" in result.output
    export_results(store, None, tmp_path / "direct.parquet")
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "direct.parquet"))


JOB = "roads 'north'; --"


@pytest.fixture
def filled(results_db: str) -> str:
    with open_store(results_db) as pg:
        pg.start_job(JobInfo(JOB, "s3://b/a.tif", zoom=3, model_name="m", classes=("a", "b")))
        pg.write(
            [
                TileResult(JOB, Tile(x, 1, 3), "ok", {"a": x / 7, "b": 1 - x / 7}, model_name="m")
                for x in range(4)
            ]
            + [
                TileResult(JOB, Tile(6, 2, 3), "empty", model_name="m"),
                TileResult(JOB, Tile(5, 1, 3), "error", error="source timed out"),
            ]
        )
    return results_db


@pytest.fixture
def stack(local_lambda: list[dict]) -> str:
    return deploy_stack(chipscale_template())


def test_download_through_the_stack_equals_a_direct_download(
    filled: str, stack: str, local_lambda: list[dict], tmp_path: Path
) -> None:
    for args in ([], ["--class", "a", "--min-score", "0.25"]):
        direct, via = tmp_path / "direct.parquet", tmp_path / "via" / "results.parquet"
        assert (
            run("download", "--db", filled, "--job", JOB, "-o", str(direct), *args).exit_code == 0
        )
        result = run("download", "--stack", stack, "--job", JOB, "-o", str(via), *args)
        assert result.exit_code == 0, result.output
        rows = pq.read_metadata(via).num_rows
        assert rows == (6 if not args else 2)
        assert f"{rows} rows -> {via} (from s3://results-" in result.output
        assert pq.read_table(via).equals(pq.read_table(direct))
        assert geo_of(via) == geo_of(direct)
        assert sorted(p.name for p in via.parent.iterdir()) == ["results.parquet"]  # no CSV left
    assert [e["format"] for e in local_lambda if e["action"] == "export"] == ["csv", "csv"]


def test_the_lambda_refuses_geoparquet_itself() -> None:
    env = OperationsEnvironment(db_url=lambda: pytest.fail("the database was reached"))
    with pytest.raises(ValueError, match="converted from a csv export by the CLI"):
        run_action({"action": "export", "format": "geoparquet"}, env)
