"""The GPU bench: what a GPU host loses between the model's raw speed and served tiles;
prints JSON (and writes it to bench/results/).

One prepared run (under 10 minutes on a GPU; a smoke run of a few minutes on a CPU) prints
every figure docs/design.md §9.3 "The GPU bench" names, by section:

* ``paths``: raw model, ``ModelRuntime.predict`` and the handler driven in-process, alternated
  in rounds: the goal is handler >= 0.9 x raw at the same precision;
* ``precision``: raw tiles/s at each batch for fp32, TF32 off, fp16 + channels_last +
  cudnn.benchmark, bf16, and compiled, timed with CUDA events, with the largest score drift;
* ``handler_stages``: ms per handler call by stage (decode, concatenate, pageable vs pinned
  copy, forward, copy back, JSON) and kernel time over wall time;
* ``torchserve``: tiles/s at 1 and 2 workers per GPU at production defaults, the batch-size
  histogram, p50/p99 latency, CPU ms per tile of the JVM, the worker and the client;
* ``feed``: emulated workers reading then predicting packs, 4/8/16/32 per GPU, GPU busy;
* ``network``: bytes per tile (raw, zstd, LZ4) and Gbps at each measured rate;
* ``placement``: each worker's device and the memory used on every GPU;
* ``dtypes``: 4-band uint16 against uint8 RGB through the handler.

A figure that needs a GPU is null on a CPU and its path is listed in ``needs_gpu``. The
in-process sections need only torch, numpy and ``model_server/`` + ``bench/`` (a bare Deep
Learning AMI); TorchServe, feed and placement need chipscale, torchserve and Java, and say
why they were skipped otherwise.

Usage on a GPU host: ``python bench/gpu_serving.py``. Smoke run (automatic without CUDA):
``python bench/gpu_serving.py --smoke``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
# The handler imports its runtime as TorchServe ships it: a top-level module of the model dir.
sys.path.insert(0, str(ROOT / "model_server"))

import chipscale_runtime as rt  # noqa: E402
import gpu_sections as sections  # noqa: E402
import gpu_torchserve  # noqa: E402
import resnet_model  # noqa: E402
from chipscale_metadata import ModelMetadata, Scaling  # noqa: E402
from gpu_probe import GpuSampler, summarise_gpu, sync  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "gpu_serving.json"
GOALS = {
    "handler_over_raw_same_precision": 0.9,
    "handler_over_raw_at_serving_precision": 0.9,
    "gpu_busy_fraction_at_default_feed": 0.9,
    "fp16_over_fp32_on_a10g_l4_class": 2.0,
}
SECTIONS = (
    "paths",
    "precision",
    "handler_stages",
    "torchserve",
    "feed",
    "network",
    "placement",
    "dtypes",
)
#: Workers per GPU the feed section tries, besides the stack's default (Little's law).
FEED_LEVELS = (4, 8, 16, 32)


def default_feed() -> tuple[int, float | None]:
    """The stack's default workers per GPU and its read seconds per tile
    (``chipscale.ops.feed.MEASURED``), or 4 and None where chipscale is absent."""
    try:
        from chipscale.ops import feed

        return feed.MEASURED.per_gpu_concurrency(), feed.MEASURED.read_s
    except Exception:
        return 4, None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cpu")
    parser.add_argument("--smoke", "--quick", action="store_true", help="small and short")
    parser.add_argument("--model", default=None, help="a chipscale model file (default: ResNet)")
    parser.add_argument("--width", type=int, default=None, help="ResNet width (GPU 64)")
    parser.add_argument("--sub-batch", type=int, default=None, help="tiles per forward")
    parser.add_argument("--tiles-per-request", type=int, default=None, help="client default 8")
    parser.add_argument("--requests-per-batch", type=int, default=None, help="batchSize")
    parser.add_argument("--tiles", type=int, default=None, help="tiles per pass")
    parser.add_argument("--seconds", type=float, default=None, help="per measurement")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batches", default=None, help="precision batches, e.g. 16,32,64,128")
    parser.add_argument("--iterations", type=int, default=None, help="forwards per timing")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-torchserve", action="store_true")
    parser.add_argument("--pack", type=int, default=None, help="tiles per emulated pack")
    parser.add_argument("--read-ms", type=float, default=None, help="emulated read per pack")
    parser.add_argument("--feed-seconds", type=float, default=None, help="per feed level")
    parser.add_argument("--out", default=None, help="JSON file ('' for none)")
    args = parser.parse_args(argv)
    args.gpu = rt.resolve_device(args.device).type == "cuda"
    if not args.gpu:
        args.smoke = True  # without CUDA the bench is always a smoke run
    from chipscale_handler import DEFAULT_SUB_BATCH

    smoke = args.smoke
    defaults: dict[str, Any] = {
        # GPU: ResNet-18's own width at the production request shape (8 tiles a request,
        # 8 requests a TorchServe batch, forwards of 64). Smoke: a tiny net, seconds each.
        "width": 8 if smoke else 64,
        "sub_batch": 8 if smoke else max(DEFAULT_SUB_BATCH, 64),
        "tiles_per_request": 4 if smoke else 8,
        "requests_per_batch": 2 if smoke else 8,
        "tiles": 32 if smoke else 1024,
        "seconds": 1.0 if smoke else 4.0,
        "rounds": 2 if smoke else 3,
        "batches": "2,4" if smoke else "16,32,64,128",
        "iterations": 2 if smoke else 20,
        "pack": 4 if smoke else 100,
        # A pack's read: the feed model's measured read per tile, else 100 tiles at about
        # 700 tiles/s per worker (docs/design.md 9.1): 143 ms.
        "read_ms": 20.0 if smoke else 100 * 1000 * (default_feed()[1] or 0.00143),
        "feed_seconds": 1.5 if smoke else 15.0,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.batches = tuple(int(b) for b in str(args.batches).split(","))
    if args.out is None:
        name = "gpu_serving_smoke.json" if args.gpu else "gpu_serving_cpu_smoke.json"
        args.out = str(RESULTS.with_name(name) if smoke else RESULTS)
    return args


def four_band_model(path: Path, width: int) -> Path:
    """The benchmark ResNet taking 4-band uint16 tiles (scaled by 1/65535)."""
    meta = resnet_model.metadata(width)
    four = ModelMetadata.from_dict(
        {
            **meta.to_dict(),
            "bands": 4,
            "band_counts": [4],
            "scaling": Scaling.divided_by(65535).to_dict(),
        }
    )
    network = resnet_model.build_resnet(width, bands=4)
    return rt.save_torchscript(network, path, four, method="script")


class Clock:
    """Seconds each section took (the run must stay under 10 minutes on a GPU)."""

    def __init__(self) -> None:
        self.begin = time.perf_counter()
        self.sections: dict[str, float] = {}

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        begin = time.perf_counter()
        print(f"gpu_serving: {name}...", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            self.sections[name] = round(time.perf_counter() - begin, 1)


def paths(
    runs: dict[str, Callable[[], int]], args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """Alternating rounds (order rotating), medians: raw, runtime, handler tiles/s."""
    for run in runs.values():  # warm-up: lazy init, TorchScript profiling runs, cuDNN
        for _ in range(3):
            run()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            done = 0
            sync(device)
            begin = time.perf_counter()
            while time.perf_counter() - begin < args.seconds:
                done += runs[name]()
            sync(device)
            rates[name].append(done / (time.perf_counter() - begin))
    median = {name: statistics.median(v) for name, v in rates.items()}
    return {
        "tiles_per_s": {name: round(v, 1) for name, v in median.items()},
        "ratio_to_raw": {n: round(v / median["raw"], 3) for n, v in median.items() if n != "raw"},
        "runs": {name: [round(v, 1) for v in values] for name, values in rates.items()},
        "precision": "fp32 (the model file's own; torch's default TF32 flags)",
    }


def at_serving_precision(
    model_file: Path, work: Path, tiles: np.ndarray, args: argparse.Namespace, kw: dict[str, int]
) -> dict[str, Any]:
    """Raw model against the handler at the serving precision the runtime applies from the
    model file's ``inference`` metadata (fp16 + channels_last + cudnn.benchmark on a GPU,
    bf16 + channels_last on a CPU): the handler goal holds at the same precision."""
    device = rt.resolve_device(args.device)
    low = "fp16" if args.gpu else "bf16"
    settings = rt.InferenceSettings(precision=low, channels_last=True, cudnn_benchmark=args.gpu)
    meta = rt.read_metadata(model_file)
    low_meta = ModelMetadata.from_dict({**meta.to_dict(), "inference": settings.to_dict()})
    low_file = rt.rewrite_metadata(model_file, work / f"bench-{low}.pt", low_meta)
    gpu_id = (device.index or 0) if args.gpu else None
    driver = sections.HandlerDriver(low_file, gpu_id, tiles, **kw)
    runtime = driver.runtime
    x = runtime.preprocess(tiles[: args.sub_batch])
    forwards = max(1, len(tiles) // args.sub_batch)
    dtype = torch.float16 if low == "fp16" else torch.bfloat16

    def raw() -> int:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype):
            for _ in range(forwards):
                runtime.module(x)
        sync(device)
        return forwards * len(x)

    measured = paths({"raw": raw, "handler": driver.one_pass}, args, device)
    measured["precision"] = f"{low} via the model file's inference metadata"
    measured["runtime_settings"] = runtime.settings()
    return measured


def served(
    model_file: Path, work: Path, tiles: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    """The TorchServe, placement and feed sections, or why they were skipped."""
    skipped = "--no-torchserve" if args.no_torchserve else gpu_torchserve.unavailable()
    if skipped is not None:
        return {key: {"skipped": skipped} for key in ("torchserve", "placement", "feed")}
    device = rt.resolve_device(args.device)
    sampler = GpuSampler(device)
    gpus = torch.cuda.device_count() if args.gpu else 1
    overrides = {} if not args.smoke else {"sub_batch": args.sub_batch}
    out: dict[str, Any] = {"torchserve": {}, "placement": {}, "feed": {}}
    try:
        with gpu_torchserve.started(model_file, work, overrides) as (server, settings):
            batch = settings["batchSize"]
            tpr = args.tiles_per_request
            by_workers: dict[str, Any] = {}
            for per_gpu in (1, 2):
                workers = per_gpu * gpus
                if server.workers() and len(server.workers()) != workers:
                    gpu_torchserve.scale_workers(server, workers)
                concurrency = 2 * batch * workers  # one TorchServe batch running, one queued
                seconds = 3.0 if args.smoke else 20.0
                by_workers[str(per_gpu)] = gpu_torchserve.measure(
                    server, tiles, tpr, concurrency, seconds, sampler
                )
                if per_gpu == 2:
                    out["placement"] = gpu_torchserve.placement(server, args.gpu)
            one, two = by_workers["1"]["tiles_per_s"], by_workers["2"]["tiles_per_s"]
            out["torchserve"] = {
                "by_workers_per_gpu": by_workers,
                "two_over_one_worker": round(two / one, 3) if one else None,
                "feed_model_inputs": feed_model_inputs(by_workers["1"], gpus),
                "gpus": gpus,
                "settings": {**settings, "workers": "1 and 2 per GPU (scaled by the API)"},
            }
            scale_back = gpus if not args.smoke else 1
            gpu_torchserve.scale_workers(server, scale_back)
            with contextlib.suppress(Exception):
                from chipscale.models import torchserve_client as tc

                out["feed"]["client_defaults"] = {
                    "tiles_per_request": tc.DEFAULT_TILES_PER_REQUEST,
                    "concurrency": tc.DEFAULT_CONCURRENCY,
                }
            default = default_feed()[0]
            out["feed"]["default_workers_per_gpu"] = default
            out["feed"].update(
                gpu_torchserve.feed(
                    server.predictions_url,
                    tiles,
                    levels=tuple(sorted({*FEED_LEVELS, default})),
                    gpus=gpus,
                    pack=args.pack,
                    read_s=args.read_ms / 1000,
                    seconds=args.feed_seconds,
                    sampler=sampler,
                )
            )
            out["feed"]["torchserve_workers_per_gpu"] = 1
    except Exception as exc:  # a host without a working TorchServe still gets the rest
        reason = f"TorchServe failed: {type(exc).__name__}: {str(exc)[:400]}"
        for name in out:
            out[name] = out[name] or {"skipped": reason}
    return out


def feed_model_inputs(one_worker: dict[str, Any], gpus: int) -> dict[str, Any]:
    """What ``chipscale.ops.feed.MEASURED`` assumes, as measured here with one worker per GPU
    (update it from a GPU run): GPU tiles/s and the handler's CPU per request."""
    from chipscale.ops import feed

    rate = one_worker["tiles_per_s"] / gpus
    tpr = one_worker["tiles_per_request"]
    handler_cpu_s = one_worker["cpu_ms_per_tile"]["worker"] * tpr / 1000
    gpu_s = tpr / rate if rate else 0.0
    return {
        "gpu_tiles_per_s": round(rate, 1),
        "handler_cpu_s_per_request_upper_bound": round(handler_cpu_s, 5),
        "workers_per_gpu_from_feed_model": feed.workers_per_gpu(handler_cpu_s, gpu_s)
        if gpu_s
        else None,
        "assumed_in_chipscale_ops_feed": {
            "gpu_tiles_per_s": feed.MEASURED.gpu_tiles_per_s,
            "handler_cpu_s_per_request": feed.MEASURED.handler_cpu_s_per_request,
        },
        "note": "the worker's CPU includes the forward's launch work (all of it on a CPU)",
    }


