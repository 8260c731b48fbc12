"""``chipscale view`` over HTTP: imagery tiles (a 256 x 256 PNG inside the source, 204
outside), the overlay's tiles, cells and features, a tile's details, the summary while a job
runs, bad input answered in one line while the server keeps serving, the vendored map
library, and the command itself."""

from __future__ import annotations

import fnmatch
import json
import socket
import sqlite3
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ROOT, unavailable
from mercantile import Tile
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from view_demo import ZOOM, demo_tiles, write_demo

from chipscale.cli import cli
from chipscale.results import open_store
from chipscale.values import JobInfo, TileResult
from chipscale.view.aggregate import SAMPLES_PER_SIDE
from chipscale.view.overlay import DETAIL, Overlay
from chipscale.view.server import STATIC, ViewApp, ViewServer


@pytest.fixture
def demo_db(tmp_path: Path, aerial: Path) -> tuple[str, dict[str, Tile]]:
    url = f"sqlite:///{tmp_path / 'results.db'}"
    return url, write_demo(url, aerial)


def _serve(url: str, source: str | None = None) -> Iterator[str]:
    store = open_store(url, create=False)
    server = ViewServer(ViewApp(store, source=source)).start()
    try:
        yield server.url.rstrip("/")
    finally:
        server.stop()
        store.close()


@pytest.fixture
def served(demo_db: tuple[str, dict[str, Tile]]) -> Iterator[tuple[str, dict[str, Tile]]]:
    url, tiles = demo_db
    for base in _serve(url):
        yield base, tiles


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.headers.get("Content-Type") or "", response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type") or "", exc.read()


def get_json(url: str) -> tuple[int, Any]:
    status, kind, body = get(url)
    assert kind == "application/json", (url, kind, body[:200])
    return status, json.loads(body)


def png_pixels(body: bytes) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile(body) as memfile, memfile.open() as dataset:
            assert dataset.driver == "PNG"
            return dataset.read()


# -- imagery -----------------------------------------------------------------------------


def test_imagery_inside_the_source_is_a_256_png(served: tuple[str, dict[str, Tile]]) -> None:
    base, tiles = served
    tile = tiles["forest"]
    status, kind, body = get(f"{base}/imagery/{tile.z}/{tile.x}/{tile.y}.png?job=demo")
    assert (status, kind) == (200, "image/png")
    pixels = png_pixels(body)
    assert pixels.shape == (4, 256, 256)  # RGB + alpha
    assert (pixels[3] == 255).mean() > 0.2  # source pixels, opaque
    assert pixels[:3, pixels[3] == 255].std() > 5  # imagery, not a flat fill


def test_imagery_outside_the_source_is_the_empty_answer(
    served: tuple[str, dict[str, Tile]],
) -> None:
    base, tiles = served
    tile = tiles["forest"]
    status, _, body = get(f"{base}/imagery/{tile.z}/{tile.x + 50}/{tile.y}.png?job=demo")
    assert (status, body) == (204, b"")
    status, payload = get_json(f"{base}/imagery/3/9/1.png?job=demo")  # off the z3 grid
    assert status == 400 and "not on the web-mercator grid" in payload["error"]


def test_an_unreadable_source_is_one_line_and_the_server_keeps_serving(
    demo_db: tuple[str, dict[str, Tile]], tmp_path: Path
) -> None:
    url, tiles = demo_db
    missing = tmp_path / "gone.tif"
    tile = tiles["forest"]
    for base in _serve(url, source=str(missing)):
        status, kind, body = get(f"{base}/imagery/{tile.z}/{tile.x}/{tile.y}.png?job=demo")
        assert status == 502 and kind.startswith("text/plain")
        text = body.decode()
        assert text.count("\n") == 1 and str(missing) in text
        status, summary = get_json(f"{base}/api/job?job=demo")
        assert status == 200 and str(missing) in summary["imagery"]["error"]
        status, overlay = get_json(f"{base}/api/overlay/{ZOOM}/{tile.x}/{tile.y}?job=demo")
        assert status == 200 and len(overlay["tiles"]) == 1


