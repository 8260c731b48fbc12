"""Mosaic sources (issue 20, the reader's half): the real NAIP image cut into overlapping COGs
in three CRSs, read as one mosaic and cross-checked pixel for pixel with rio-tiler's
``mosaic_reader`` (first valid pixel, same assets, same order, nearest); the early stop, one
warp per (pack, asset), the list and collection loaders, bad inputs, remote assets in moto S3,
and a 10,000-item index.
"""

from __future__ import annotations

import json
import os
import socket
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import mercantile
import numpy as np
import psutil
import pytest
import rasterio
import rasterio.shutil
import shapely
from mercantile import Tile
from rasterio.enums import ColorInterp
from rasterio.warp import Resampling, calculate_default_transform, reproject
from rasterio.windows import Window
from rio_tiler.errors import EmptyMosaicError
from rio_tiler.io import Reader
from rio_tiler.mosaic import mosaic_reader

from chipscale.errors import SourceError, SourceUnavailable
from chipscale.sources import mosaic as mosaic_module
from chipscale.sources import open_tile_source, read_tiles
from chipscale.sources.assets import (
    Asset,
    AssetIndex,
    assets_from_collection,
    assets_from_items,
    assets_from_json,
    assets_to_json,
    is_asset_list,
    load_assets,
    order_assets,
    tile_box,
)
from chipscale.sources.cog import TOLERANCE, TileReader
from chipscale.sources.footprint import source_footprint_lonlat
from chipscale.sources.mosaic import MosaicReader, open_mosaic

#: The parts: (name, window of the NAIP image (col, row, width, height), CRS or None to keep
#: UTM 14N). They overlap by 80 px (400 m) across the cuts at column 480 and row 360, like
#: NAIP quarter-quads, and each part's values are shifted differently, so a pixel taken from
#: the wrong asset shows.
PARTS: list[tuple[str, tuple[int, int, int, int], str | None]] = [
    ("a", (0, 0, 520, 400), None),
    ("b", (440, 0, 494, 400), "EPSG:4326"),
    ("c", (0, 320, 520, 403), "EPSG:26915"),  # UTM 15N
    ("d", (440, 320, 494, 403), "EPSG:4326"),
]


VRT_OPTIONS = {"tolerance": TOLERANCE}


def write_part(naip: Path, path: Path, window: tuple[int, int, int, int], crs: str | None, k: int):
    """One part of the NAIP image as a COG (256 px blocks, overviews), nodata 0."""
    with rasterio.open(naip) as src:
        win = Window(*window)
        data = src.read(window=win)
        transform = src.window_transform(win)
        valid = (data != 0).any(axis=0)
        data = np.where(valid, (data.astype(int) + 37 * k) % 254 + 1, 0).astype("uint8")
        if crs is None:
            out, dst_crs, dst_transform = data, src.crs, transform
        else:
            bounds = rasterio.windows.bounds(win, src.transform)
            dst_transform, width, height = calculate_default_transform(
                src.crs, crs, data.shape[2], data.shape[1], *bounds
            )
            out = np.zeros((data.shape[0], height, width), "uint8")
            reproject(
                data,
                out,
                src_transform=transform,
                src_crs=src.crs,
                dst_transform=dst_transform,
                dst_crs=crs,
                resampling=Resampling.nearest,
                src_nodata=0,
                dst_nodata=0,
            )
            dst_crs = crs
    plain = path.with_suffix(".plain.tif")
    profile = {"driver": "GTiff", "count": out.shape[0], "dtype": "uint8", "nodata": 0}
    with rasterio.open(
        plain, "w", width=out.shape[2], height=out.shape[1], crs=dst_crs, transform=dst_transform,
        **profile,
    ) as dst:  # fmt: skip
        dst.write(out)
        # NAIP's own: no alpha band (GDAL would take a 4th uint8 band for one)
        dst.colorinterp = [ColorInterp.gray] + [ColorInterp.undefined] * (out.shape[0] - 1)
    rasterio.shutil.copy(plain, path, driver="COG", blocksize=256)
    plain.unlink()
    return path


