"""Serving throughput on a GPU host against the model's raw throughput; prints JSON.

Why: a GPU host is paid for by the hour, so what matters is how close serving gets to what
the model alone can do on that GPU, and whether the GPU is kept busy. Goals: the handler's
batch path and TorchServe at least 0.9x raw model throughput, GPU utilisation above 90%.

Paths, measured in alternating rounds (order rotating each round), medians reported:

* ``raw``: the TorchScript module's forward on a float batch already on the device, then
  ``torch.cuda.synchronize()``: the ceiling.
* ``runtime``: ``ModelRuntime.predict`` on a uint8 numpy batch of the same size (host to
  device copy, scaling, sub-batches, scores back to the host): what the handler adds to
  ``raw`` below the wire format.
* ``handler``: ``ChipscaleHandler.handle`` driven in-process as TorchServe drives it, with
  ``.npy`` request bodies (encoded beforehand, as a client would), ``--requests-per-batch``
  requests per call, sub-batching: everything a TorchServe worker does except the socket.
* ``torchserve``: TorchServe itself, started from ``model_server/config.properties``, when
  ``java`` and ``torchserve`` are present and chipscale is installed (skipped with the
  reason otherwise: a GPU host may have neither Java nor a package index).

GPU utilisation and memory are sampled every 0.5 s during each measurement (pynvml when
importable, else ``nvidia-smi``); "n/a" on a CPU. The raw, runtime and handler paths need
only torch, numpy and this repository's ``model_server/`` and ``bench/`` files: no chipscale
import, so the script runs on a bare Deep Learning AMI. Each measurement repeats passes over
``--tiles`` tiles until ``--seconds`` have passed, so rates compare across devices.

Usage on a GPU host: ``python bench/gpu_serving.py`` (CUDA when available). Smoke run on a
CPU: ``python bench/gpu_serving.py --device cpu --quick``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
# The handler imports its runtime as TorchServe ships it: a top-level module of the model dir.
sys.path.insert(0, str(ROOT / "model_server"))

import chipscale_handler  # noqa: E402
import chipscale_runtime as rt  # noqa: E402
import resnet_model  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "gpu_serving.json"
GOAL_RATIO = 0.9
GOAL_GPU_UTILISATION = 90.0


# ------------------------------------------------------------------------- GPU sampling


class GpuSampler:
    """Samples GPU utilisation (%) and memory used (MiB) every ``interval`` seconds in a
    thread: pynvml when importable (cheap), else ``nvidia-smi`` (a process per sample)."""

    def __init__(self, device: torch.device, interval: float = 0.5) -> None:
        self.interval = interval
        self.source = "n/a"
        self._query: Callable[[], tuple[float, float]] | None = None
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if device.type == "cuda":
            self._query = self._nvml(device) or self._smi(device)

    def _nvml(self, device: torch.device) -> Callable[[], tuple[float, float]] | None:
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            uuid = _gpu_uuid(device)
            try:  # nvidia-ml-py takes str; older pynvml releases want bytes
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
            except Exception:
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid.encode())
        except Exception:
            return None
        self.source = "pynvml"

        def query() -> tuple[float, float]:
            util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            return float(util), pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20

        return query

    def _smi(self, device: torch.device) -> Callable[[], tuple[float, float]] | None:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return None
        self.source = "nvidia-smi"
        cmd = [
            smi,
            f"--id={_gpu_uuid(device)}",
            "--query-gpu=utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
        ]

        def query() -> tuple[float, float]:
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            util, memory = out.strip().splitlines()[0].split(",")
            return float(util), float(memory)

        return query

    def _loop(self) -> None:
        assert self._query is not None
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.samples.append(self._query())

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        """Sample while the block runs (nothing on a CPU)."""
        if self._query is None:
            yield
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join()


def _gpu_uuid(device: torch.device) -> str:
    """The GPU's UUID as nvidia-smi and NVML name it (indices differ under
    CUDA_VISIBLE_DEVICES), or its index when torch does not expose the UUID."""
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
    except Exception:
        return str(device.index or 0)
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def summarise_gpu(samples: list[tuple[float, float]], source: str) -> dict[str, Any] | str:
    if not samples:
        return "n/a" if source == "n/a" else f"no samples ({source})"
    return {
        "utilisation_mean_pct": round(statistics.mean(s[0] for s in samples), 1),
        "utilisation_min_pct": min(s[0] for s in samples),
        "memory_used_max_mib": max(s[1] for s in samples),
        "samples": len(samples),
    }


# --------------------------------------------------------------------------------- paths


class _Context:
    """The part of TorchServe's ``Context`` the handler uses; collects response statuses."""

    def __init__(self, model_file: Path, gpu_id: int | None, sub_batch: int, threads: int):
        self.system_properties = {"model_dir": str(model_file.parent), "gpu_id": gpu_id}
        self.manifest = {"model": {"serializedFile": model_file.name}}
        self.model_yaml_config = {"handler": {"sub_batch": sub_batch, "threads": threads}}
        self.statuses: dict[int, tuple[int, str]] = {}

    def set_response_content_type(self, idx: int, value: str) -> None:
        pass

    def set_response_status(self, code: int, phrase: str, idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)


