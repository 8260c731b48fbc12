"""A ResNet-18-style classifier at 256x256, written here, for the serving benchmarks.

Why it exists: the demo model is a few lines of arithmetic, so serving overhead (HTTP, .npy
encoding, TorchServe's batcher) dwarfs its inference and a TorchServe / in-process ratio on
it says nothing about a real model. This network does the work of a real one: the layer
shapes of ResNet-18 (He et al. 2015; stem conv 7x7/2 + max-pool, four stages of two
BasicBlocks, global average pool, one linear layer), with the base width configurable so the
benchmark stays within minutes on a 2-core CPU and still costs tens of milliseconds per tile.

It is NOT trained and downloads nothing: weights are Kaiming-initialised from a fixed seed,
so every build of the same width gives the same file contents and the same scores. Its
outputs are meaningless as labels; only its cost matters.

``save_resnet`` writes it as TorchScript with chipscale metadata (3 bands, uint8 tiles
divided by 255, 256 px, a few classes, ``output: "logits"`` so the runtime applies the
softmax): the same kind of file users serve.

Usage: ``python bench/resnet_model.py -o resnet.pt [--width 32] [--time]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model_server.chipscale_runtime import (  # noqa: E402
    ModelMetadata,
    Scaling,
    save_torchscript,
)

NAME = "bench-resnet"
VERSION = "1"
CLASSES = ("building", "road", "water", "vegetation", "bare_ground")
BANDS = 3
TILE_SIZE = 256
#: Base width (channels of the stem and the first stage; stages double it). ResNet-18 uses
#: 64: about 2.4 GMAC per 256 px tile, 100+ ms on one core here. 32 costs a quarter of that.
DEFAULT_WIDTH = 32
SEED = 0


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (ResNet-18's block)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        # A 1x1 projection when the shape changes, else identity (an empty Sequential
        # scripts cleanly, where an Optional attribute would need refinement).
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetClassifier(nn.Module):
    """ResNet-18 layout at base ``width``: ``(N, bands, H, W)`` float -> ``(N, classes)``."""

    def __init__(
        self, width: int = DEFAULT_WIDTH, classes: int = len(CLASSES), bands: int = BANDS
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(bands, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        cin = width
        for i in range(4):
            cout = width * 2**i
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


def build_resnet(
    width: int = DEFAULT_WIDTH, seed: int = SEED, bands: int = BANDS
) -> ResNetClassifier:
    """The network at ``width`` with deterministic random weights, in eval mode."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    generator = torch.Generator().manual_seed(seed)
    model = ResNetClassifier(width, bands=bands)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
                module.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=generator)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.01, generator=generator)
                assert module.bias is not None
                module.bias.zero_()
    return model.eval()


def metadata(width: int = DEFAULT_WIDTH) -> ModelMetadata:
    """chipscale metadata of the benchmark model (stored inside the file)."""
    return ModelMetadata(
        name=NAME,
        version=VERSION,
        classes=CLASSES,
        bands=BANDS,
        tile_size=TILE_SIZE,
        scaling=Scaling.divided_by(255),
        output="logits",
        description=(
            f"Benchmark only: untrained ResNet-18 layout at base width {width}, random "
            f"weights (seed {SEED}); its scores mean nothing."
        ),
    )


def save_resnet(path: str | Path, width: int = DEFAULT_WIDTH) -> Path:
    """Write the benchmark model as TorchScript with its metadata; return the path."""
    return save_torchscript(build_resnet(width), path, metadata(width), method="script")


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def gflops_per_tile(module: nn.Module, tile_size: int = TILE_SIZE, bands: int = BANDS) -> float:
    """Floating-point operations of one tile's forward pass, in GFLOP (1 MAC = 2 FLOP), as
    torch's FlopCounterMode counts them (convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(torch.zeros(1, bands, tile_size, tile_size))
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", default="bench-resnet.pt")
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH)
    parser.add_argument("--time", action="store_true", help="time a 32-tile batch, 1 thread")
    args = parser.parse_args()
    path = save_resnet(args.out, args.width)
    model = build_resnet(args.width)
    report: dict[str, object] = {
        "path": str(path),
        "width": args.width,
        "parameters": parameter_count(model),
        "gflops_per_tile": round(gflops_per_tile(model), 3),
    }
    if args.time:
        from model_server.chipscale_runtime import load_model

        runtime = load_model(path, "cpu", sub_batch=32, threads=1)
        batch = torch.randint(0, 256, (32, BANDS, TILE_SIZE, TILE_SIZE), dtype=torch.uint8)
        runtime.predict(batch.numpy())  # warm-up
        start = time.perf_counter()
        runtime.predict(batch.numpy())
        report["ms_per_tile_batch32_1thread"] = round((time.perf_counter() - start) / 32 * 1000, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