@pytest.fixture(scope="module")
def parts(naip: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("parts")
    return [
        write_part(naip, folder / f"{name}.tif", window, crs, k)
        for k, (name, window, crs) in enumerate(PARTS, 1)
    ]


def tiles_over(path: Path, z: int) -> list[Tile]:
    return list(mercantile.tiles(*source_footprint_lonlat(path), z))


def rio_mosaic(hrefs: list[str], tile: Tile) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """rio-tiler's mosaic of the assets in this order: data, mask, assets read. Nearest, and
    the warp transformer's error bound of chipscale's reader."""

    def tiler(asset: str, x: int, y: int, z: int) -> Any:
        with Reader(asset) as reader:
            return reader.tile(
                x, y, z, tilesize=256, resampling_method="nearest", vrt_options=VRT_OPTIONS
            )

    try:
        img, used = mosaic_reader(hrefs, tiler, tile.x, tile.y, tile.z, threads=0)
    except EmptyMosaicError:
        return np.zeros((4, 256, 256), "uint8"), np.zeros((256, 256), bool), []
    return img.data, ~np.ma.getmaskarray(img.array).any(axis=0), list(used)


def list_file(folder: Path, paths: list[Path], name: str = "list.txt") -> Path:
    out = folder / name
    out.write_text("# NAIP parts\n\n" + "".join(f"{p.name}\n" for p in paths))
    return out


def stac_item(path: Path, item_id: str, **properties: Any) -> dict[str, Any]:
    west, south, east, north = source_footprint_lonlat(path)
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": item_id,
        "geometry": shapely.geometry.mapping(shapely.box(west, south, east, north)),
        "bbox": [west, south, east, north],
        "properties": {"datetime": "2020-08-31T00:00:00Z", **properties},
        "assets": {
            "visual": {
                "href": path.name,
                "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "roles": ["data"],
            },
            "thumbnail": {"href": "thumb.png", "type": "image/png", "roles": ["thumbnail"]},
        },
        "links": [],
    }


def collection_file(folder: Path, items: list[dict[str, Any]], name: str) -> Path:
    out = folder / name
    out.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    return out


# -- pixels: the same as rio-tiler's mosaic_reader ------------------------------------------


@pytest.mark.parametrize("z", [14, 15, 16])
@pytest.mark.parametrize("reverse", [False, True])
def test_seams_equal_rio_tiler_mosaic(parts: list[Path], naip: Path, z: int, reverse: bool):
    """Pixel for pixel, mask and the assets used, with one warp a tile (``max_window`` =
    one tile): rio-tiler warps tile by tile, and a warp of a reprojected source picks
    nearest neighbours that depend a little on the window (see the next test)."""
    ordered = parts[::-1] if reverse else parts
    hrefs = [str(p) for p in ordered]
    assets = [Asset(h, h, source_footprint_lonlat(h)) for h in hrefs]
    tiles = tiles_over(naip, z)
    with MosaicReader(assets, max_window=256) as reader:
        got = dict(reader.read(tiles))
    assert set(got) == set(tiles)
    seams = 0
    for tile in tiles:
        data, mask, used = rio_mosaic(hrefs, tile)
        image = got[tile]
        assert image.data.shape == (4, 256, 256) and image.data.dtype == np.uint8
        np.testing.assert_array_equal(image.mask, mask, err_msg=str(tile))
        np.testing.assert_array_equal(image.data[:, mask], data[:, mask], err_msg=str(tile))
        # the assets that supplied pixels: those rio-tiler read, in order, that had any
        assert list(image.assets) == [a for a in used if a in image.assets]
        assert bool(image.assets) == bool(mask.any())
        seams += len(image.assets) >= 2
    assert seams >= 4, f"only {seams} tiles of {len(tiles)} on a seam"