# -- the overlay ---------------------------------------------------------------------------


def test_overlay_lists_result_tiles_by_top_class(served: tuple[str, dict[str, Tile]]) -> None:
    base, tiles = served
    forest, water = tiles["forest"], tiles["water"]
    z = ZOOM - 2
    status, answer = get_json(f"{base}/api/overlay/{z}/{forest.x >> 2}/{forest.y >> 2}?job=demo")
    assert status == 200 and answer["kind"] == "tiles" and answer["zoom"] == ZOOM
    rows = {(x, y): (st, cls, score) for x, y, st, cls, score in answer["tiles"]}
    names = answer["classes"]
    st, cls, score = rows[(forest.x, forest.y)]
    assert (st, names[cls], score) == (0, "forest", 0.9)
    if (water.x >> 2, water.y >> 2) == (forest.x >> 2, forest.y >> 2):
        st, cls, score = rows[(water.x, water.y)]
        assert (st, names[cls], score) == (0, "water", 0.8)
    assert rows[(tiles["error"].x, tiles["error"].y)][0] == 2
    assert rows[(tiles["empty"].x, tiles["empty"].y)][0] == 1


def test_low_zooms_answer_sampled_cells_not_tiles(served: tuple[str, dict[str, Tile]]) -> None:
    base, tiles = served
    tile = tiles["forest"]
    z = ZOOM - DETAIL - 4
    shift = ZOOM - z
    status, answer = get_json(
        f"{base}/api/overlay/{z}/{tile.x >> shift}/{tile.y >> shift}?job=demo"
    )
    assert status == 200 and answer["kind"] == "cells" and answer["shift"] == 4
    assert "tiles" not in answer
    (cell,) = answer["cells"]  # the 4 x 4 tiles of the job fall in one 16 x 16 cell
    cx, cy, ok, empty, error, samples = cell
    assert (cx, cy) == (tile.x >> 4, tile.y >> 4)
    assert (ok, empty, error) == (14, 1, 1)  # a small block is read whole: exact counts
    assert len(samples) == SAMPLES_PER_SIDE**2
    assert {answer["classes"][c] for c, _ in samples} <= {"forest", "water"}


