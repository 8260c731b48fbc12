"""The client's request shape, measured: tiles/s of ``TorchServePredictor`` by tiles per
request x requests in flight, the demo model behind a real TorchServe, packs of 100 real
aerial tiles, settings interleaved in each round and medians compared (docs/design.md 9.3
reads the default off this table). Prints JSON (``-o`` also writes it to a file).
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chipscale.grid.packs import pack_tiles  # noqa: E402
from chipscale.models.predictors import demo_model_path, open_predictor  # noqa: E402
from chipscale.models.serving import ServingConfig, TorchServe, package_model  # noqa: E402
from chipscale.models.torchserve_client import (  # noqa: E402
    DEFAULT_CONCURRENCY,
    DEFAULT_TILES_PER_REQUEST,
    TorchServePredictor,
)
from chipscale.sources import read_tiles  # noqa: E402
from chipscale.sources.footprint import cover  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default=str(ROOT / "examples" / "rasterio_cogeo.tif"))
    parser.add_argument("--zoom", type=int, default=21)
    parser.add_argument("--tiles", type=int, default=512)
    parser.add_argument("--sizes", default="8,16,32,64")
    parser.add_argument("--in-flight", default="2,4,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4, help="TorchServe batchSize")
    parser.add_argument("--max-batch-delay", type=int, default=5, help="milliseconds")
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()

    tiles = list(cover(args.zoom, source=args.source))[: args.tiles]
    images = dict(read_tiles(args.source, tiles, size=256))
    packs = [
        np.stack([images[t].data for t in pack]) for pack in pack_tiles(tiles, 100, presorted=False)
    ]
    sizes = [int(x) for x in args.sizes.split(",")]
    flights = [int(x) for x in args.in_flight.split(",")]
    shapes = [(s, c) for s in sizes for c in flights]
    local = open_predictor(None, threads=1)
    config = ServingConfig(
        batch_size=args.batch_size,
        max_batch_delay_ms=args.max_batch_delay,
        workers=1,
        sub_batch=64,
        threads=1,
    )
    rates: dict[str, list[float]] = {f"{s}x{c}": [] for s, c in shapes}
    rates["in_process"] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        mar = package_model(demo_model_path(), Path(tmp) / "mar", config=config, force=True)
        server = TorchServe.on_free_ports(mar, Path(tmp) / "ts")
        server.start()
        try:
            clients = {
                f"{s}x{c}": TorchServePredictor(
                    server.predictions_url, tiles_per_request=s, concurrency=c
                )
                for s, c in shapes
            }
            for client in clients.values():  # warm-up: connections, the worker's first call
                client.predict(packs[0])
            for r in range(args.rounds):
                order = list(clients.items())
                order = order[r % len(order) :] + order[: r % len(order)]
                start = time.perf_counter()
                for pack in packs:
                    local.predict(pack)
                rates["in_process"].append(len(tiles) / (time.perf_counter() - start))
                for name, client in order:
                    start = time.perf_counter()
                    for pack in packs:
                        client.predict(pack)
                    rates[name].append(len(tiles) / (time.perf_counter() - start))
            for client in clients.values():
                client.close()
        finally:
            server.stop()
    median = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    best = max((k for k in median if k != "in_process"), key=median.__getitem__)
    default = f"{DEFAULT_TILES_PER_REQUEST}x{DEFAULT_CONCURRENCY}"
    report = {
        "benchmark": "request_shape",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "tiles_per_second_median": median,
        "table": {s: {c: median[f"{s}x{c}"] for c in flights} for s in sizes},
        "best": best,
        "default": default,
        "ratio_default_to_best": round(median[default] / median[best], 3)
        if default in median
        else None,
        "runs": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "conditions": {
            "model": "demo model (examples/demo-model.pt)",
            "tiles": len(tiles),
            "pack": "100 tiles, 3x256x256 uint8, real aerial (rasterio_cogeo.tif)",
            "torchserve": {"workers": 1, **config.settings()},
            "client": "chipscale.models.torchserve_client.TorchServePredictor",
            "rounds": args.rounds,
            "order": "in_process, then the shapes rotated by one each round",
            "cpus": os.cpu_count(),
            "load_average_1_5_15_before": [round(x, 2) for x in load_before],
            "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