@pytest.mark.parametrize("z", [15, 17])
def test_packs_near_tile_by_tile(parts: list[Path], naip: Path, z: int) -> None:
    """Packs (one warp per pack and asset) against one warp a tile: the assets' own
    pack-versus-single tolerance (tests/test_tiles.py), and nothing more. The EPSG:4326
    parts' pixels do not depend on the window: there the two are identical."""
    hrefs = [str(p) for p in parts]
    assets = [Asset(h, h, source_footprint_lonlat(h)) for h in hrefs]
    tiles = tiles_over(naip, z)
    with MosaicReader(assets) as packed, MosaicReader(assets, max_window=256) as single:
        got, alone = dict(packed.read(tiles)), dict(single.read(tiles))
    differ = same_source = 0
    for tile in tiles:
        a, b = got[tile], alone[tile]
        differ += int(((a.data != b.data).any(axis=0) | (a.mask != b.mask)).sum())
        if set(a.assets) | set(b.assets) <= {hrefs[1], hrefs[3]}:  # the EPSG:4326 parts
            same_source += 1
            np.testing.assert_array_equal(a.data, b.data)
            np.testing.assert_array_equal(a.mask, b.mask)
    assert same_source >= 2
    assert differ / (len(tiles) * 256 * 256) < 0.005


def test_mosaic_mask_covers_the_union_of_the_parts(parts: list[Path], naip: Path) -> None:
    """The parts together hold every valid pixel of the original: the mosaic's mask equals
    the union of the parts' masks read one by one, and no part alone fills it."""
    tiles = tiles_over(naip, 15)
    hrefs = [str(p) for p in parts]
    mosaic = dict(read_tiles(list_file(parts[0].parent, parts), tiles))
    union = {t: np.zeros((256, 256), bool) for t in tiles}
    for href in hrefs:
        for tile, image in read_tiles(href, tiles):
            union[tile] |= image.mask
    for tile in tiles:
        np.testing.assert_array_equal(mosaic[tile].mask, union[tile])
    assert any(len(mosaic[t].assets) == 4 for t in tiles)  # the tile where the four parts meet


# -- reads: one warp per (pack, asset), early stop, only overlapping assets ---------------


class CountingReader(TileReader):
    opened: ClassVar[list[str]] = []
    packs: ClassVar[list[tuple[str, int]]] = []

    def __init__(self, source: Any, **kwargs: Any) -> None:
        CountingReader.opened.append(os.fspath(source))
        super().__init__(source, **kwargs)

    def read_pack(self, tiles: Any) -> Any:
        CountingReader.packs.append((self.source, len(tiles)))
        return super().read_pack(tiles)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> type[CountingReader]:
    CountingReader.opened, CountingReader.packs = [], []
    monkeypatch.setattr(mosaic_module, "TileReader", CountingReader)
    return CountingReader


def test_one_warp_per_pack_and_asset(parts: list[Path], naip: Path, counting: Any) -> None:
    hrefs = [str(p) for p in parts]
    assets = [Asset(h, h, source_footprint_lonlat(h)) for h in hrefs]
    tiles = tiles_over(naip, 16)
    with MosaicReader(assets, max_window=1024) as reader:  # packs of 4 x 4 tiles
        got = dict(reader.read(tiles))
        packs = {(t.x >> 2, t.y >> 2) for t in tiles}
        assert len(packs) >= 4
        assert reader.opens == len(set(counting.opened)) == 4  # each asset opened once
    calls = Counter(source for source, _n in counting.packs)
    assert all(n <= len(packs) for n in calls.values()), calls
    assert len(counting.packs) < len(packs) * len(hrefs)  # not every asset for every pack
    assert any(len(image.assets) >= 2 for image in got.values())


def test_a_full_tile_reads_no_later_asset(parts: list[Path], naip: Path, counting: Any) -> None:
    """Interior tiles of the whole image are complete from the first asset: the four parts
    behind it, which overlap those tiles, are never opened."""
    first = Asset("naip", str(naip), source_footprint_lonlat(naip))
    later = [Asset(str(p), str(p), source_footprint_lonlat(p)) for p in parts]
    with TileReader(naip) as alone:
        interior = [t for t, im in alone.read(tiles_over(naip, 16)) if im.mask.all()]
    assert len(interior) >= 8
    with MosaicReader([first, *later]) as reader:
        for candidates in (reader.candidates(t) for t in interior):
            assert len(candidates) >= 2  # the parts overlap these tiles
        got = dict(reader.read(interior))
        assert reader.opens == 1
    assert counting.opened == [str(naip)]
    assert all(image.assets == ("naip",) and image.mask.all() for image in got.values())


