"""Tiles/s of a segmentation job against a classification job with the same backbone, side by
side in one run through the local pipeline (``chipscale.pipeline.runner.run_local``: packs,
worker threads with read-ahead, reads, the model, then for segmentation the class masks,
vectorizing and the features written in the tile's transaction). Goal: segmentation /
classification >= 0.7. Prints JSON and writes bench/results/segmentation.json.

Two backbones, each as a classification model (one score per class per tile, 256 px in) and
a segmentation model (a class per pixel, margin 16: 288 px in, 256 px out):

* ``demo``: the demo heuristic's per-pixel features (:mod:`chipscale.models.demo_segmentation`);
  the classification head is their mean over the tile (cover fractions).
* ``resnetW``: the ResNet-18 layout of bench/resnet_model.py at base width W (``resnet16``
  costs about a tenth of ResNet-18, ``resnet64`` is ResNet-18's own width), random weights;
  classification head global pool + linear, segmentation head a 1x1 convolution on the last
  stage upsampled bilinearly to the input (an FCN-32s head), ``output: "logits"``.

Per backbone and round, the two jobs run one after the other (the order alternates by
round) into fresh SQLite stores; medians over ``--repeats`` rounds are compared, as this
machine is shared and noisy. ``model_only`` is the predictor alone on the same batches (the
runtime's argmax included for segmentation): the rest of the difference is the pipeline's
share (masks to fractions and polygons, feature rows).

The merge and export side of issue 18's bench (features/s, peak RSS at 1,000,000 tiles) is
bench/segmentation_merge.py, with its own results file.

Usage: ``python bench/segmentation.py [--zoom 20] [--repeats 3] [--backbones demo,resnet64]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import resnet_model  # noqa: E402

from chipscale.grid.packs import DEFAULT_MAX_TILES, pack_tiles  # noqa: E402
from chipscale.models import demo_segmentation  # noqa: E402
from chipscale.models.predictors import InProcessPredictor  # noqa: E402
from chipscale.pipeline.runner import DEFAULT_WORKERS, default_model_threads, run_local  # noqa: E402
from chipscale.results import open_store  # noqa: E402
from chipscale.sources import read_tiles  # noqa: E402
from chipscale.sources.footprint import cover  # noqa: E402
from model_server.chipscale_runtime import save_torchscript  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "segmentation.json"
MARGIN = 16
GOAL = 0.7


class DemoCover(nn.Module):
    """The demo segmentation's per-pixel backbone with a classification head: the mean of
    its per-pixel class probabilities over the tile, ``(N, 4)``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = demo_segmentation.DemoSegmentation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).mean(dim=[2, 3])


class ResNetSegmenter(nn.Module):
    """bench/resnet_model.py's backbone with an FCN-32s head: ``(N, classes, H, W)`` logits."""

    def __init__(self, width: int) -> None:
        super().__init__()
        classifier = resnet_model.build_resnet(width)
        self.stem = classifier.stem
        self.stages = classifier.stages
        self.head = nn.Conv2d(width * 8, len(resnet_model.CLASSES), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[2], x.shape[3])
        logits = self.head(self.stages(self.stem(x)))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def models(backbone: str) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
    """A backbone's two models with their metadata: ``{task: (module, metadata)}``."""
    if backbone == "demo":
        demo_meta = demo_segmentation.metadata()
        demo_cls = {k: v for k, v in demo_meta.items() if k not in ("task", "margin")}
        return {
            "classification": (DemoCover(), {**demo_cls, "name": "bench-demo-cover"}),
            "segmentation": (demo_segmentation.DemoSegmentation(), demo_meta),
        }
    if not backbone.startswith("resnet") or not backbone[6:].isdigit():
        raise SystemExit(f"unknown backbone {backbone!r}: demo or resnetW (resnet16, resnet64)")
    width = int(backbone[6:])
    res_meta = resnet_model.metadata(width).to_dict()
    res_seg = {**res_meta, "task": "segmentation", "margin": MARGIN, "name": "bench-fcn"}
    return {
        "classification": (resnet_model.build_resnet(width), res_meta),
        "segmentation": (ResNetSegmenter(width).eval(), res_seg),
    }


def build_models(directory: Path, backbones: list[str]) -> dict[str, dict[str, Path]]:
    """The model files: ``{backbone: {"classification": path, "segmentation": path}}``."""
    paths: dict[str, dict[str, Path]] = {}
    for backbone in backbones:
        tasks = models(backbone)
        for task, (module, meta) in tasks.items():
            path = directory / f"{backbone}-{task}.pt"
            save_torchscript(module.eval(), path, meta, method="script")
            paths.setdefault(backbone, {})[task] = path
    return paths


