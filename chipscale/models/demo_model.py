"""The demo model: a hand-made land-cover heuristic written as a torch module, so the
pipeline runs with no download. Not trained and not to be trusted elsewhere: weights were
chosen by hand while looking at the demo image (``rasterio_cogeo.tif``: 0.6 m winter aerial
of Gangwon, Korea: snowy fields, conifer and leafless forest, a road, ploughed bare fields);
it shows tiles going through a real model file with real metadata, with outputs that make
sense on that image. :func:`build` writes it as TorchScript with the metadata inside.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

NAME = "demo-landcover"
#: Bump when the weights or features change: a cached demo file of another version is rebuilt.
VERSION = "1"
CLASSES = ("snow", "forest", "bare_ground", "road")
TILE_SIZE = 256
#: Softmax temperature: lower makes each block's vote more decisive.
TEMPERATURE = 0.5
#: Block size of the per-block features, in pixels.
BLOCK = 4

#: Features, in order, each block's feature vector holds ("greyness" is -|brightness - 0.45|,
#: peaking at the mid grey of asphalt).
FEATURES = ("bias", "brightness", "greyness", "chroma", "warmth", "vegetation", "texture")
#: One row per class, one column per feature (logit = row . features).
WEIGHTS = (
    # bias  bright  grey  chroma  warmth  veg    texture
    (-5.0, 12.0, 0.0, -4.0, -20.0, -4.0, -30.0),  # snow: bright, smooth, not warm, not green
    (3.0, -12.0, 0.0, 0.0, -4.0, 10.0, 25.0),  # forest: dark or textured, green
    (-2.5, 3.0, 0.0, 4.0, 40.0, -6.0, -10.0),  # bare_ground: warm (red > blue)
    (3.5, 0.0, 25.0, -15.0, -25.0, -15.0, -40.0),  # road: mid grey, cool, smooth
)


class DemoLandcover(nn.Module):
    """Hand-designed cover classifier: ``(N, 3|4, H, W)`` in 0..1 -> ``(N, 4)`` cover
    fractions summing to 1.

    How it scores a tile ``(N, 3 or 4, 256, 256)`` of reflectance-like values in 0..1 (the runtime
    divides 8-bit pixels by 255 first, as the metadata says):

    1. Average 4x4 pixel blocks (2.4 m at z18) and measure texture: the standard deviation of
       brightness inside each block plus across its 3x3 block neighbourhood.
    2. Per block: brightness ``L``, chroma (max - min of RGB), warmth (red - blue), a vegetation
       index (NDVI from the 4th, near-infrared band when there is one, else the green-red index
       GRVI = (g - r) / (g + r), weaker but usable on RGB), texture, and greyness (closeness of
       brightness to the mid grey of asphalt).
    3. A hand-set linear layer maps those features to one logit per class (``WEIGHTS`` below):
       ``snow`` bright and smooth, ``forest`` dark or textured and green (the only vegetation
       class: green fields with NIR also land here), ``bare_ground`` warm (brown soil, dry grass),
       ``road`` mid grey, cool (the asphalt here is bluish) and smooth.
    4. A softmax with temperature ``TEMPERATURE`` per block, then the mean over blocks: the output
       is the tile's cover fractions, which sum to 1 (metadata ``output: "scores"``).

    Known limits: a road is a thin strip, so its cover fraction stays small (a few percent on
    tiles the road crosses), and leafless forest over snow sometimes votes ``road``. It is
    size-agnostic arithmetic, but the metadata pins 256 px tiles. ``build()`` writes it as
    TorchScript with the metadata inside; the same code gives the same outputs on every build.
    """

    def __init__(self) -> None:
        super().__init__()
        weight = torch.tensor(WEIGHTS, dtype=torch.float32) / TEMPERATURE
        self.register_buffer("weight", weight[:, 1:].contiguous())
        self.register_buffer("bias", weight[:, 0].contiguous())
        self.block: int = BLOCK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_scores(x).mean(dim=[2, 3])

    @torch.jit.export
    def block_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Per-block class probabilities ``(N, classes, H / 4, W / 4)``: a coarse cover map."""
        x = x.float()
        lum = x[:, 0:3].mean(dim=1, keepdim=True)
        blocks = F.avg_pool2d(x, self.block)
        lum2 = F.avg_pool2d(lum * lum, self.block)
        br, bg, bb = blocks[:, 0:1], blocks[:, 1:2], blocks[:, 2:3]
        bright = (br + bg + bb) / 3.0
        fine = (lum2 - bright * bright).clamp_min(0.0)
        near = F.avg_pool2d(
            torch.cat([bright, bright * bright], 1), 3, 1, 1, count_include_pad=False
        )
        coarse = (near[:, 1:2] - near[:, 0:1] * near[:, 0:1]).clamp_min(0.0)
        texture = torch.sqrt(fine + coarse + 1e-8)
        high = torch.maximum(torch.maximum(br, bg), bb)
        low = torch.minimum(torch.minimum(br, bg), bb)
        chroma = high - low
        warmth = br - bb
        if x.shape[1] >= 4:
            nir = blocks[:, 3:4]
            veg = (nir - br) / (nir + br + 1e-3)
        else:
            veg = (bg - br) / (bg + br + 1e-3)
        greyness = -(bright - 0.45).abs()
        feats = torch.cat([bright, greyness, chroma, warmth, veg, texture], 1)  # (N, 6, h, w)
        logits = torch.einsum("nfhw,cf->nchw", feats, self.weight) + self.bias.view(1, -1, 1, 1)
        return torch.softmax(logits, dim=1)


def metadata() -> dict[str, object]:
    """The demo model's metadata document (model_server.chipscale_runtime schema)."""
    return {
        "name": NAME,
        "version": VERSION,
        "classes": list(CLASSES),
        "bands": 3,
        "band_counts": [3, 4],
        "band_names": ["red", "green", "blue", "nir"],
        "tile_size": TILE_SIZE,
        "input_dtype": "float32",
        "scaling": {"type": "divide", "value": 255},
        "output": "scores",
        "description": (
            "Hand-made land-cover heuristic for the chipscale demo (not trained): per-class "
            "cover fractions from brightness, chroma, red-blue warmth, a vegetation index "
            "(NDVI with a 4th NIR band, else green-red) and texture on 4x4 pixel blocks."
        ),
    }


def build(path: str | os.PathLike[str] = "examples/demo-model.pt") -> Path:
    """Write the demo model as TorchScript with its metadata; return the path.

    The file is written beside its final name and renamed into place, so a reader never sees
    half a file and concurrent builds are harmless.
    """
    from model_server.chipscale_runtime import save_torchscript

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".demo-model-", suffix=".pt", dir=path.parent)
    os.close(fd)
    try:
        save_torchscript(DemoLandcover(), tmp, metadata(), method="script")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the model is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