def test_assets_not_overlapping_the_tile_are_not_opened(parts: list[Path], counting: Any):
    a, b, c, d = (Asset(str(p), str(p), source_footprint_lonlat(p)) for p in parts)
    # a tile in the top-left part only (its footprint's north-west corner)
    west, _south, _east, north = a.footprint  # type: ignore[misc]
    tile = mercantile.tile(west + 0.002, north - 0.002, 16)
    with MosaicReader([d, c, b, a]) as reader:
        image = reader.tile(tile)
    assert counting.opened == [a.href]
    assert image.assets == (a.id,)


def test_tile_no_asset_covers_is_empty(parts: list[Path]) -> None:
    assets = [Asset(str(p), str(p), source_footprint_lonlat(p)) for p in parts]
    with MosaicReader(assets) as reader:
        image = reader.tile(Tile(0, 0, 3))
    assert image.is_empty and image.assets == () and image.data.shape == (4, 256, 256)
    assert not image.data.any()


def test_margin_passes_through(parts: list[Path], naip: Path) -> None:
    """With a margin, each asset's window grows (still one warp): the core is the tile read
    without one, within the window-dependence of nearest picks off the grid."""
    source = list_file(parts[0].parent, parts)
    tiles = tiles_over(naip, 15)
    plain = dict(read_tiles(source, tiles))
    with open_tile_source(source, margin=16) as reader:
        wide = dict(reader.read(tiles))
    differ = 0
    for tile in tiles:
        image = wide[tile]
        assert image.margin == 16 and image.data.shape == (4, 288, 288)
        core = image.data[:, 16:-16, 16:-16]
        differ += int(((core != plain[tile].data).any(axis=0)).sum())
        differ += int((image.core_mask != plain[tile].mask).sum())
        # an asset may supply the margin only: the model sees those pixels too
        assert set(plain[tile].assets) <= set(image.assets)
    assert differ / (len(tiles) * 256 * 256) < 0.005
    assert any(w.mask.sum() > plain[t].mask.sum() for t, w in wide.items())  # context read


# -- loaders: the list file and the collection give the same tiles ---------------------------


def test_list_and_collection_give_the_same_tiles(parts: list[Path], naip: Path) -> None:
    folder = parts[0].parent
    listed = list_file(folder, parts)
    items = [stac_item(p, f"item-{p.stem}") for p in parts]
    collection = collection_file(folder, items, "items.json")
    geojson = collection_file(folder, items, "items.geojson")
    assert all(is_asset_list(s) for s in (listed, collection, geojson, "LIST.TXT"))
    # a URL is a raster: a worker never fetches a list and trusts what it names
    assert not any(is_asset_list(s) for s in ("a.tif", "s3://b/list.txt", "/vsis3/b/c.json"))
    tiles = tiles_over(naip, 15)
    results = [dict(read_tiles(s, tiles)) for s in (listed, collection, geojson)]
    for tile in tiles:
        for other in results[1:]:
            np.testing.assert_array_equal(results[0][tile].data, other[tile].data)
            np.testing.assert_array_equal(results[0][tile].mask, other[tile].mask)
            names = [a.removeprefix("item-") for a in other[tile].assets]
            assert [Path(a).stem for a in results[0][tile].assets] == names
    with open_tile_source(listed) as reader:
        assert isinstance(reader, MosaicReader) and reader.source == str(listed)


def test_list_loader_resolves_relative_paths_and_reads_bounds(parts: list[Path]) -> None:
    folder = parts[0].parent
    assets = load_assets(list_file(folder, [*parts, parts[0]]))  # a repeated line kept once
    assert [a.id for a in assets] == [p.name for p in parts]
    assert [a.href for a in assets] == [str(p) for p in parts]
    for asset, path in zip(assets, parts, strict=True):
        assert asset.footprint == pytest.approx(source_footprint_lonlat(path))


