"""The demo segmentation model (a hand-made per-pixel heuristic with a 16 px margin): its
file and metadata, per-pixel output, and tiles read with the margin giving the classes of a
whole-image run, on the bundled aerial image read through GDAL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mercantile import Tile

from chipscale.models import demo_model, demo_segmentation
from chipscale.models.predictors import InProcessPredictor
from chipscale.sources import read_tiles
from chipscale.sources.footprint import cover
from chipscale.values import ImageData

ROOT = Path(__file__).resolve().parents[1]
S, M = 256, demo_segmentation.MARGIN


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built by the example script, as ``make demo-segmentation`` does."""
    path = tmp_path_factory.mktemp("seg") / "demo-segmentation.pt"
    script = ROOT / "examples" / "build_demo_model.py"
    subprocess.run(
        [sys.executable, str(script), "--task", "segmentation", "-o", str(path)], check=True
    )
    return path


def whole_area(aerial: Path, z: int) -> tuple[list[Tile], np.ndarray, int, int]:
    """The tiles over the image and the area they cover plus a ring of tiles around (margin-
    free reads pasted side by side): what a whole-image run sees."""
    tiles = list(cover(z, source=str(aerial)))
    x0, y0 = min(t.x for t in tiles) - 1, min(t.y for t in tiles) - 1
    x1, y1 = max(t.x for t in tiles) + 1, max(t.y for t in tiles) + 1
    ring = [Tile(x, y, z) for y in range(y0, y1 + 1) for x in range(x0, x1 + 1)]
    area = np.zeros((3, (y1 - y0 + 1) * S, (x1 - x0 + 1) * S), dtype=np.uint8)
    for tile, image in read_tiles(aerial, ring):
        r, c = (tile.y - y0) * S, (tile.x - x0) * S
        area[:, r : r + S, c : c + S] = np.where(image.mask, image.data, 0)
    return tiles, area, x0, y0


def test_metadata_says_segmentation_with_a_margin(model_file: Path) -> None:
    with InProcessPredictor(model_file) as predictor:
        info = predictor.info
    assert info.task == "segmentation" and info.margin == M == 16
    assert info.classes == ("snow", "forest", "bare_ground", "road")
    assert "heuristic" in predictor.metadata.description
    assert demo_segmentation.RADIUS <= M  # the margin covers the receptive field


def test_per_pixel_scores() -> None:
    model = demo_segmentation.DemoSegmentation().eval()
    x = torch.rand(2, 4, S + 2 * M, S + 2 * M)  # 4 bands (NIR) accepted too
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 4, S + 2 * M, S + 2 * M)
    inner = out[:, :, M:-M, M:-M].sum(dim=1)
    torch.testing.assert_close(inner, torch.ones_like(inner))


def test_tiles_with_margin_equal_the_whole_image(model_file: Path, aerial: Path) -> None:
    """Pixels near tile borders depend on the neighbouring tiles' pixels: with the margin
    they get the class of a whole-image run, without it they do not."""
    tiles, area, x0, y0 = whole_area(aerial, 18)
    scripted = torch.jit.load(str(model_file))
    with torch.no_grad():
        whole = scripted(torch.from_numpy(area[np.newaxis]).float() / 255.0)[0].argmax(0)
    expected = {
        t: whole[(t.y - y0) * S : (t.y - y0 + 1) * S, (t.x - x0) * S : (t.x - x0 + 1) * S].numpy()
        for t in tiles
    }
    images = dict(read_tiles(aerial, tiles, margin=M))
    with InProcessPredictor(model_file) as predictor:
        masks = predictor.predict(np.stack([images[t].data for t in tiles]))
        assert masks.shape == (len(tiles), S, S) and masks.dtype == np.uint8
        for tile, mask in zip(tiles, masks, strict=True):
            np.testing.assert_array_equal(mask, expected[tile])
        # the margin matters: zero context instead of the neighbours' pixels changes classes
        bare = [
            ImageData(
                np.pad(images[t].data[:, M:-M, M:-M], ((0, 0), (M, M), (M, M))), images[t].mask
            )
            for t in tiles
        ]
        blind = predictor.predict(np.stack([image.data for image in bare]))
    changed = sum(int((b != expected[t]).sum()) for t, b in zip(tiles, blind, strict=True))
    assert changed > 100


def test_classes_are_meaningful_on_the_demo_image(aerial: Path) -> None:
    """The bundled image is mostly forest and snow, with ploughed fields and one road: the
    cover the heuristic finds there (looked at as a PNG beside the image when it was made)."""
    _, area, _, _ = whole_area(aerial, 18)
    model = demo_segmentation.DemoSegmentation().eval()
    with torch.no_grad():
        classes = model(torch.from_numpy(area[np.newaxis]).float() / 255.0)[0].argmax(0)
    valid = torch.from_numpy(area.any(axis=0))
    share = {
        name: float((classes[valid] == i).float().mean())
        for i, name in enumerate(demo_model.CLASSES)
    }
    assert 0.5 < share["forest"] < 0.7, share
    assert 0.2 < share["snow"] < 0.4, share
    assert 0.03 < share["bare_ground"] < 0.15, share
    assert 0.01 < share["road"] < 0.08, share