def npy(tiles: np.ndarray) -> bytes:
    body = io.BytesIO()
    np.save(body, tiles, allow_pickle=False)
    return body.getvalue()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def until(seconds: float, one_pass: Callable[[], int], device: torch.device) -> float:
    """Tiles per second of ``one_pass`` repeated until ``seconds`` have passed."""
    done = 0
    sync(device)
    start = time.perf_counter()
    while True:
        done += one_pass()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    sync(device)
    return done / (time.perf_counter() - start)


class StdlibHttpClient:
    """Fallback TorchServe client (stdlib only): .npy bodies, one keep-alive connection per
    thread, ``concurrency`` threads. Used when chipscale.models.torchserve_client is absent."""

    def __init__(self, url: str, tiles_per_request: int, concurrency: int) -> None:
        import http.client
        import urllib.parse

        parsed = urllib.parse.urlsplit(url)
        self._connect = lambda: http.client.HTTPConnection(
            parsed.hostname, parsed.port, timeout=600
        )
        self._path = parsed.path
        self._local = threading.local()
        self.tiles_per_request = tiles_per_request
        self._executor = ThreadPoolExecutor(concurrency)

    def _post(self, body: bytes) -> np.ndarray:
        if not hasattr(self._local, "conn"):
            self._local.conn = self._connect()
        conn = self._local.conn
        conn.request("POST", self._path, body, {"Content-Type": "application/octet-stream"})
        answer = conn.getresponse()
        data = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"TorchServe answered {answer.status}: {data[:300]!r}")
        return np.asarray(json.loads(data)["scores"], dtype=np.float32)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        step = self.tiles_per_request
        bodies = [npy(batch[i : i + step]) for i in range(0, len(batch), step)]
        return np.concatenate(list(self._executor.map(self._post, bodies)))

    def close(self) -> None:
        self._executor.shutdown()


def torchserve_unavailable() -> str | None:
    """Why TorchServe cannot run here, or None when it can."""
    if shutil.which("java") is None:
        return "java not found (TorchServe's frontend needs Java 11+)"
    try:
        importlib.metadata.version("torchserve")
        import chipscale.models.serving  # noqa: F401
    except Exception as exc:
        return f"torchserve or chipscale not importable ({type(exc).__name__}: {exc})"
    return None


