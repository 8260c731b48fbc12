"""The demo segmentation model: the demo land-cover heuristic
(:mod:`chipscale.models.demo_model`) made per pixel, with a margin. A hand-made heuristic, not
trained, chosen by looking at the demo image; it shows a segmentation job end to end (class
mask, polygons merged across tiles) with classes that make sense on that image.
:func:`build` writes it as TorchScript with its metadata inside.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from chipscale.models import demo_model
from chipscale.models.demo_model import TEMPERATURE, WEIGHTS

NAME = "demo-landcover-segmentation"
#: Bump when the weights or features change: a cached demo file of another version is rebuilt.
VERSION = "1"
#: Pixels read on each side of a tile. The model's receptive field reaches ``RADIUS`` pixels
#: (2 + 4 + 4 from the three poolings below), which the margin covers: every pixel of a tile's
#: core gets the class it would get in a whole-image run.
MARGIN = 16
#: Pooling windows, pixels a side: local means, the neighbourhood of the texture, smoothing.
LOCAL, NEAR, SMOOTH = 5, 9, 9
RADIUS = LOCAL // 2 + NEAR // 2 + SMOOTH // 2


def _pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over the ``k`` x ``k`` window around each pixel, zeros beyond the edges.

    Separable window sums (``unfold``, a row then a column) rather than ``avg_pool2d`` with
    stride 1, which is about 3 times slower on CPU; each window is summed in the same order
    wherever it lies, so a pixel's value does not depend on where the tile starts.
    """
    r = k // 2
    padded = F.pad(x, (r, r, r, r))
    rows = padded.unfold(3, k, 1).sum(-1)
    return rows.unfold(2, k, 1).sum(-1) / float(k * k)


class DemoSegmentation(nn.Module):
    """Hand-designed per-pixel land cover: ``(N, 3|4, H, W)`` in 0..1 -> ``(N, 4, H, W)``
    class probabilities per pixel (summing to 1 over the classes).

    The features of :class:`~chipscale.models.demo_model.DemoLandcover`, computed around every
    pixel instead of on 4 x 4 blocks, with the same hand-set weights (``WEIGHTS``):

    1. Means over the ``LOCAL`` x ``LOCAL`` window around the pixel: red, green, blue,
       brightness ``L``; the variance of brightness in that window (fine texture) plus the
       variance of ``L`` over the ``NEAR`` x ``NEAR`` window around it (coarse texture).
    2. Chroma, warmth (red - blue), a vegetation index (NDVI with a 4th NIR band, else
       green-red), texture, greyness; one logit per class, a softmax at ``TEMPERATURE``.
    3. The probabilities averaged over ``SMOOTH`` x ``SMOOTH`` pixels: fewer one-pixel specks,
       and the output depends on the neighbourhood, which is what the margin is for.

    Everything is a pooling with stride 1, so a pixel's class depends on the pixels at most
    ``RADIUS`` (10) away; with ``MARGIN`` 16 the central tile is the same as cut from a
    whole-image run. Known limits: those of the block heuristic (leafless forest over snow
    sometimes votes ``road``; shadows on snow are grey and cool, so some are ``road`` too).
    """

    def __init__(self) -> None:
        super().__init__()
        weight = torch.tensor(WEIGHTS, dtype=torch.float32) / TEMPERATURE
        self.register_buffer("weight", weight[:, 1:].contiguous())
        self.register_buffer("bias", weight[:, 0].reshape(1, -1, 1, 1).contiguous())
        self.local: int = LOCAL
        self.near: int = NEAR
        self.smooth: int = SMOOTH

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        lum = x[:, 0:3].mean(dim=1, keepdim=True)
        means = _pool(torch.cat([x, lum * lum], 1), self.local)
        br, bg, bb = means[:, 0:1], means[:, 1:2], means[:, 2:3]
        bright = (br + bg + bb) / 3.0
        fine = (means[:, -1:] - bright * bright).clamp_min(0.0)
        near = _pool(torch.cat([bright, bright * bright], 1), self.near)
        coarse = (near[:, 1:2] - near[:, 0:1] * near[:, 0:1]).clamp_min(0.0)
        texture = torch.sqrt(fine + coarse + 1e-8)
        chroma = torch.maximum(torch.maximum(br, bg), bb) - torch.minimum(torch.minimum(br, bg), bb)
        warmth = br - bb
        if x.shape[1] >= 4:
            nir = means[:, 3:4]
            veg = (nir - br) / (nir + br + 1e-3)
        else:
            veg = (bg - br) / (bg + br + 1e-3)
        greyness = -(bright - 0.45).abs()
        feats = torch.cat([bright, greyness, chroma, warmth, veg, texture], 1)  # (N, 6, H, W)
        logits = torch.einsum("nfhw,cf->nchw", feats, self.weight) + self.bias
        return _pool(torch.softmax(logits, dim=1), self.smooth)


def metadata() -> dict[str, object]:
    """The demo segmentation model's metadata document (model_server schema): the demo
    classifier's, made per pixel with a margin."""
    return {
        **demo_model.metadata(),
        "name": NAME,
        "version": VERSION,
        "task": "segmentation",
        "margin": MARGIN,
        "description": (
            "Hand-made per-pixel land-cover heuristic for the chipscale demo (not trained): "
            "the demo classifier's brightness, chroma, warmth, vegetation and texture "
            f"features around every pixel, smoothed over {SMOOTH} px; a {MARGIN} px margin "
            "covers its receptive field."
        ),
    }


def build(path: str | os.PathLike[str] = "examples/demo-segmentation.pt") -> Path:
    """Write the demo segmentation model as TorchScript with its metadata; return the path
    (written beside it and renamed into place, as :func:`chipscale.models.demo_model.build`)."""
    from model_server.chipscale_runtime import save_torchscript

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".demo-segmentation-", suffix=".pt", dir=path.parent)
    os.close(fd)
    try:
        save_torchscript(DemoSegmentation(), tmp, metadata(), method="script")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the model is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