def network(
    payloads: dict[str, Any], torchserve: dict[str, Any], feed: dict[str, Any]
) -> dict[str, Any]:
    """Bytes per tile, and the Gbps each measured rate puts on the wire (request + answer)."""
    per_tile = payloads["uint8_rgb"]
    wire = per_tile["request_bytes_per_tile"] + per_tile["answer_bytes_per_tile"]
    rates: dict[str, float] = {}
    for workers, run in (torchserve.get("by_workers_per_gpu") or {}).items():
        rates[f"torchserve_{workers}_workers_per_gpu"] = run["tiles_per_s"]
    for level, run in (feed.get("by_workers_per_gpu") or {}).items():
        rates[f"feed_{level}_per_gpu"] = run["tiles_per_s"]
    return {
        "payloads": payloads,
        "gbps_at_each_rate_uint8_rgb": {
            name: {"tiles_per_s": r, "gbps": round(r * wire * 8 / 1e9, 4)}
            for name, r in rates.items()
        },
        "tiles_per_s_at_1_gbps_uint8_rgb": round(1e9 / 8 / wire, 1),
        "note": "random pixels compress worst: real imagery compresses better",
    }


def null_paths(value: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the null figures in ``value`` (list items by index)."""
    if value is None:
        return [prefix]
    if isinstance(value, dict):
        items: list[tuple[Any, Any]] = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    else:
        return []
    return [p for k, v in items for p in null_paths(v, f"{prefix}.{k}" if prefix else str(k))]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = rt.resolve_device(args.device)
    gpu_id = (device.index or 0) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rt.set_threads(1 if device.type == "cpu" else None)
    load_before = os.getloadavg()
    clock = Clock()
    result: dict[str, Any] = {"benchmark": "gpu_serving", "device": _device_name(device)}
    with tempfile.TemporaryDirectory(prefix="chipscale-bench-gpu-") as tmp:
        work = Path(tmp)
        eager: torch.nn.Module | None = None
        if args.model:
            model_file = Path(args.model).resolve()
            model_desc: dict[str, Any] = {"file": str(model_file)}
        else:
            model_file = resnet_model.save_resnet(work / "bench-resnet.pt", args.width)
            eager = resnet_model.build_resnet(args.width)
            model_desc = {
                "file": "bench/resnet_model.py (TorchScript, untrained, seed 0)",
                "width": args.width,
                "parameters": resnet_model.parameter_count(eager),
                "gflops_per_tile": round(resnet_model.gflops_per_tile(eager), 3),
            }
        kw = {
            "sub_batch": args.sub_batch,
            "tiles_per_request": args.tiles_per_request,
            "requests_per_call": args.requests_per_batch,
        }
        rng = np.random.default_rng(0)
        driver = sections.HandlerDriver(model_file, gpu_id, _tiles(rng, model_file, args), **kw)
        runtime = driver.runtime
        tiles = _tiles(rng, model_file, args)
        module = runtime.module
        x = runtime.preprocess(tiles[: args.sub_batch])
        forwards = max(1, args.tiles // args.sub_batch)

        def raw() -> int:
            with torch.inference_mode():
                for _ in range(forwards):
                    module(x)
            sync(device)
            return forwards * len(x)

        def runtime_path() -> int:
            for i in range(0, len(tiles), args.sub_batch):
                runtime.predict(tiles[i : i + args.sub_batch])
            return len(tiles)

        runs = {"raw": raw, "runtime": runtime_path, "handler": driver.one_pass}
        sampler = GpuSampler(device)
        with clock.section("paths"), sampler.sampling() as samples:
            result["paths"] = paths(runs, args, device)
        result["paths"]["gpu"] = summarise_gpu(samples, sampler.source)
        with clock.section("paths at the serving precision"):
            try:
                low = at_serving_precision(model_file, work, tiles, args, kw)
            except Exception as exc:  # e.g. a model file the settings do not fit
                low = {"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
            result["paths"]["at_serving_precision"] = low
        with clock.section("precision"):
            result["precision"] = sections.precision(
                eager if eager is not None else module,
                device,
                args.batches,
                args.iterations,
                compile_allowed=not args.no_compile,
                eager=eager is not None,
            )
        with clock.section("handler_stages"):
            result["handler_stages"] = sections.handler_stages(driver, device, 9)
        with clock.section("dtypes"):
            four = four_band_model(work / "bench-resnet-4band.pt", args.width)
            n16 = min(args.tiles, 256)
            u16 = rng.integers(0, 2**16, (n16, 4, 256, 256), dtype=np.uint16)
            drivers = {
                "uint8_rgb": driver,
                "uint16_4band": sections.HandlerDriver(four, gpu_id, u16, **kw),
            }
            result["dtypes"] = sections.dtype_rates(drivers, args.seconds * 2)
            payloads = {
                name: sections.payload(
                    (tiles if name == "uint8_rgb" else u16),
                    args.tiles_per_request,
                    d.call(d.calls[0][:1])[0],
                )
                for name, d in drivers.items()
            }
        with clock.section("torchserve, placement, feed"):
            result.update(served(model_file, work, tiles, args))
        result["network"] = network(payloads, result["torchserve"], result["feed"])
    result["goals"] = _goals(result)
    ordered = {k: result[k] for k in ("benchmark", "device", "goals")}
    ordered.update({k: result[k] for k in SECTIONS})
    nulls = [p for k in SECTIONS for p in null_paths(result[k], k)]
    ordered["needs_gpu"] = nulls if not args.gpu else []
    if args.gpu and nulls:
        ordered["not_measured_on_gpu"] = nulls
    ordered["smoke"] = args.smoke
    ordered["conditions"] = {
        "model": model_desc,
        "sub_batch": args.sub_batch,
        "tiles_per_request": args.tiles_per_request,
        "requests_per_handler_call": args.requests_per_batch,
        "tiles_per_pass": args.tiles,
        "seconds_per_measurement": args.seconds,
        "rounds": args.rounds,
        "precision_batches": list(args.batches),
        "iterations_per_timing": args.iterations,
        "timing": "CUDA events" if args.gpu else "time.perf_counter (no CUDA)",
        "feed": {"pack": args.pack, "read_ms": args.read_ms, "seconds": args.feed_seconds},
        "section_seconds": clock.sections,
        "total_seconds": round(time.perf_counter() - clock.begin, 1),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "numpy": np.__version__,
        "load_average_1_5_15": {
            "before": [round(v, 2) for v in load_before],
            "after": [round(v, 2) for v in os.getloadavg()],
        },
    }
    text = json.dumps(ordered, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return ordered


def _tiles(rng: np.random.Generator, model_file: Path, args: argparse.Namespace) -> np.ndarray:
    meta = rt.read_metadata(model_file)
    shape = (args.tiles, meta.bands, meta.tile_size, meta.tile_size)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _goals(result: dict[str, Any]) -> dict[str, Any]:
    """Each goal with the figure that answers it (null where it needs a GPU)."""
    ratio = result["paths"]["ratio_to_raw"].get("handler")
    low = result["paths"]["at_serving_precision"].get("ratio_to_raw", {}).get("handler")
    feed = result["feed"].get("by_workers_per_gpu") or {}
    default = result["feed"].get("default_workers_per_gpu")
    busy = feed.get(str(default), {}).get("gpu_busy_fraction")
    fp16 = result["precision"]["fp16_channels_last"].get("ratio_to_fp32")
    fp16_ratio = max((v for v in fp16.values() if v is not None), default=None) if fp16 else None
    figures = {
        "handler_over_raw_same_precision": ratio,
        "handler_over_raw_at_serving_precision": low,
        "gpu_busy_fraction_at_default_feed": busy,
        "fp16_over_fp32_on_a10g_l4_class": fp16_ratio,
    }
    return {
        name: {"goal": GOALS[name], "measured": v, "met": None if v is None else v >= GOALS[name]}
        for name, v in figures.items()
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