@contextlib.contextmanager
def torchserve_client(
    model_file: Path, work: Path, args: argparse.Namespace
) -> Iterator[tuple[Any, str, dict[str, Any]]]:
    """A started TorchServe serving ``model_file`` and a client for it."""
    from chipscale.models.serving import ServingConfig, TorchServe, package_model

    config = ServingConfig(
        batch_size=args.requests_per_batch,
        max_batch_delay_ms=args.max_batch_delay,
        workers=args.workers,
        sub_batch=args.sub_batch,
        threads=args.threads,
    )
    mar = package_model(model_file, work / "mar", config=config, force=True)
    server = TorchServe.on_free_ports(mar, work / "torchserve")
    server.start()
    try:
        try:
            from chipscale.models.torchserve_client import TorchServePredictor

            client: Any = TorchServePredictor(
                server.predictions_url,
                tiles_per_request=args.tiles_per_request,
                concurrency=args.concurrency,
            )
            kind = "TorchServePredictor"
        except ImportError:
            client = StdlibHttpClient(
                server.predictions_url, args.tiles_per_request, args.concurrency
            )
            kind = "stdlib http.client (chipscale.models.torchserve_client absent)"
        settings = {
            "version": importlib.metadata.version("torchserve"),
            "config": "model_server/config.properties",
            **config.settings(),
            "client": kind,
            "tiles_per_request": args.tiles_per_request,
            "concurrency": args.concurrency,
        }
        yield client, kind, settings
        client.close()
    finally:
        server.stop()