def job_rate(
    source: str, zoom: int, tiles: list, predictor: InProcessPredictor, workers: int
) -> dict[str, float]:
    """One job through run_local into a fresh SQLite store: tiles/s and stage seconds."""
    with tempfile.TemporaryDirectory() as tmp, open_store(f"sqlite:///{tmp}/bench.db") as store:
        summary = run_local(
            job="bench",
            source=source,
            tiles=tiles,
            zoom=zoom,
            predictor=predictor,
            store=store,
            workers=workers,
        )
        features = sum(1 for _ in store.iter_features("bench", background=True))
    return {
        "tiles_per_s": summary.processed / summary.seconds,
        "read_s": summary.read_seconds,
        "predict_s": summary.predict_seconds,
        "write_s": summary.write_seconds,
        "features": features,
        "ok": summary.processed,
    }


def model_rate(predictor: InProcessPredictor, batches: list[np.ndarray], tiles: int) -> float:
    start = time.perf_counter()
    for batch in batches:
        predictor.predict(batch)
    return tiles / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(ROOT / "examples" / "rasterio_cogeo.tif"))
    parser.add_argument("--zoom", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--backbones", default="demo,resnet16,resnet64")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    tiles = list(cover(args.zoom, source=args.source))
    packs = list(pack_tiles(tiles, DEFAULT_MAX_TILES, presorted=False))
    threads = default_model_threads()
    backbones = args.backbones.split(",")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_models(Path(tmp), backbones)
        predictors = {
            (b, task): InProcessPredictor(paths[b][task], threads=threads)
            for b in backbones
            for task in ("classification", "segmentation")
        }
        # The batches each model takes, one per pack (model_only), read once.
        batches: dict[tuple[str, str], list[np.ndarray]] = {}
        for (b, task), predictor in predictors.items():
            margin = predictor.info.margin
            images = dict(read_tiles(args.source, tiles, margin=margin))
            batches[b, task] = [
                np.stack([images[t].data for t in pack if not images[t].is_empty]) for pack in packs
            ]
            predictor.predict(batches[b, task][0][:2])  # warm-up
        runs: dict[str, dict[str, list[dict[str, float]]]] = {
            b: {"classification": [], "segmentation": []} for b in backbones
        }
        model_only: dict[str, dict[str, list[float]]] = {
            b: {"classification": [], "segmentation": []} for b in backbones
        }
        for r in range(args.repeats):
            for b in backbones:
                order = ["classification", "segmentation"]
                if r % 2:
                    order.reverse()
                for task in order:
                    predictor = predictors[b, task]
                    runs[b][task].append(
                        job_rate(args.source, args.zoom, tiles, predictor, args.workers)
                    )
                    model_only[b][task].append(model_rate(predictor, batches[b, task], len(tiles)))
    results: dict[str, Any] = {}
    for b in backbones:
        med = {
            task: statistics.median(run["tiles_per_s"] for run in runs[b][task])
            for task in ("classification", "segmentation")
        }
        model_med = {task: statistics.median(v) for task, v in model_only[b].items()}
        paired = [
            s["tiles_per_s"] / c["tiles_per_s"]
            for s, c in zip(runs[b]["segmentation"], runs[b]["classification"], strict=True)
        ]
        results[b] = {
            "tiles_per_s": {task: round(v, 2) for task, v in med.items()},
            "ratio_segmentation_to_classification": round(
                med["segmentation"] / med["classification"], 3
            ),
            "ratio_paired_median": round(statistics.median(paired), 3),
            "model_only_tiles_per_s": {task: round(v, 2) for task, v in model_med.items()},
            "model_only_ratio": round(model_med["segmentation"] / model_med["classification"], 3),
            "features_per_job": runs[b]["segmentation"][0]["features"],
            "runs": {
                task: [{k: round(v, 3) for k, v in run.items()} for run in values]
                for task, values in runs[b].items()
            },
        }
    report = {
        "benchmark": "segmentation",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "results": results,
        "goal_ratio_segmentation_to_classification": GOAL,
        "merge_and_export": "bench/segmentation_merge.py (bench/results/segmentation_merge.json)",
        "conditions": {
            "source": os.path.basename(args.source),
            "zoom": args.zoom,
            "tiles": len(tiles),
            "packs": len(packs),
            "max_tiles_per_pack": DEFAULT_MAX_TILES,
            "workers": args.workers,
            "torch_threads": threads,
            "store": "sqlite (temporary directory)",
            "margin_segmentation": MARGIN,
            "repeats": args.repeats,
            "order": "per backbone and round: classification then segmentation, reversed "
            "every other round",
            "cpus": os.cpu_count(),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "rasterio": rasterio.__version__,
            "gdal": rasterio.__gdal_version__,
            "device": "cpu",
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
