"""``chipscale view`` in a real browser: Debian's headless Chromium (installed by `make
browser`, which `make test` runs first), driven by Playwright, loads the page over the demo
jobs of tests/view_demo.py. Screenshots are checked by colour (imagery, overlay, filters,
features), a click by the scores it puts in the DOM, and the network log for any request to
another host than the server."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from conftest import unavailable
from mercantile import Tile
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from view_demo import FOREST, WATER, ZOOM, write_demo

from chipscale.results import open_store
from chipscale.values import TileResult
from chipscale.view.server import ViewApp, ViewServer

BACKGROUND = (233, 233, 233)  # #map's background, #e9e9e9
BUILDING = "#6a3d9a"


def blend(color: str, alpha: float, under: tuple[int, int, int] = BACKGROUND) -> np.ndarray:
    rgb = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)], dtype=float)
    return alpha * rgb + (1 - alpha) * np.array(under, dtype=float)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    executable = shutil.which("chromium")
    if executable is None:
        unavailable("Debian's chromium is not installed: `make browser` installs it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed: pip install -e '.[test]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def site(tmp_path: Path, aerial: Path) -> Iterator[tuple[str, dict[str, Tile]]]:
    url = f"sqlite:///{tmp_path / 'results.db'}"
    tiles = write_demo(url, aerial)
    store = open_store(url, create=False)
    server = ViewServer(ViewApp(store)).start()
    try:
        yield server.url.rstrip("/"), tiles
    finally:
        server.stop()
        store.close()


class Page:
    """A page of the viewer with what the checks need: pixels at tiles, requests seen."""

    def __init__(self, browser: Any, base: str, job: str, shots: Path) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 800})
        self.requests: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.shots = shots
        self.page.goto(f"{base}/?job={job}")
        self.page.wait_for_selector("body[data-summary=loaded]")
        self.settle()

    def loads_seen(self) -> int:
        return int(self.page.evaluate("Number(document.body.dataset.overlayLoads || 0)"))

    def settle(self) -> None:
        self.page.wait_for_load_state("networkidle")
        self.page.wait_for_function("Number(document.body.dataset.overlayLoads || 0) > 0")

    def point(self, tile: Tile, px: float = 128, py: float = 128) -> tuple[int, int]:
        """The page pixel of pixel ``(px, py)`` of result tile ``tile``."""
        found = self.page.evaluate(
            "([x, y, z]) => map.latLngToContainerPoint(map.unproject([x, y], z))",
            [tile.x * 256 + px, tile.y * 256 + py, tile.z],
        )
        return round(found["x"]), round(found["y"])

    def shot(self, name: str) -> np.ndarray:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with MemoryFile(path.read_bytes()) as memfile, memfile.open() as dataset:
                return dataset.read()[:3].transpose(1, 2, 0).astype(float)  # rows, cols, RGB

    def set_imagery(self, shown: bool) -> None:
        box = self.page.locator("#show-imagery")
        if box.is_checked() != shown:
            box.click()


def at(pixels: np.ndarray, point: tuple[int, int], r: int = 3) -> np.ndarray:
    """The mean colour of a small square around ``point``."""
    x, y = point
    return pixels[y - r : y + r + 1, x - r : x + r + 1].reshape(-1, 3).mean(axis=0)


def test_page_shows_imagery_and_overlay_and_filters_them(
    chromium: Any, site: tuple[str, dict[str, Tile]], tmp_path: Path
) -> None:
    base, tiles = site
    page = Page(chromium, base, "demo", tmp_path)
    forest, water, error = (page.point(tiles[k]) for k in ("forest", "water", "error"))
    assert all(0 < x < 960 and 0 < y < 800 for x, y in (forest, water, error))
    outside = (100, 740)  # a corner of the map, away from the source and the controls

    # The imagery: the aerial's texture under the tiles, nothing outside the source.
    page.page.locator("#threshold").fill("1")
    with_imagery = page.shot("imagery")
    patch = with_imagery[forest[1] - 40 : forest[1] + 40, forest[0] - 40 : forest[0] + 40]
    assert patch.std() > 8, "no imagery texture under the tiles"
    assert np.abs(at(with_imagery, outside) - BACKGROUND).max() < 3

    # The overlay by itself: each tile its top class's colour over the map's background.
    page.page.locator("#threshold").fill("0")
    page.set_imagery(False)
    overlay = page.shot("overlay")
    assert np.abs(at(overlay, forest) - blend(FOREST, 0.45)).max() < 8
    assert np.abs(at(overlay, water) - blend(WATER, 0.45)).max() < 8
    red = at(overlay, page.point(tiles["error"], 2, 128), 1)  # the error tile's red border
    assert red[0] > 150 and red[1] < 120 and red[2] < 120, red

    # The threshold: 0.85 hides the water tiles (0.8), keeps the forest ones (0.9).
    page.page.locator("#threshold").fill("0.85")
    assert page.page.locator("#threshold-value").inner_text() == "0.85"
    filtered = page.shot("threshold")
    assert np.abs(at(filtered, water) - BACKGROUND).max() < 3
    assert np.abs(at(filtered, forest) - blend(FOREST, 0.45)).max() < 8

    # A class toggle: forest off.
    page.page.locator("#legend input[data-class=forest]").uncheck()
    toggled = page.shot("toggle")
    assert np.abs(at(toggled, forest) - BACKGROUND).max() < 3

    # The summary and legend.
    counts = page.page.locator("#counts").inner_text()
    assert "ok 14" in counts and "error 1" in counts and "of 20" in counts
    legend = page.page.locator("#legend").inner_text()
    assert "forest" in legend and "water" in legend
    assert page.page.locator("#banner").is_hidden()
    _only_the_server(page.requests, base)


def test_clicking_a_tile_shows_its_scores(
    chromium: Any, site: tuple[str, dict[str, Tile]], tmp_path: Path
) -> None:
    base, tiles = site
    page = Page(chromium, base, "demo", tmp_path)
    tile = tiles["forest"]
    page.page.mouse.click(*page.point(tile, 100, 90))
    page.page.wait_for_selector(f"body[data-details='{ZOOM}/{tile.x}/{tile.y}']")
    scores = page.page.locator("#scores tr")
    assert scores.count() == 2
    assert page.page.locator("#scores tr[data-class=forest] td.score").inner_text() == "0.9000"
    assert page.page.locator("#scores tr[data-class=water] td.score").inner_text() == "0.1000"
    assert page.page.locator("#scores tr.top").get_attribute("data-class") == "forest"
    assert page.page.locator("#details-status").inner_text().startswith("ok")
    assert page.page.locator("#details-assets").inner_text() == "assets: a.tif"

    error = tiles["error"]
    page.page.mouse.click(*page.point(error))
    page.page.wait_for_selector(f"body[data-details='{ZOOM}/{error.x}/{error.y}']")
    assert page.page.locator("#details-error").inner_text() == "error: model timed out"
    assert page.page.locator("#scores tr").count() == 0
    page.shot("details")
    _only_the_server(page.requests, base)


def test_a_running_job_refreshes_its_summary_and_overlay(
    chromium: Any, site: tuple[str, dict[str, Tile]], tmp_path: Path
) -> None:
    base, tiles = site
    page = Page(chromium, base, "demo", tmp_path)
    page.set_imagery(False)
    empty = page.point(tiles["empty"])
    assert np.abs(at(page.shot("before"), empty) - BACKGROUND).max() < 3
    url = page.page.evaluate("fetch('/api/jobs').then(r => r.json())")["store"]
    loads = page.loads_seen()
    with open_store(url) as store:  # the job goes on: the empty tile is scored again
        store.write([TileResult("demo", tiles["empty"], "ok", output={"water": 0.95})])
    page.page.wait_for_function(
        "document.getElementById('counts').innerText.includes('ok 15')", timeout=30_000
    )
    page.page.wait_for_function(
        f"Number(document.body.dataset.overlayLoads) > {loads}", timeout=30_000
    )
    page.settle()
    assert np.abs(at(page.shot("after"), empty) - blend(WATER, 0.45)).max() < 8
    assert "empty 0" in page.page.locator("#counts").inner_text()


def test_segmentation_features_are_drawn(
    chromium: Any, site: tuple[str, dict[str, Tile]], tmp_path: Path
) -> None:
    base, tiles = site
    page = Page(chromium, base, "seg", tmp_path)
    page.set_imagery(False)
    tile = tiles["forest"]
    inside, outside = page.point(tile, 128, 128), page.point(tile, 30, 225)
    shown = page.shot("features")
    page.page.locator("#legend input[data-class=building]").uncheck()
    hidden = page.shot("features_hidden")
    # The building square carries the building colour; off, only the faint tile is left.
    assert np.abs(shown[inside[1], inside[0]] - hidden[inside[1], inside[0]]).max() > 40
    assert np.abs(at(shown, outside) - at(hidden, outside)).max() < 3
    purple = shown[inside[1], inside[0]]
    assert purple[2] > purple[1] and purple[0] > purple[1], purple
    _only_the_server(page.requests, base)


def test_an_unknown_job_shows_a_clear_banner(
    chromium: Any, site: tuple[str, dict[str, Tile]], tmp_path: Path
) -> None:
    base, _ = site
    page = chromium.new_page()
    page.goto(f"{base}/?job=nope")
    page.wait_for_selector("body[data-summary=error]")
    text = page.locator("#banner").inner_text()
    assert text.startswith("no job 'nope' in sqlite:///") and "'demo'" in text


def _only_the_server(requests: list[str], base: str) -> None:
    """Every request the page made went to the server (data: URLs are no request)."""
    server = urlsplit(base).netloc
    assert requests, "no requests recorded"
    others = [u for u in requests if urlsplit(u).scheme != "data" and urlsplit(u).netloc != server]
    assert others == [], f"requests to other hosts: {others}"
