"""What the GPU bench reads off the device: utilisation sampled in a thread, memory per GPU,
which process runs on which GPU, and device-side timing (CUDA events, else the wall clock).

Needs only torch (pynvml or ``nvidia-smi`` when present): runs on a bare Deep Learning AMI.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch


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
            uuid = gpu_uuid(device)
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
            f"--id={gpu_uuid(device)}",
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
    def sampling(self) -> Iterator[list[tuple[float, float]]]:
        """Sample while the block runs (nothing on a CPU); yields this block's samples."""
        self.samples = []
        if self._query is None:
            yield self.samples
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        try:
            yield self.samples
        finally:
            self._stop.set()
            self._thread.join()

    def busy_fraction(self, samples: list[tuple[float, float]]) -> float | None:
        """Mean utilisation as a fraction (NVML's "a kernel ran" share), None on a CPU."""
        if not samples:
            return None
        return round(statistics.mean(s[0] for s in samples) / 100, 3)


def gpu_uuid(device: torch.device) -> str:
    """The GPU's UUID as nvidia-smi and NVML name it (indices differ under
    CUDA_VISIBLE_DEVICES), or its index when torch does not expose the UUID."""
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
    except Exception:
        return str(device.index or 0)
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def summarise_gpu(samples: list[tuple[float, float]], source: str) -> dict[str, Any] | None:
    """Utilisation and memory of a sampled block; None on a CPU."""
    if not samples:
        return None
    return {
        "utilisation_mean_pct": round(statistics.mean(s[0] for s in samples), 1),
        "utilisation_min_pct": min(s[0] for s in samples),
        "memory_used_max_mib": max(s[1] for s in samples),
        "samples": len(samples),
        "source": source,
    }


def _smi_csv(query: str, what: str) -> list[list[str]] | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    done = subprocess.run(
        [smi, f"--query-{what}={query}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return None
    return [[v.strip() for v in line.split(",")] for line in done.stdout.splitlines() if line]


def gpu_memory() -> list[dict[str, Any]] | None:
    """Memory used on every GPU of the host (nvidia-smi), None where there is none."""
    rows = _smi_csv("index,uuid,name,memory.used,memory.total", "gpu")
    if not rows:
        return None
    return [
        {"index": int(i), "uuid": u, "name": n, "used_mib": float(m), "total_mib": float(t)}
        for i, u, n, m, t in rows
    ]


def compute_apps() -> dict[int, dict[str, Any]] | None:
    """pid -> the GPU (UUID) it holds a context on and its memory, None without nvidia-smi."""
    rows = _smi_csv("pid,gpu_uuid,used_memory", "compute-apps")
    if rows is None:
        return None
    apps: dict[int, dict[str, Any]] = {}
    for pid, uuid, used in rows:
        with contextlib.suppress(ValueError):
            apps[int(pid)] = {"gpu_uuid": uuid, "used_mib": float(used)}
    return apps


def seconds_per_call(
    device: torch.device, fn: Callable[[], Any], iterations: int, warmup: int = 3
) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls: CUDA events around ``iterations``
    calls on a GPU (the device's own clock, no host sync per call), perf_counter on a CPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1000 / iterations
    begin = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - begin) / iterations


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_per_call(fn: Callable[[], Any], iterations: int) -> float:
    """Median wall seconds of ``iterations`` calls (one call per sample)."""
    times = []
    for _ in range(iterations):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)
