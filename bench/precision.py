"""Inference settings side by side (issue 17, item 1): fp32 as exported against bf16/fp16
autocast, channels_last and TorchScript freezing, through ``chipscale_runtime`` (the code
TorchServe and the in-process predictor run), on the ResNet-18-style bench model.

Settings are interleaved round by round; each prints tiles/s, its ratio to fp32 in the same
rounds (median of per-round ratios) and its largest score drift from fp32. On CPU this is a
smoke run: the GPU figures (fp16 + channels_last + cudnn.benchmark) come from
``bench/gpu_serving.py`` on a lent GPU.

Usage: ``python bench/precision.py [--width 16] [--batch 16] [--rounds 5] [-o results.json]``
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
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from resnet_model import save_resnet  # noqa: E402

from model_server import chipscale_runtime as rt  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)

SETTINGS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "fp16": {"precision": "fp16"},
    "channels_last": {"channels_last": True},
    "freeze": {"freeze": True},
    "bf16+channels_last+freeze": {"precision": "bf16", "channels_last": True, "freeze": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = save_resnet(Path(tmp) / "resnet.pt", width=args.width)
        runtimes = {
            name: rt.load_model(
                model, device, sub_batch=args.batch, inference=rt.InferenceSettings(**given)
            )
            for name, given in SETTINGS.items()
        }
    tiles = np.random.default_rng(0).integers(0, 256, (args.batch, 3, 256, 256), dtype=np.uint8)
    reference = runtimes["fp32"].predict(tiles)
    for runtime in runtimes.values():  # warm-up (JIT profiling, autocast caches)
        runtime.predict(tiles)
    rates: dict[str, list[float]] = {name: [] for name in runtimes}
    for round_ in range(args.rounds):
        order = list(runtimes)[round_ % len(runtimes) :] + list(runtimes)[: round_ % len(runtimes)]
        for name in order:
            start = time.perf_counter()
            runtimes[name].predict(tiles)
            rates[name].append(args.batch / (time.perf_counter() - start))
    results = {
        name: {
            "settings": runtimes[name].settings(),
            "tiles_per_s": round(statistics.median(rates[name]), 2),
            "ratio_to_fp32": round(
                statistics.median(r / f for r, f in zip(rates[name], rates["fp32"], strict=True)),
                3,
            ),
            "max_score_drift": float(np.abs(runtimes[name].predict(tiles) - reference).max()),
        }
        for name in runtimes
    }
    report = {
        "bench": "precision",
        "date": time.strftime("%Y-%m-%d"),
        "conditions": {
            "device": device,
            "model": f"bench/resnet_model.py width {args.width}, TorchScript, untrained",
            "batch": args.batch,
            "rounds": args.rounds,
            "torch_threads": args.threads,
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "results": results,
        "needs_gpu": "fp16 and channels_last + cudnn.benchmark figures that matter are GPU ones: "
        "bench/gpu_serving.py on a lent GPU",
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