# ---------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cpu")
    parser.add_argument("--model", default=None, help="a chipscale model file (default: ResNet)")
    parser.add_argument("--width", type=int, default=None, help="ResNet width (64 GPU, 32 CPU)")
    parser.add_argument("--sub-batch", type=int, default=None, help="tiles per forward")
    parser.add_argument("--tiles-per-request", type=int, default=None)
    parser.add_argument("--requests-per-batch", type=int, default=4, help="TorchServe batchSize")
    parser.add_argument("--max-batch-delay", type=int, default=10, help="milliseconds")
    parser.add_argument("--workers", type=int, default=1, help="TorchServe workers")
    parser.add_argument("--concurrency", type=int, default=None, help="requests in flight")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    parser.add_argument("--tiles", type=int, default=None, help="tiles per pass")
    parser.add_argument("--seconds", type=float, default=None, help="per measurement")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-torchserve", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small and short")
    parser.add_argument("--out", default=str(RESULTS), help="JSON file ('' for none)")
    args = parser.parse_args()
    gpu = rt.resolve_device(args.device).type == "cuda"
    defaults: dict[str, Any] = {
        # GPU: ResNet-18's own width, forwards of 64 tiles, 128 tiles per TorchServe batch.
        # CPU: what bench/serving.py measures. --quick: a few seconds per path.
        "width": 64 if gpu else 32,
        "sub_batch": (16 if args.quick else 64) if gpu else 8,
        "tiles_per_request": (16 if args.quick else 32) if gpu else 8,
        "tiles": (256 if args.quick else 1024) if gpu else (32 if args.quick else 64),
        "seconds": 2.0 if args.quick else 5.0,
        "rounds": 3 if args.quick else 5,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.concurrency is None:  # one TorchServe batch running, one queued
        args.concurrency = 2 * args.requests_per_batch * args.workers
    return args


def main() -> None:
    args = parse_args()
    device = rt.resolve_device(args.device)
    gpu_id = (device.index or 0) if device.type == "cuda" else None
    threads = args.threads if device.type == "cpu" else None
    rt.set_threads(threads)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="chipscale-bench-gpu-") as tmp:
        work = Path(tmp)
        if args.model:
            model_file = Path(args.model).resolve()
            model_desc: dict[str, Any] = {"file": str(model_file)}
        else:
            model_file = resnet_model.save_resnet(work / "bench-resnet.pt", args.width)
            network = resnet_model.build_resnet(args.width)
            model_desc = {
                "file": "bench/resnet_model.py (TorchScript, untrained, seed 0)",
                "width": args.width,
                "parameters": resnet_model.parameter_count(network),
                "gflops_per_tile": round(resnet_model.gflops_per_tile(network), 3),
            }
        runtime = rt.load_model(model_file, device, sub_batch=args.sub_batch, threads=threads)
        meta = runtime.metadata
        shape = (args.tiles, meta.bands, meta.tile_size, meta.tile_size)
        tiles = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        model_desc.update(name=meta.name, version=meta.version, kind=runtime.kind)

        # raw: the module alone on a device-resident, already scaled batch.
        module = rt.load_model(model_file, device, sub_batch=args.sub_batch).module
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

        handler = chipscale_handler.ChipscaleHandler()
        context = _Context(model_file, gpu_id, args.sub_batch, args.threads)
        handler.initialize(context)
        tpr = args.tiles_per_request
        bodies = [npy(tiles[i : i + tpr]) for i in range(0, len(tiles), tpr)]
        per_call = args.requests_per_batch
        calls = [
            [{"body": body} for body in bodies[i : i + per_call]]
            for i in range(0, len(bodies), per_call)
        ]

        def handler_path() -> int:
            for data in calls:
                context.statuses.clear()
                handler.handle(data, context)
                failed = {i: s for i, s in context.statuses.items() if s[0] != 200}
                if failed:
                    raise RuntimeError(f"the handler refused requests: {failed}")
            return len(tiles)

        runs: dict[str, Callable[[], int]] = {
            "raw": raw,
            "runtime": runtime_path,
            "handler": handler_path,
        }
        sampler = GpuSampler(device)
        skipped = "--no-torchserve" if args.no_torchserve else torchserve_unavailable()
        torchserve_settings: dict[str, Any] | None = None
        with contextlib.ExitStack() as stack:
            if skipped is None:
                try:
                    client, _, torchserve_settings = stack.enter_context(
                        torchserve_client(model_file, work, args)
                    )
                    runs["torchserve"] = lambda: len(client.predict(tiles))
                except Exception as exc:  # a GPU host without a working TorchServe
                    skipped = f"TorchServe did not start: {type(exc).__name__}: {exc}"
            for run in runs.values():  # warm-up: lazy init, TorchScript profiling runs, cuDNN
                for _ in range(3 if run is raw else 1):
                    run()
            rates: dict[str, list[float]] = {name: [] for name in runs}
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
            names = list(runs)
            for r in range(args.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    sampler.samples = []
                    with sampler.sampling():
                        rates[name].append(until(args.seconds, runs[name], device))
                    samples[name] += sampler.samples

    median = {name: statistics.median(values) for name, values in rates.items()}
    result: dict[str, Any] = {
        "benchmark": "gpu_serving",
        "device": _device_name(device),
        "quick": args.quick,
        "tiles_per_s": {name: round(v, 2) for name, v in median.items()},
        "ratio_to_raw": {
            name: round(v / median["raw"], 3) for name, v in median.items() if name != "raw"
        },
        "goal_ratio_to_raw": GOAL_RATIO,
        "gpu": {name: summarise_gpu(s, sampler.source) for name, s in samples.items()},
        "goal_gpu_utilisation_pct": GOAL_GPU_UTILISATION,
        "gpu_sampler": sampler.source,
        "torchserve": torchserve_settings or {"skipped": skipped},
        "runs": {name: [round(v, 2) for v in values] for name, values in rates.items()},
        "conditions": {
            "model": model_desc,
            "sub_batch": args.sub_batch,
            "tiles_per_request": args.tiles_per_request,
            "requests_per_handler_call": args.requests_per_batch,
            "tiles_per_pass": args.tiles,
            "seconds_per_measurement": args.seconds,
            "rounds": args.rounds,
            "order": "rotating per round: " + ", ".join(names),
            "torch_threads": torch.get_num_threads(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cuda_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "numpy": np.__version__,
            "load_average_1_5_15": {
                "before": [round(v, 2) for v in load_before],
                "after": [round(v, 2) for v in os.getloadavg()],
            },
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