def test_a_large_job_is_sampled_on_a_lattice(tmp_path: Path) -> None:
    """256 x 256 tiles, forest in the west half, water in the east: a map tile over all of
    them answers 16 x 16 cells from 9 lattice samples each, by class; one west of the job
    answers nothing."""
    url = f"sqlite:///{tmp_path / 'big.db'}"
    x0, y0, side, z = 1024, 2048, 256, 16  # one z8 map tile, 4 <- 1024 >> 8
    with open_store(url) as store:
        store.start_job(JobInfo("big", "none.tif", zoom=z, classes=("forest", "water")))
    rows = [
        ("big", z, x0 + dx, y0 + dy, "ok", '{"forest": 0.9, "water": 0.1}'
         if dx < side // 2 else '{"forest": 0.3, "water": 0.7}', "t", "t")
        for dx in range(side)
        for dy in range(side)
    ]  # fmt: skip
    with sqlite3.connect(tmp_path / "big.db") as conn:
        conn.executemany(
            "INSERT INTO results (job, z, x, y, status, output, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    with open_store(url, create=False) as store:
        overlay = Overlay(store)
        try:
            assert overlay.summary("big")["extent"] == (x0, y0, x0 + side - 1, y0 + side - 1)
            mz = z - 8  # map tile 8/4/8 covers the whole job
            answer = overlay.map_tile("big", mz, x0 >> 8, y0 >> 8)
            assert answer["kind"] == "cells" and answer["shift"] == 4
            cells = answer["cells"]
            names = answer["classes"]
            assert len(cells) == (side // 16) ** 2
            for cx, _, ok, empty, error, samples in cells:
                assert ok == len(samples) == 9 and empty == error == 0
                top = {names[c] for c, _ in samples}
                assert top == ({"forest"} if (cx << 4) - x0 < side // 2 else {"water"})
            west = overlay.map_tile("big", mz, (x0 >> 8) - 1, y0 >> 8)
            assert west["cells"] == []
        finally:
            overlay.close()


def test_a_tile_click_answers_scores_status_error_and_assets(
    served: tuple[str, dict[str, Tile]],
) -> None:
    base, tiles = served
    forest, error = tiles["forest"], tiles["error"]
    status, found = get_json(f"{base}/api/tile?job=demo&z={ZOOM}&x={forest.x}&y={forest.y}")
    assert status == 200
    assert found["status"] == "ok" and found["top"] == "forest"
    assert found["scores"] == [["forest", 0.9], ["water", 0.1]]
    assert found["assets"] == ["a.tif"]
    status, found = get_json(f"{base}/api/tile?job=demo&z={ZOOM}&x={error.x}&y={error.y}")
    assert (found["status"], found["error"], found["scores"]) == ("error", "model timed out", None)
    status, found = get_json(f"{base}/api/tile?job=demo&z={ZOOM}&x=0&y=0")
    assert status == 404 and "no result for tile" in found["error"]
    status, found = get_json(f"{base}/api/tile?job=demo&z={ZOOM}&x=zero&y=0")
    assert status == 400 and found["error"] == "give x as an integer"


def test_segmentation_features_come_in_map_tile_pixels(
    served: tuple[str, dict[str, Tile]],
) -> None:
    base, tiles = served
    status, summary = get_json(f"{base}/api/job?job=seg")
    assert status == 200 and summary["has_features"] is True
    first = tiles["error"]  # the first tile, which also holds the car
    status, answer = get_json(f"{base}/api/overlay/{ZOOM}/{first.x}/{first.y}?job=seg")
    names = answer["classes"]
    drawn = {(names[cls], score): rings for cls, score, rings in answer["features"]}
    assert set(drawn) == {("building", None), ("car", 0.75)}
    (ring,) = drawn[("building", None)]
    assert {tuple(p) for p in ring} == {(64, 64), (192, 64), (192, 192), (64, 192)}
    # One zoom out: half the size, offset by where the tile sits in its parent.
    up = ZOOM - 1
    status, answer = get_json(f"{base}/api/overlay/{up}/{first.x >> 1}/{first.y >> 1}?job=seg")
    ox, oy = (first.x & 1) * 128, (first.y & 1) * 128
    rings = [r for cls, _, rs in answer["features"] for r in rs if names[cls] == "building"]
    corners = {(ox + 32 + dx, oy + 32 + dy) for dx in (0, 64) for dy in (0, 64)}
    assert {tuple(p) for p in rings[0]} == corners
    # Far out, no features: the cells carry the classes.
    z = ZOOM - DETAIL - 1
    status, answer = get_json(f"{base}/api/overlay/{z}/{first.x >> 5}/{first.y >> 5}?job=seg")
    assert answer["kind"] == "cells" and "features" not in answer
    status, answer = get_json(f"{base}/api/job?job=demo")
    assert answer["has_features"] is False


# -- the summary -------------------------------------------------------------------------


def test_summary_counts_progress_legend_and_extent(served: tuple[str, dict[str, Tile]]) -> None:
    base, tiles = served
    status, summary = get_json(f"{base}/api/job?job=demo")
    assert status == 200
    assert summary["counts"] == {"ok": 14, "empty": 1, "error": 1, "total": 16}
    assert summary["tiles_total"] == 20 and summary["progress"] == pytest.approx(15 / 20)
    assert summary["classes"] == [
        {"name": "forest", "color": "#238b45"},
        {"name": "water", "color": "#2171b5"},
    ]
    error = tiles["error"]
    assert summary["extent"] == [error.x, error.y, error.x + 3, error.y + 3]
    assert summary["imagery"]["error"] is None
    status, jobs = get_json(f"{base}/api/jobs")
    assert jobs["jobs"] == ["demo", "seg"] and jobs["job"] == "seg"


def test_summary_follows_a_running_job(demo_db: tuple[str, dict[str, Tile]], aerial: Path) -> None:
    url, tiles = demo_db
    now = [0.0]
    with open_store(url) as store:
        overlay = Overlay(store, clock=lambda: now[0])
        try:
            assert overlay.summary("demo")["counts"]["total"] == 16
            extra = Tile(tiles["error"].x + 4, tiles["error"].y, ZOOM)
            store.write([TileResult("demo", extra, "ok", output={"water": 0.7, "forest": 0.3})])
            assert overlay.summary("demo")["counts"]["total"] == 16  # reused for a while
            now[0] += 60
            overlay.summary("demo")  # stale: recounted in the background
            counting = overlay.job("demo").counting
            assert counting is not None
            counting.result(timeout=30)
            summary = overlay.summary("demo")
            assert summary["counts"]["total"] == 17
            assert summary["progress"] == pytest.approx(16 / 20)
        finally:
            overlay.close()


def test_unknown_job_is_a_clear_answer_and_the_server_keeps_serving(
    served: tuple[str, dict[str, Tile]],
) -> None:
    base, _ = served
    for path in ("/api/job?job=nope", "/api/overlay/3/1/1?job=nope"):
        status, answer = get_json(base + path)
        assert status == 404
        assert answer["error"].startswith("no job 'nope' in sqlite:///")
        assert "jobs: 'demo', 'seg'" in answer["error"]
    status, answer = get_json(f"{base}/api/job")
    assert status == 400 and answer["error"] == "give the job: ?job=NAME"
    assert get_json(f"{base}/api/job?job=demo")[0] == 200


def test_a_foreign_host_name_is_refused(served: tuple[str, dict[str, Tile]]) -> None:
    """DNS rebinding: another site's page reaching 127.0.0.1 under its own name."""
    base, _ = served
    port = base.rsplit(":", 1)[1]
    for host, expected in ((f"evil.example:{port}", 403), (f"localhost:{port}", 200)):
        request = urllib.request.Request(f"{base}/api/jobs", headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
            assert json.loads(exc.read()) == {"error": "unknown Host header"}
        assert status == expected, host


# -- the page and its map library --------------------------------------------------------


def test_page_and_vendored_leaflet_are_served(served: tuple[str, dict[str, Tile]]) -> None:
    base, _ = served
    status, kind, page = get(base + "/")
    assert status == 200 and kind.startswith("text/html")
    for asset in ("/static/vendor/leaflet/leaflet.js", "/static/vendor/leaflet/leaflet.css"):
        assert asset.encode() in page
        status, _, body = get(base + asset)
        assert status == 200 and body == (STATIC / asset.removeprefix("/static/")).read_bytes()
    assert b"https://" not in page and b"http://" not in page  # nothing from a CDN
    for path in ("/static/../server.py", "/static/%2e%2e/server.py", "/etc/passwd"):
        assert get(base + path)[0] == 404


def test_vendored_leaflet_matches_the_npm_package() -> None:
    """`make vendor` copied node_modules' Leaflet, the version package-lock.json pins."""
    dist = ROOT / "node_modules" / "leaflet"
    if not dist.exists():
        unavailable("node_modules/leaflet is missing: run `make node_modules/.installed`")
    vendor = STATIC / "vendor" / "leaflet"
    lock = json.loads((ROOT / "package-lock.json").read_text())
    pinned = lock["packages"]["node_modules/leaflet"]["version"]
    assert json.loads((vendor / "package.json").read_text())["version"] == pinned
    for name in ("leaflet.js", "leaflet.css"):
        assert (vendor / name).read_bytes() == (dist / "dist" / name).read_bytes(), name
    assert (vendor / "LICENSE").read_bytes() == (dist / "LICENSE").read_bytes()
    for image in (dist / "dist" / "images").iterdir():
        assert (vendor / "images" / image.name).read_bytes() == image.read_bytes()


def test_package_data_ships_every_static_file() -> None:
    """pyproject's package-data globs name every file of the page, so a wheel has them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["chipscale.view"]
    package = STATIC.parent
    files = [p.relative_to(package).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert "static/vendor/leaflet/leaflet.js" in files and "static/view.js" in files
    for name in files:
        assert any(fnmatch.fnmatch(name, g) and name.count("/") == g.count("/") for g in globs), (
            f"{name} is not in pyproject's package-data for chipscale.view"
        )


# -- the command ---------------------------------------------------------------------------


def test_view_command_refuses_an_unknown_job_in_one_line(
    demo_db: tuple[str, dict[str, Tile]],
) -> None:
    url, _ = demo_db
    result = CliRunner().invoke(cli, ["view", "--db", url, "--job", "nope", "--port", "0"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: no job 'nope' in sqlite:///")


def test_view_command_refuses_a_port_in_use_in_one_line(
    demo_db: tuple[str, dict[str, Tile]],
) -> None:
    url, _ = demo_db
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["view", "--db", url, "--port", str(port)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: cannot serve on 127.0.0.1:{port}: Address already in use"
    )


def test_view_command_warns_of_unreadable_imagery_and_serves(
    demo_db: tuple[str, dict[str, Tile]], tmp_path: Path
) -> None:
    url, _ = demo_db
    server = subprocess.Popen(
        [sys.executable, "-m", "chipscale.cli", "view", "--db", url, "--port", "0",
         "--job", "demo", "--source", str(tmp_path / "gone.tif")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None and server.stderr is not None
        printed = server.stdout.readline().strip()
        warning = server.stderr.readline().strip()
        assert warning.startswith("Warning: cannot read imagery ") and "gone.tif" in warning
        assert warning.endswith("; the map shows results only")
        status, summary = get_json(printed + "api/job?job=demo")
        assert status == 200 and summary["counts"]["total"] == 16
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_view_command_serves_on_loopback_and_prints_its_url(
    demo_db: tuple[str, dict[str, Tile]],
) -> None:
    url, _ = demo_db
    server = subprocess.Popen(
        [sys.executable, "-m", "chipscale.cli", "view", "--db", url, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        printed = server.stdout.readline().strip()
        assert printed.startswith("http://127.0.0.1:") and printed.endswith("/")
        status, jobs = get_json(printed + "api/jobs")
        assert status == 200 and jobs["jobs"] == ["demo", "seg"]
    finally:
        server.terminate()
        server.wait(timeout=30)


# -- PostgreSQL ----------------------------------------------------------------------------


def test_overlay_over_postgres(results_db: str, aerial: Path) -> None:
    tiles = write_demo(results_db, aerial)
    with open_store(results_db, create=False) as store:
        overlay = Overlay(store)
        try:
            summary = overlay.summary("demo")
            error = tiles["error"]
            assert summary["extent"] == (error.x, error.y, error.x + 3, error.y + 3)
            forest = tiles["forest"]
            answer = overlay.map_tile("demo", ZOOM, forest.x, forest.y)
            assert answer["kind"] == "tiles" and answer["tiles"][0][:2] == [forest.x, forest.y]
            cells = overlay.map_tile("demo", ZOOM - 8, forest.x >> 8, forest.y >> 8)
            assert cells["kind"] == "cells" and len(cells["cells"]) == 1
            assert cells["cells"][0][2] >= 1  # a sampled ok tile
            # The lattice query (a window too large to read whole; 2 x 2 cells, so every
            # tile is a lattice point).
            x, y = error.x & ~255, error.y & ~255
            sampled = overlay.queries.cells("demo", (ZOOM, x, y, x + 255, y + 255), 1)
            assert sum(c.ok for c in sampled.values()) == 14
            assert sum(c.empty + c.error for c in sampled.values()) == 2
            features = overlay.map_tile("seg", ZOOM, forest.x, forest.y)["features"]
            assert len(features) == 1
            assert overlay.tile("demo", ZOOM, forest.x, forest.y)["top"] == "forest"  # type: ignore[index]
        finally:
            overlay.close()
    assert len(demo_tiles(aerial)) == 16