def test_collection_loader_reads_items(parts: list[Path]) -> None:
    folder = parts[0].parent
    items = [stac_item(parts[0], "one", **{"eo:cloud_cover": 12.5})]
    items.append({**stac_item(parts[1], "two"), "geometry": None})  # bbox only
    assets = assets_from_collection(collection_file(folder, items, "two.json"))
    assert [a.id for a in assets] == ["one", "two"]
    assert assets[0].href == str(parts[0])
    assert assets[0].cloud_cover == 12.5 and assets[1].cloud_cover is None
    assert assets[0].datetime == "2020-08-31T00:00:00Z"
    assert isinstance(assets[1].footprint, tuple)
    # the only COG data asset, without a "visual" one
    item = stac_item(parts[0], "three")
    item["assets"] = {"image": item["assets"]["visual"], "thumb": item["assets"]["thumbnail"]}
    assert assets_from_items([item])[0].href == parts[0].name
    assert assets_from_items([stac_item(parts[0], "x")], asset_key="thumbnail")[0].href == (
        "thumb.png"
    )


def test_order() -> None:
    def asset(i: str, when: str | None, cloud: float | None) -> Asset:
        return Asset(i, i, (0.0, 0.0, 1.0, 1.0), datetime=when, cloud_cover=cloud)

    assets = [
        asset("a", "2020-01-01T00:00:00Z", 30.0),
        asset("b", None, 5.0),
        asset("c", "2022-06-01T00:00:00+02:00", None),
        asset("d", "2021-01-01", 5.0),
    ]
    ids = {o: [a.id for a in order_assets(assets, o)] for o in ("listed", "newest", "oldest")}
    assert ids == {"listed": list("abcd"), "newest": list("cdab"), "oldest": list("adcb")}
    assert [a.id for a in order_assets(assets, "least-cloudy")] == list("bdac")
    with pytest.raises(ValueError, match="newest"):
        order_assets(assets, "random")


def test_collection_order_changes_the_pixels(parts: list[Path], naip: Path) -> None:
    folder = parts[0].parent
    items = [
        stac_item(p, p.stem, datetime=f"202{i}-01-01T00:00:00Z", **{"eo:cloud_cover": 40 - i})
        for i, p in enumerate(parts)
    ]
    source = collection_file(folder, items, "dated.json")
    tiles = tiles_over(naip, 15)
    with open_tile_source(source, order="newest") as newest:
        got = dict(newest.read(tiles))
    with open_tile_source(source, order="least-cloudy") as clear:
        same = dict(clear.read(tiles))
    reference = dict(read_tiles(list_file(folder, parts[::-1], "reversed.txt"), tiles))
    for tile in tiles:
        np.testing.assert_array_equal(got[tile].data, reference[tile].data)
        np.testing.assert_array_equal(same[tile].data, reference[tile].data)


def test_assets_json_round_trip() -> None:
    assets = [
        Asset("a", "s3://b/a.tif", (179.5, -1.0, -179.5, 1.0), "2020-01-01T00:00:00Z", 3.0),
        Asset("b", "/x/b.tif", {"type": "Point", "coordinates": [1.0, 2.0]}),
    ]
    frozen = json.loads(json.dumps(assets_to_json(assets)))
    assert assets_from_json(frozen) == assets
    # a bbox across the antimeridian is two boxes, found from both sides
    index = AssetIndex(assets[:1])
    assert index.candidates(mercantile.tile(179.9, 0.1, 10)) == assets[:1]
    assert index.candidates(mercantile.tile(-179.9, 0.1, 10)) == assets[:1]
    assert index.candidates(mercantile.tile(0.0, 0.1, 10)) == []
    with pytest.raises(SourceError, match="malformed asset"):
        assets_from_json([{"id": "a", "footprint": [1, 2]}])


# -- bad input: one line each ------------------------------------------------------------


def one_line_error(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text and len(text) < 400, text
    return text


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not JSON"),
        ('{"type": "Feature"}', "expected a FeatureCollection"),
        ('{"type": "FeatureCollection", "features": 3}', "'features' is not a list"),
        ('{"type": "FeatureCollection", "features": []}', "no STAC item in"),
        ('{"type": "FeatureCollection", "features": [7]}', "item 1 in .*: not an object"),
        ('{"type": "FeatureCollection", "features": [{"assets": {}}]}', "item 1 in .*: no id"),
        ('{"type": "FeatureCollection", "features": [{"id": "x"}]}', "in .*: no 'assets'"),
    ],
)
def test_malformed_collection(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SourceError, match=match) as exc:
        load_assets(path)
    assert "bad.json" in one_line_error(exc)


