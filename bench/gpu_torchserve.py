"""TorchServe sections of the GPU bench: throughput at 1 and 2 workers per GPU, batch-size
histogram, latency, CPU per tile by process; placement of the workers; the feed of emulated
workers that read then predict packs. Needs chipscale (and Java); the bench says why when not.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.metadata
import json
import shutil
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import urllib3
from gpu_probe import GpuSampler, compute_apps, gpu_memory, summarise_gpu
from gpu_sections import npy


def unavailable() -> str | None:
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
def started(
    model_file: Path, work: Path, overrides: dict[str, int]
) -> Iterator[tuple[Any, dict[str, int]]]:
    """A TorchServe serving ``model_file`` at ServingConfig's defaults (production) but for
    ``overrides``."""
    from chipscale.models.serving import ServingConfig, TorchServe, package_model

    config = ServingConfig(**overrides)
    mar = package_model(model_file, work / "mar", config=config, force=True)
    server = TorchServe.on_free_ports(mar, work / "torchserve")
    server.start()
    try:
        yield server, config.settings()
    finally:
        server.stop()


def scale_workers(server: Any, workers: int) -> None:
    """Set the model's worker count through the management API and wait until READY."""
    url = (
        f"{server.management_url}/models/{server.model_name}"
        f"?min_worker={workers}&max_worker={workers}&synchronous=true"
    )
    request = urllib.request.Request(url, method="PUT")
    with urllib.request.urlopen(request, timeout=180) as answer:
        answer.read()
    deadline = time.monotonic() + 180
    while len(server.workers()) != workers and time.monotonic() < deadline:
        time.sleep(0.25)
    server.wait_ready()


