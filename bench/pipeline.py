"""End-to-end throughput of the local pipeline against its slower stage, each stage measured
as the pipeline runs it: the packs it makes, its worker threads, its reader cache, one model
call per pack with its torch threads, one store write per pack.

``ratio_end_to_end_to_bound`` = end to end / the slowest stage, reported as it falls (goal
0.8), and ``ratio_read_ahead_to_serial`` = the pipeline with read-ahead / the same with
serial workers. The five measurements alternate within one run (``--repeats`` rounds) and
medians are compared, since this machine is noisy. Prints JSON (``-o`` also writes it to a file).
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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import rasterio
import torch
from mercantile import Tile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chipscale.grid.packs import DEFAULT_MAX_TILES, pack_tiles  # noqa: E402
from chipscale.models.predictors import open_predictor  # noqa: E402
from chipscale.pipeline.runner import DEFAULT_WORKERS, default_model_threads, run_local  # noqa: E402
from chipscale.results import open_store  # noqa: E402
from chipscale.sources import cached_reader, read_tiles  # noqa: E402
from chipscale.sources.footprint import cover  # noqa: E402
from chipscale.values import JobInfo, TileResult  # noqa: E402


def on_workers(workers: int, packs: Sequence[tuple[Tile, ...]], stage: Callable) -> float:
    """Seconds for ``workers`` threads to run ``stage`` on every pack, fed in order as the
    runner feeds its workers (fresh threads, so fresh per-thread reader caches, as a run)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(stage, packs):
            pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default=str(ROOT / "examples" / "rasterio_cogeo.tif"))
    # z21: 1,024 tiles in 16 packs. At z20 (4 packs) the first read and the last prediction,
    # which nothing can overlap, are a quarter of the job: a ramp, not the steady state.
    parser.add_argument("--zoom", type=int, default=21)
    parser.add_argument("--model", default=None, help="model file (default: the demo model)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--max-tiles", type=int, default=DEFAULT_MAX_TILES, help="pack size")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: as chipscale run)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("-o", "--output", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    tiles = list(cover(args.zoom, source=args.source))
    packs = list(pack_tiles(tiles, args.max_tiles, presorted=False))
    predictor = open_predictor(args.model, threads=args.threads or default_model_threads())
    info = predictor.info
    images = dict(read_tiles(args.source, tiles, size=info.tile_size))
    # One model call per pack, on the pack's tiles with pixels, as predict_pack makes it.
    batches = {
        pack: np.stack(with_pixels)
        for pack in packs
        if (with_pixels := [images[t].data for t in pack if not images[t].is_empty])
    }
    predictor.predict(next(iter(batches.values())))  # warm-up: lazy initialisation
    scores = {"scores": dict.fromkeys(info.classes, 0.5)}

    def read_pack(pack: tuple[Tile, ...]) -> None:
        for _ in cached_reader(args.source, size=info.tile_size).read(pack):
            pass

    def predict_pack(pack: tuple[Tile, ...]) -> None:
        if pack in batches:
            predictor.predict(batches[pack])

    def read_only() -> float:
        return len(tiles) / on_workers(args.workers, packs, read_pack)

    def model_only() -> float:
        # Rate per tile of the job, like the others, so the figures share one denominator.
        return len(tiles) / on_workers(args.workers, packs, predict_pack)

    def store_only() -> float:
        with (
            tempfile.TemporaryDirectory() as tmp,
            open_store(f"sqlite:///{tmp}/bench.db") as store,
        ):
            store.start_job(JobInfo("bench", args.source, args.zoom, info.name, info.version))

            def write(pack: tuple[Tile, ...]) -> None:
                store.write(
                    [
                        TileResult("bench", t, "ok", scores, None, info.name, info.version)
                        for t in pack
                    ]
                )

            return len(tiles) / on_workers(args.workers, packs, write)

    stage_seconds: dict[str, list[dict[str, float]]] = {"read_ahead": [], "serial": []}

    def pipeline(ahead: bool) -> float:
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
                max_tiles=args.max_tiles,
                ahead=ahead,
            )
        stage_seconds["read_ahead" if ahead else "serial"].append(
            {
                "read": summary.read_seconds,
                "predict": summary.predict_seconds,
                "write": summary.write_seconds,
                "wall": summary.seconds,
            }
        )
        return summary.processed / summary.seconds

    measures = {
        "read_only": read_only,
        "model_only": model_only,
        "store_only": store_only,
        "end_to_end": lambda: pipeline(True),
        "end_to_end_serial": lambda: pipeline(False),
    }
    rates: dict[str, list[float]] = {name: [] for name in measures}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for name, measure in measures.items():
            rates[name].append(measure())
    median = {name: statistics.median(values) for name, values in rates.items()}
    stages = {k: v for k, v in median.items() if not k.startswith("end_to_end")}
    bound = min(stages, key=stages.__getitem__)
    paired = [a / b for a, b in zip(rates["end_to_end"], rates["end_to_end_serial"], strict=True)]
    # Per tile, summed over the workers: the feed model's inputs (chipscale.ops.feed).
    per_tile = {
        stage: round(
            statistics.median(s[stage] for s in stage_seconds["read_ahead"]) / len(tiles), 6
        )
        for stage in ("read", "predict", "write")
    }
    report = {
        "benchmark": "pipeline",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "tiles_per_second": {k: round(v, 1) for k, v in median.items()},
        "bound": bound,
        "ratio_end_to_end_to_bound": round(median["end_to_end"] / stages[bound], 3),
        "goal": 0.8,
        # Read-ahead (each worker reads its next pack while predicting) against serial
        # workers (read, predict, write, then the next), in the same rounds.
        "ratio_read_ahead_to_serial": round(median["end_to_end"] / median["end_to_end_serial"], 3),
        "ratio_read_ahead_to_serial_paired_median": round(statistics.median(paired), 3),
        "runs": {k: [round(v, 1) for v in values] for k, values in rates.items()},
        # Seconds spent in each stage inside the end-to-end runs, summed over the workers.
        "end_to_end_stage_seconds": {
            mode: [{k: round(v, 3) for k, v in s.items()} for s in runs]
            for mode, runs in stage_seconds.items()
        },
        "read_ahead_seconds_per_tile_median": per_tile,
        "conditions": {
            "source": os.path.basename(args.source),
            "zoom": args.zoom,
            "tiles": len(tiles),
            "tiles_with_pixels": sum(not image.is_empty for image in images.values()),
            "packs": len(packs),
            "max_tiles_per_pack": args.max_tiles,
            "model": info.name,
            "workers_every_stage": args.workers,
            "torch_threads": torch.get_num_threads(),
            "store": "sqlite (temporary directory)",
            "repeats": args.repeats,
            "order": (
                "read_only, model_only, store_only, end_to_end (read-ahead), "
                "end_to_end_serial in each round"
            ),
            "cpus": os.cpu_count(),
            "load_average_1_5_15_before": [round(x, 2) for x in load_before],
            "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "rasterio": rasterio.__version__,
            "gdal": rasterio.__gdal_version__,
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