def test_item_without_the_asset(tmp_path: Path, parts: list[Path]) -> None:
    item = stac_item(parts[0], "scene-1")
    path = collection_file(tmp_path, [item], "items.json")
    with pytest.raises(SourceError, match="no asset 'nir'") as exc:
        load_assets(path, asset_key="nir")
    assert "'visual', 'thumbnail'" in one_line_error(exc) and "scene-1" in str(exc.value)
    del item["assets"]["visual"]
    item["assets"]["b1"] = item["assets"]["b2"] = {
        "href": "b.tif",
        "type": "image/tiff; application=geotiff; profile=cloud-optimized",
    }
    path = collection_file(tmp_path, [item], "two-cogs.json")
    with pytest.raises(SourceError, match="no 'visual' asset and 2 COG data assets") as exc:
        load_assets(path)
    assert "'thumbnail', 'b1', 'b2'" in one_line_error(exc) and "--asset" in str(exc.value)
    item["assets"] = {"thumbnail": item["assets"]["thumbnail"]}
    with pytest.raises(SourceError, match="no 'visual' asset and no COG data asset"):
        load_assets(collection_file(tmp_path, [item], "none.json"))
    item = stac_item(parts[0], "nowhere")
    item["geometry"], item["bbox"] = None, None
    with pytest.raises(SourceError, match="neither a geometry nor a bbox"):
        load_assets(collection_file(tmp_path, [item], "nowhere.json"))