class LoadClient:
    """``concurrency`` threads posting .npy bodies over keep-alive connections for a while:
    the production request shape, instrumented (latency, the answer's ``batch`` field)."""

    def __init__(self, url: str, bodies: list[bytes], tiles_per_body: int, concurrency: int):
        self.url, self.bodies, self.tiles_per_body = url, bodies, tiles_per_body
        self.concurrency = concurrency
        self._pool = urllib3.PoolManager(maxsize=concurrency, block=True)

    def run(self, seconds: float) -> dict[str, Any]:
        latencies: list[float] = []
        batches: list[tuple[int, int]] = []
        stop = time.monotonic() + seconds
        lock = threading.Lock()

        def loop(k: int) -> None:
            i = k
            while time.monotonic() < stop:
                begin = time.perf_counter()
                answer = self._pool.request(
                    "POST",
                    self.url,
                    body=self.bodies[i % len(self.bodies)],
                    headers={"Content-Type": "application/octet-stream"},
                    timeout=urllib3.Timeout(connect=5, read=600),
                    retries=False,
                )
                elapsed = time.perf_counter() - begin
                if answer.status != 200:
                    raise RuntimeError(
                        f"TorchServe answered {answer.status}: {answer.data[:200]!r}"
                    )
                batch = json.loads(answer.data)["batch"]
                with lock:
                    latencies.append(elapsed)
                    batches.append((batch["requests"], batch["tiles"]))
                i += self.concurrency

        begin = time.perf_counter()
        threads = [threading.Thread(target=loop, args=(k,)) for k in range(self.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - begin
        ordered = sorted(latencies)
        return {
            "tiles": len(latencies) * self.tiles_per_body,
            "tiles_per_s": round(len(latencies) * self.tiles_per_body / wall, 1),
            "latency_ms": {
                "p50": round(ordered[len(ordered) // 2] * 1000, 1) if ordered else None,
                "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 1)
                if ordered
                else None,
            },
            "batch_histogram": {
                "requests_per_call": _histogram(b[0] for b in batches),
                "tiles_per_call": _histogram(b[1] for b in batches),
                "note": "per request answered: how many requests/tiles shared its handler call",
            },
        }


def _histogram(values: Any) -> dict[str, int]:
    counts = collections.Counter(values)
    return {str(k): counts[k] for k in sorted(counts)}


def measure(
    server: Any,
    tiles: np.ndarray,
    tiles_per_request: int,
    concurrency: int,
    seconds: float,
    sampler: GpuSampler,
) -> dict[str, Any]:
    """One load run: tiles/s, latency, batch sizes, CPU ms per tile by process, GPU use."""
    from serving import cpu_seconds

    step = tiles_per_request
    bodies = [npy(tiles[i : i + step]) for i in range(0, len(tiles) - step + 1, step)]
    client = LoadClient(server.predictions_url, bodies, step, concurrency)
    client.run(min(2.0, seconds))  # warm-up: connections, cuDNN, the batcher
    group = server.process.pid  # started in its own session: pid = process group
    before = cpu_seconds(group)
    with sampler.sampling() as samples:
        result = client.run(seconds)
    after = cpu_seconds(group)
    n = max(1, result["tiles"])
    parts = {"jvm": "frontend", "worker": "worker", "client": "this_process"}
    result["cpu_ms_per_tile"] = {
        name: round((after[key] - before[key]) / n * 1000, 3) for name, key in parts.items()
    }
    result["gpu"] = summarise_gpu(samples, sampler.source)
    result["gpu_busy_fraction"] = sampler.busy_fraction(samples)
    result["concurrency"] = concurrency
    result["tiles_per_request"] = tiles_per_request
    return result


def placement(server: Any, gpu: bool) -> dict[str, Any]:
    """Each worker's device (the management API, the metadata answer, nvidia-smi) and the
    memory used on every GPU."""
    apps = compute_apps() if gpu else None
    workers = []
    for w in server.workers():
        pid = w.get("pid")
        app = (apps or {}).get(int(pid)) if pid is not None else None
        workers.append(
            {
                "pid": pid,
                "status": w.get("status"),
                "torchserve_gpu": w.get("gpu"),
                "gpu_uuid": app["gpu_uuid"] if app else None,
                "gpu_memory_mib": app["used_mib"] if app else None,
            }
        )
    answered: dict[str, dict[str, Any]] = {}
    pool = urllib3.PoolManager()
    for _ in range(4 * max(1, len(workers))):  # the answer comes from any worker
        answer = pool.request(
            "POST",
            server.predictions_url,
            body=b"",
            headers={"Content-Type": "application/octet-stream"},
        )
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            worker = json.loads(answer.data).get("worker") or {}
            keys = ("pid", "device", "precision", "channels_last", "gpu_host")
            answered[str(worker.get("pid"))] = {k: worker.get(k, "absent") for k in keys}
    return {
        "workers": workers,
        "metadata_answer_workers": list(answered.values()),
        "gpus": gpu_memory() if gpu else None,
    }


def _feed_level(
    url: str,
    packs: list[np.ndarray],
    workers: int,
    read_s: float,
    seconds: float,
    sampler: GpuSampler,
) -> dict[str, Any]:
    """``workers`` emulated workers for ``seconds``: tiles/s, predict share, GPU busy."""
    from chipscale.models.torchserve_client import TorchServePredictor

    clients = [TorchServePredictor(url) for _ in range(workers)]
    done = [0] * workers
    predicting = [0.0] * workers
    errors: list[str] = []
    stop = time.monotonic() + seconds

    def work(k: int) -> None:
        i = k
        try:
            while time.monotonic() < stop:
                time.sleep(read_s)
                begin = time.perf_counter()
                clients[k].predict(packs[i % len(packs)])
                predicting[k] += time.perf_counter() - begin
                done[k] += len(packs[i % len(packs)])
                i += 1
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")

    begin = time.perf_counter()
    with sampler.sampling() as samples:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - begin
    for c in clients:
        c.close()
    if errors:
        raise RuntimeError(f"{len(errors)} emulated workers failed, first: {errors[0]}")
    return {
        "workers": workers,
        "tiles_per_s": round(sum(done) / wall, 1),
        "predict_share_of_worker_time": round(sum(predicting) / (wall * workers), 3),
        "gpu_busy_fraction": sampler.busy_fraction(samples),
        "packs": sum(done) // len(packs[0]),
    }


def feed(
    url: str,
    tiles: np.ndarray,
    *,
    levels: tuple[int, ...],
    gpus: int,
    pack: int,
    read_s: float,
    seconds: float,
    sampler: GpuSampler,
) -> dict[str, Any]:
    """Emulated workers (each: read a pack, ``read_s`` asleep, then predict it through the
    production client at its defaults) at each level of workers per GPU."""
    packs = [tiles[i : i + pack] for i in range(0, len(tiles) - pack + 1, pack)] or [tiles]
    out: dict[str, Any] = {}
    for per_gpu in levels:
        out[str(per_gpu)] = _feed_level(url, packs, per_gpu * gpus, read_s, seconds, sampler)
    return {
        "by_workers_per_gpu": out,
        "pack_tiles": pack,
        "read_s_per_pack": read_s,
        "client": "chipscale.models.torchserve_client.TorchServePredictor at its defaults",
        "note": "tiles/s and GPU busy against workers per GPU; the read is a sleep of "
        "read_s_per_pack (measured reads: docs/design.md 9.1)",
        "busy_at_best": max(
            (v["gpu_busy_fraction"] for v in out.values() if v["gpu_busy_fraction"] is not None),
            default=None,
        ),
        "median_tiles_per_s": round(statistics.median(v["tiles_per_s"] for v in out.values()), 1),
    }
