"""Cover: the tiles an area touches, for bboxes, GeoJSON areas in any CRS and source footprints."""

from __future__ import annotations

import json

import mercantile
import numpy as np
import pytest
import rasterio
from hypothesis import example, given, settings
from hypothesis import strategies as st
from mercantile import Tile
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds
from shapely.geometry import box

from chipscale.errors import AOIError, SourceError
from chipscale.grid.cover import cover_bbox, cover_geometry, parse_bbox, read_aoi
from chipscale.sources.footprint import cover


def test_bbox_cover_matches_mercantile_inside() -> None:
    bbox = (10.01, 45.01, 10.49, 45.49)
    assert set(cover_bbox(bbox, 12)) == set(mercantile.tiles(*bbox, 12))


def test_edge_touching_tiles_are_left_out() -> None:
    west, south, east, north = mercantile.bounds(Tile(5, 5, 4))
    assert list(cover_bbox((west, south, east, north), 4)) == [Tile(5, 5, 4)]


def test_antimeridian_bbox_covers_both_sides() -> None:
    tiles = set(cover_bbox(parse_bbox("179,-1,-179,1"), 5))
    assert {t.x for t in tiles} == {0, 31}
    assert {t.y for t in tiles} == {15, 16}


def _write(tmp_path, doc) -> str:
    path = tmp_path / "aoi.geojson"
    path.write_text(json.dumps(doc))
    return str(path)


def test_aoi_in_a_declared_crs_equals_the_lonlat_aoi(tmp_path) -> None:
    lonlat = [[[2.0, 48.0], [2.6, 48.0], [2.6, 48.6], [2.0, 48.6], [2.0, 48.0]]]
    a = read_aoi(_write(tmp_path, {"type": "Polygon", "coordinates": lonlat}))
    w, s, e, n = transform_bounds("EPSG:4326", "EPSG:3857", 2.0, 48.0, 2.6, 48.6)
    merc = {
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::3857"}},
        "features": [
            {
                "type": "Feature",
                "properties": {},
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]],
                },
            }
        ],
    }
    b = read_aoi(_write(tmp_path, merc))
    assert set(cover(11, aoi=a)) == set(cover(11, aoi=b))


def test_multipolygon_and_ring_written_across_180(tmp_path) -> None:
    ring = [[[179.0, -1.0], [181.0, -1.0], [181.0, 1.0], [179.0, 1.0], [179.0, -1.0]]]
    area = read_aoi(_write(tmp_path, {"type": "Polygon", "coordinates": ring}))
    assert set(cover(5, aoi=area)) == set(cover_bbox((179, -1, -179, 1), 5))
    multi = {
        "type": "MultiPolygon",
        "coordinates": [
            [[[0.1, 0.1], [0.2, 0.1], [0.2, 0.2], [0.1, 0.2], [0.1, 0.1]]],
            [[[50.1, 10.1], [50.2, 10.1], [50.2, 10.2], [50.1, 10.2], [50.1, 10.1]]],
        ],
    }
    tiles = list(cover(8, aoi=read_aoi(_write(tmp_path, multi))))
    assert len(tiles) == len(set(tiles)) == 2


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("not json", "not GeoJSON"),
        ('{"type": "Point", "coordinates": [0, 0]}', "no Polygon"),
        ('{"type": "Foo"}', "unknown GeoJSON type"),
    ],
)
def test_bad_aoi_files_say_why(tmp_path, content: str, reason: str) -> None:
    path = tmp_path / "bad.geojson"
    path.write_text(content)
    with pytest.raises(AOIError, match=reason):
        read_aoi(path)


def test_source_footprint_cover_of_the_aerial_image(aerial) -> None:
    tiles = list(cover(18, source=str(aerial)))
    with rasterio.open(aerial) as ds:
        bounds = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    assert set(tiles) <= set(mercantile.tiles(*bounds, 18))
    assert len(tiles) == len(set(tiles)) >= 16  # 1024 px at the native zoom: 4x4 or more


def test_source_in_utm_has_a_curved_footprint(naip) -> None:
    tiles = set(cover(14, source=str(naip)))
    with rasterio.open(naip) as ds:
        bounds = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    envelope = set(mercantile.tiles(*bounds, 14))
    assert tiles <= envelope and len(tiles) >= 0.8 * len(envelope)


def test_source_and_aoi_intersect_and_a_miss_is_an_error(aerial, tmp_path) -> None:
    with rasterio.open(aerial) as ds:
        w, s, e, n = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    half = (w, s, (w + e) / 2, n)
    tiles = set(cover(18, source=str(aerial), bbox=half))
    assert tiles and tiles < set(cover(18, source=str(aerial)))
    with pytest.raises(AOIError, match="do not overlap"):
        list(cover(18, source=str(aerial), bbox=(0.0, 0.0, 0.1, 0.1)))


def test_source_crossing_the_antimeridian(tmp_path) -> None:
    # A raster in a Pacific-centred mercator whose extent runs from 179.5 E to 179.5 W.
    path = tmp_path / "pacific.tif"
    crs = "EPSG:3832"
    w, s, e, n = transform_bounds("EPSG:4326", crs, 179.5, -0.5, 180.0, 0.5)
    width = 64
    res = 2 * (e - w) / width
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=width,
        height=32,
        count=1,
        dtype="uint8",
        crs=crs,
        transform=from_origin(w, n, res, (n - s) / 32),
    ) as ds:
        ds.write(np.ones((1, 32, width), "uint8"))
    tiles = set(cover(6, source=str(path)))
    assert {t.x for t in tiles} == {0, 63}


def test_missing_source_is_a_source_error(tmp_path) -> None:
    with pytest.raises(SourceError, match=r"missing\.tif"):
        list(cover(10, source=str(tmp_path / "missing.tif")))


@settings(max_examples=60, deadline=None)
@given(
    st.floats(-179.0, 178.0),
    st.floats(-80.0, 79.0),
    st.floats(0.001, 1.0),
    st.floats(0.001, 1.0),
    st.integers(4, 12),
)
@example(0.0, 0.0, 0.5, 0.5, 8)
def test_hierarchical_cover_equals_brute_force(
    west: float, south: float, width: float, height: float, zoom: int
) -> None:
    """Pruning by parent tiles never drops or adds a tile: compare with testing each tile."""
    area = box(west, south, west + width, south + height)
    expected = {
        t
        for t in mercantile.tiles(*area.bounds, zoom)
        if box(*mercantile.bounds(t)).intersection(area).area > 0
    }
    assert set(cover_geometry(area, zoom)) == expected