def test_bad_lists(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(SourceError, match="names no file") as exc:
        load_assets(empty)
    one_line_error(exc)
    missing = tmp_path / "missing.txt"
    missing.write_text("nothere.tif\n")
    with pytest.raises(SourceError, match=r"nothere\.tif") as exc:
        load_assets(missing)
    one_line_error(exc)
    with pytest.raises(SourceError, match="cannot read"):
        load_assets(tmp_path / "absent.txt")
    with pytest.raises(SourceError, match="--asset"):
        load_assets(empty, asset_key="visual")


def test_unreadable_asset_is_named(tmp_path: Path, parts: list[Path], naip: Path) -> None:
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00 not really a tiff")
    assets = [
        Asset("scene-good", str(parts[0]), source_footprint_lonlat(parts[0])),
        Asset("scene-broken", str(broken), source_footprint_lonlat(naip)),
    ]
    tiles = tiles_over(naip, 15)
    with MosaicReader(assets) as reader, pytest.raises(SourceError) as exc:
        dict(reader.read(tiles))
    assert exc.value.permanent and "scene-broken" in one_line_error(exc)


def test_unreachable_asset_is_transient(parts: list[Path], naip: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    href = f"http://127.0.0.1:{port}/scene.tif"
    assets = [Asset("scene-remote", href, source_footprint_lonlat(naip))]
    with MosaicReader(assets) as reader, pytest.raises(SourceUnavailable) as exc:
        reader.tile(tiles_over(naip, 15)[0])
    assert not exc.value.permanent and "scene-remote" in str(exc.value)


def test_band_mismatch_names_the_asset(tmp_path: Path, parts: list[Path], aerial: Path):
    three = write_part(aerial, tmp_path / "rgb.tif", (0, 0, 512, 512), None, 0)
    assets = [
        Asset("naip-a", str(parts[0]), source_footprint_lonlat(parts[0])),
        Asset("rgb", str(three), source_footprint_lonlat(parts[0])),  # a footprint that lies
    ]
    west, south, _east, _north = source_footprint_lonlat(parts[0])
    tile = mercantile.tile(west + 0.0005, south + 0.0005, 15)  # an edge tile, not full
    with MosaicReader(assets) as reader, pytest.raises(SourceError, match="asset rgb has 3"):
        reader.tile(tile)


# -- remote assets ------------------------------------------------------------------------


def test_assets_in_s3(
    moto_server: str, bucket: str, parts: list[Path], naip: Path, tmp_path: Path
) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_server)
    items = []
    for path in parts:
        s3.upload_file(str(path), bucket, f"naip/{path.name}")
        item = stac_item(path, path.stem)
        item["assets"]["visual"]["href"] = f"s3://{bucket}/naip/{path.name}"
        items.append(item)
    remote = collection_file(tmp_path, items, "remote.json")
    tiles = tiles_over(naip, 15)
    got = dict(read_tiles(remote, tiles))
    local = dict(read_tiles(list_file(parts[0].parent, parts), tiles))
    for tile in tiles:
        np.testing.assert_array_equal(got[tile].data, local[tile].data)
        np.testing.assert_array_equal(got[tile].mask, local[tile].mask)
    missing = [Asset("gone", f"s3://{bucket}/naip/gone.tif", source_footprint_lonlat(naip))]
    with MosaicReader(missing) as reader, pytest.raises(SourceError, match="gone") as exc:
        reader.tile(tiles[0])
    assert exc.value.permanent


# -- a large index ------------------------------------------------------------------------


def grid_items(n: int) -> Iterator[dict[str, Any]]:
    """``n`` items on a 100-wide grid of 0.05 degree scenes overlapping by 20 %."""
    for i in range(n):
        west, south = -100.0 + (i % 100) * 0.04, 40.0 + (i // 100) * 0.04
        yield {
            "type": "Feature",
            "id": f"scene-{i:05d}",
            "geometry": shapely.geometry.mapping(
                shapely.box(west, south, west + 0.05, south + 0.05)
            ),
            "properties": {"datetime": "2020-01-01T00:00:00Z", "eo:cloud_cover": float(i % 7)},
            "assets": {"visual": {"href": f"s3://bucket/{i:05d}.tif"}},
        }


def test_ten_thousand_items(tmp_path: Path) -> None:
    path = collection_file(tmp_path, list(grid_items(10_000)), "big.json")
    started = time.perf_counter()
    assets = load_assets(path, order="least-cloudy")
    loaded = time.perf_counter()
    index = AssetIndex(assets)
    built = time.perf_counter()
    rss = psutil.Process().memory_info().rss
    tracemalloc.start()  # memory apart: tracing slows Python several times
    again = AssetIndex(assets)
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    grown = psutil.Process().memory_info().rss - rss  # GEOS's geometries are not traced
    tiles = [mercantile.tile(-100.0 + i * 0.0397, 40.0 + i * 0.0391, 14) for i in range(100)]
    queried = time.perf_counter()
    found = [index.candidates(t) for t in tiles]
    done = time.perf_counter()
    print(
        json.dumps(
            {
                "items": len(assets),
                "file_mb": round(path.stat().st_size / 1e6, 1),
                "load_s": round(loaded - started, 3),
                "index_build_s": round(built - loaded, 3),
                "index_build_peak_python_mb": round(peak / 1e6, 1),
                "index_rss_growth_mb": round(grown / 1e6, 1),
                "query_ms_per_tile": round((done - queried) * 1e3 / len(tiles), 3),
            }
        )
    )
    assert len(index) == len(again) == 10_000
    geometries = [a.geometry() for a in assets]
    for tile, hits in zip(tiles, found, strict=True):
        area = tile_box(tile)
        brute = [
            a
            for a, g in zip(assets, geometries, strict=True)
            if g.intersects(area) and not g.touches(area)
        ]
        assert hits == brute and 1 <= len(hits) <= 9
    # the priority order is kept: least cloudy first
    assert all(
        [a.cloud_cover for a in hits] == sorted(a.cloud_cover for a in hits) for hits in found
    )


def test_a_reader_from_candidates_opens_nothing_up_front() -> None:
    """A worker builds a reader from a message's candidates: nothing is opened (nor checked)
    until a tile needs an asset, so a pack far from a bad asset never meets it."""
    assets = [Asset("x", "/nowhere/x.tif", (10.0, 10.0, 11.0, 11.0))]
    with MosaicReader(assets) as reader:
        assert reader.opens == 0
        assert reader.candidates(mercantile.tile(10.5, 10.5, 12)) == assets
    with pytest.raises(SourceError, match="at least one asset"):
        MosaicReader([])
    with pytest.raises(SourceError, match="no STAC item"):
        assets_from_items([])
    with pytest.raises(SourceError):
        open_mosaic("/nowhere/list.txt")
