"""End-to-end throughput of the local pipeline against its own bound.

The pipeline cannot beat the slower of its two stages, so the figure that matters is
``end_to_end / min(read_only, model_only)`` on the same tiles: 1.0 means reads and inference
overlap perfectly and storing costs nothing. Goal: at least 0.8. Each stage is measured as
the pipeline runs it: the same reader, the same predictor with the same torch threads.

The three measurements alternate within one run (``--repeats`` rounds) and the medians are
compared, since this machine is noisy. Prints JSON.
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
from pathlib import Path

import numpy as np
import rasterio
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chipscale.grid.cover import cover  # noqa: E402
from chipscale.models.predictors import open_predictor  # noqa: E402
from chipscale.pipeline.runner import DEFAULT_WORKERS, default_model_threads, run_local  # noqa: E402
from chipscale.results import open_store  # noqa: E402
from chipscale.sources.cog import read_tiles  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default=str(ROOT / "examples" / "rasterio_cogeo.tif"))
    # z21: 1,024 tiles in 16 packs. At z20 (4 packs) the first read and the last prediction,
    # which nothing can overlap, are a quarter of the job: a ramp, not the steady state.
    parser.add_argument("--zoom", type=int, default=21)
    parser.add_argument("--model", default=None, help="model file (default: the demo model)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--batch", type=int, default=64, help="model-only batch size")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: as chipscale run)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    tiles = list(cover(args.zoom, source=args.source))
    predictor = open_predictor(args.model, threads=args.threads or default_model_threads())
    images = dict(read_tiles(args.source, tiles, size=predictor.info.tile_size))
    full = [images[t].data for t in tiles if not images[t].is_empty]
    batches = [np.stack(full[i : i + args.batch]) for i in range(0, len(full), args.batch)]
    predictor.predict(batches[0])  # warm-up: first call pays for lazy initialisation

    def read_only() -> float:
        start = time.perf_counter()
        for _ in read_tiles(args.source, tiles, size=predictor.info.tile_size):
            pass
        return len(tiles) / (time.perf_counter() - start)

    def model_only() -> float:
        # Only tiles with valid pixels reach the model; rate is per tile of the job, like
        # the other two, so the three figures share one denominator.
        start = time.perf_counter()
        for batch in batches:
            predictor.predict(batch)
        return len(tiles) / (time.perf_counter() - start)

    def end_to_end() -> float:
        with (
            tempfile.TemporaryDirectory() as tmp,
            open_store(f"sqlite:///{tmp}/bench.db") as store,
        ):
            summary = run_local(
                job="bench",
                source=args.source,
                tiles=tiles,
                zoom=args.zoom,
                predictor=predictor,
                store=store,
                workers=args.workers,
            )
        return summary.processed / summary.seconds

    rates: dict[str, list[float]] = {"read_only": [], "model_only": [], "end_to_end": []}
    for _ in range(args.repeats):
        rates["read_only"].append(read_only())
        rates["model_only"].append(model_only())
        rates["end_to_end"].append(end_to_end())
    median = {name: statistics.median(values) for name, values in rates.items()}
    bound = min(median["read_only"], median["model_only"])
    gdal = rasterio.__gdal_version__
    print(
        json.dumps(
            {
                "benchmark": "pipeline",
                "tiles_per_second": {k: round(v, 1) for k, v in median.items()},
                "bound": "read_only" if bound == median["read_only"] else "model_only",
                "ratio_end_to_end_to_bound": round(median["end_to_end"] / bound, 3),
                "goal": 0.8,
                "runs": {k: [round(v, 1) for v in values] for k, values in rates.items()},
                "conditions": {
                    "source": os.path.basename(args.source),
                    "zoom": args.zoom,
                    "tiles": len(tiles),
                    "tiles_with_pixels": len(full),
                    "model": predictor.info.name,
                    "workers": args.workers,
                    "model_batch": args.batch,
                    "repeats": args.repeats,
                    "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "rasterio": rasterio.__version__,
                    "gdal": gdal,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
