"""In-process sections of the GPU bench: precision, handler stages per call, dtypes and the
payload sizes of the network section. Plain torch and numpy plus ``model_server/``: no
chipscale import, so they run on a bare Deep Learning AMI. A figure that needs a GPU is None
on a CPU (the bench lists them under ``needs_gpu``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import chipscale_handler
import numpy as np
import torch
from gpu_probe import seconds_per_call, sync, wall_per_call

MiB = 2**20


def npy(tiles: np.ndarray) -> bytes:
    body = io.BytesIO()
    np.save(body, tiles, allow_pickle=False)
    return body.getvalue()


class Context:
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


class HandlerDriver:
    """A ``ChipscaleHandler`` driven in-process as TorchServe drives it: ``.npy`` bodies of
    ``tiles_per_request`` tiles, ``requests_per_call`` requests per ``handle`` call."""

    def __init__(
        self,
        model_file: Path,
        gpu_id: int | None,
        tiles: np.ndarray,
        *,
        sub_batch: int,
        tiles_per_request: int,
        requests_per_call: int,
        threads: int = 1,
    ) -> None:
        self.handler = chipscale_handler.ChipscaleHandler()
        self.context = Context(model_file, gpu_id, sub_batch, threads)
        self.handler.initialize(self.context)
        step = tiles_per_request
        self.bodies = [npy(tiles[i : i + step]) for i in range(0, len(tiles), step)]
        self.calls = [
            [{"body": b} for b in self.bodies[i : i + requests_per_call]]
            for i in range(0, len(self.bodies), requests_per_call)
        ]
        self.tiles = len(tiles)

    @property
    def runtime(self) -> Any:
        return self.handler.runtime

    def call(self, data: list[dict[str, Any]]) -> list[str]:
        self.context.statuses.clear()
        answers = self.handler.handle(data, self.context)
        failed = {i: s for i, s in self.context.statuses.items() if s[0] != 200}
        if failed:
            raise RuntimeError(f"the handler refused requests: {failed}")
        return answers

    def one_pass(self) -> int:
        for data in self.calls:
            self.call(data)
        return self.tiles


# ------------------------------------------------------------------------------ precision


@contextlib.contextmanager
def backend_flags(*, tf32: bool, benchmark: bool) -> Iterator[dict[str, bool]]:
    """cuDNN/cuBLAS flags for one variant, restored afterwards."""
    saved = (
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TF32 flags' deprecation notice in newer torch
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = benchmark
    try:
        yield {"tf32": tf32, "cudnn_benchmark": benchmark}
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (
                torch.backends.cudnn.allow_tf32,
                torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.benchmark,
            ) = saved


#: name -> (dtype, channels_last, tf32, cudnn.benchmark, compiled, needs a GPU)
VARIANTS: dict[str, tuple[torch.dtype, bool, bool, bool, bool, bool]] = {
    "fp32": (torch.float32, False, True, False, False, False),  # torch's defaults
    "fp32_tf32_off": (torch.float32, False, False, False, False, True),
    "fp16_channels_last": (torch.float16, True, True, True, False, True),
    "bf16_channels_last": (torch.bfloat16, True, True, True, False, False),
    "fp16_channels_last_compiled": (torch.float16, True, True, True, True, True),
}


def precision(
    module: torch.nn.Module,
    device: torch.device,
    batches: tuple[int, ...],
    iterations: int,
    *,
    compile_allowed: bool,
    eager: bool,
) -> dict[str, Any]:
    """Raw tiles/s of the model alone per variant and batch (device-resident scaled input,
    CUDA events), and each variant's largest score drift from strict fp32."""
    gpu = device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    bands = _bands(module)
    u8 = torch.randint(0, 256, (max(batches), bands, 256, 256), generator=gen, dtype=torch.uint8)
    x32 = (u8.to(device).float() / 255).contiguous()
    sample = x32[: min(batches)]
    reference_module = copy.deepcopy(module).to(device).eval()
    with backend_flags(tf32=False, benchmark=False), torch.inference_mode():
        reference = torch.softmax(reference_module(sample).float(), 1)
    del reference_module
    out: dict[str, Any] = {}
    for name, (dtype, channels_last, tf32, benchmark, compiled, needs_gpu) in VARIANTS.items():
        entry: dict[str, Any] = {
            "dtype": str(dtype).removeprefix("torch."),
            "channels_last": channels_last,
            "tf32": tf32,
            "cudnn_benchmark": benchmark,
            "compiled": compiled,
            "tiles_per_s": dict.fromkeys(map(str, batches)),
            "max_score_drift_vs_fp32": None,
        }
        out[name] = entry
        if needs_gpu and not gpu:
            continue
        if compiled and not (compile_allowed and eager):
            entry["tiles_per_s"] = "not measured: " + (
                "--no-compile" if not compile_allowed else "the model file is TorchScript"
            )
            continue
        try:
            _measure_variant(entry, module, device, x32, sample, reference, batches, iterations)
        except Exception as exc:  # e.g. torch.compile without a working toolchain
            entry["tiles_per_s"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    fp32 = out["fp32"]["tiles_per_s"]
    for entry in out.values():
        rates = entry["tiles_per_s"]
        if isinstance(rates, dict) and isinstance(fp32, dict):
            entry["ratio_to_fp32"] = {
                b: (round(r / fp32[b], 3) if r is not None and fp32[b] else None)
                for b, r in rates.items()
            }
    return out


def _measure_variant(
    entry: dict[str, Any],
    module: torch.nn.Module,
    device: torch.device,
    x32: torch.Tensor,
    sample: torch.Tensor,
    reference: torch.Tensor,
    batches: tuple[int, ...],
    iterations: int,
) -> None:
    dtype = getattr(torch, entry["dtype"])
    fmt = torch.channels_last if entry["channels_last"] else torch.contiguous_format
    with backend_flags(tf32=bool(entry["tf32"]), benchmark=bool(entry["cudnn_benchmark"])):
        model: Any = copy.deepcopy(module).to(device=device, dtype=dtype, memory_format=fmt)
        model.eval()
        if entry["compiled"]:
            model = torch.compile(model, dynamic=True)
            begin = time.perf_counter()
            with torch.inference_mode():
                model(sample.to(dtype).contiguous(memory_format=fmt))
            sync(device)
            entry["compile_s"] = round(time.perf_counter() - begin, 1)
        with torch.inference_mode():
            for b in batches:
                x = x32[:b].to(dtype).contiguous(memory_format=fmt)
                seconds = seconds_per_call(device, lambda x=x: model(x), iterations)
                entry["tiles_per_s"][str(b)] = round(b / seconds, 1)
            scores = torch.softmax(model(sample.to(dtype).contiguous(memory_format=fmt)).float(), 1)
    entry["max_score_drift_vs_fp32"] = float((scores - reference).abs().max())


def _bands(module: torch.nn.Module) -> int:
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            return int(m.in_channels)
    return 3


# -------------------------------------------------------------------------- handler stages


def _frombuffer(body: bytes) -> np.ndarray:
    """Header-parsed ``np.frombuffer`` over the body: the zero-copy decode."""
    head = io.BytesIO(body[:4096])
    version = np.lib.format.read_magic(head)
    read = np.lib.format.read_array_header_1_0
    if version != (1, 0):
        read = np.lib.format.read_array_header_2_0
    shape, _fortran, dtype = read(head)
    return np.frombuffer(body, dtype=dtype, offset=head.tell()).reshape(shape)


def handler_stages(driver: HandlerDriver, device: torch.device, reps: int) -> dict[str, Any]:
    """Milliseconds per handler call by stage, on one call's worth of requests, next to the
    whole ``handle`` call; on a GPU also the kernel time over the call's wall time."""
    gpu = device.type == "cuda"
    runtime = driver.runtime
    data = driver.calls[0]
    bodies = [d["body"] for d in data]
    decoded = [np.load(io.BytesIO(b), allow_pickle=False) for b in bodies]
    batch = np.concatenate(decoded)
    n = len(batch)
    stages: dict[str, Callable[[], Any] | None] = {
        "decode_np_load": lambda: [np.load(io.BytesIO(b), allow_pickle=False) for b in bodies],
        "decode_handler": lambda: [chipscale_handler.decode_tiles(b) for b in bodies],
        "decode_frombuffer": lambda: [_frombuffer(b) for b in bodies],
        "concatenate": lambda: np.concatenate(decoded),
        "copy_pageable": None,
        "copy_pinned": None,
    }
    if gpu:
        pinned = torch.empty(batch.shape, dtype=torch.from_numpy(batch).dtype).pin_memory()

        def pageable() -> None:
            torch.from_numpy(batch).to(device)
            sync(device)

        def staged() -> None:
            pinned.copy_(torch.from_numpy(batch))
            pinned.to(device, non_blocking=True)
            sync(device)

        stages["copy_pageable"], stages["copy_pinned"] = pageable, staged
    scaled = runtime.preprocess(batch)
    module, step = runtime.module, runtime.sub_batch

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            parts = [module(scaled[i : i + step]) for i in range(0, n, step)]
            out = torch.cat(parts).float()
        sync(device)
        return out

    scores_device = forward()
    scores = scores_device.cpu().numpy()
    offsets = np.cumsum([0] + [len(t) for t in decoded])

    def scale() -> None:
        runtime.preprocess(batch)
        sync(device)

    stages["scale_on_device"] = scale
    stages["forward"] = forward
    stages["copy_back"] = lambda: scores_device.cpu().numpy()
    stages["json"] = lambda: [
        json.dumps({"scores": scores[a:b].tolist(), "batch": {"requests": len(data)}})
        for a, b in itertools.pairwise(offsets)
    ]
    ms = {
        name: (None if fn is None else round(wall_per_call(fn, reps) * 1000, 3))
        for name, fn in stages.items()
    }
    call_ms = wall_per_call(lambda: driver.call(data), reps) * 1000
    forward_device_s = seconds_per_call(device, forward, reps, warmup=1)
    result: dict[str, Any] = {
        "requests_per_call": len(data),
        "tiles_per_call": n,
        "ms_per_call": ms,
        "handle_call_ms": round(call_ms, 3),
        "handle_tiles_per_s": round(n / call_ms * 1000, 1),
        "forward_over_handle_call": round(forward_device_s * 1000 / call_ms, 3),
        "kernel_time_over_wall": _kernel_over_wall(driver, data, device) if gpu else None,
        "note": (
            "decode_handler is chipscale_handler.decode_tiles as this checkout has it; "
            "decode_frombuffer is np.frombuffer over the header-parsed body (zero copy); "
            "copy_pinned includes staging into a pinned buffer"
        ),
    }
    return result


def _kernel_over_wall(
    driver: HandlerDriver, data: list[dict[str, Any]], device: torch.device
) -> Any:
    """CUDA kernel time (torch.profiler) over the wall time of handler calls."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            begin = time.perf_counter()
            for _ in range(5):
                driver.call(data)
            sync(device)
            wall = time.perf_counter() - begin
        kernel_us = 0.0
        for event in prof.key_averages():
            if str(getattr(event, "device_type", "")).endswith("CUDA"):
                kernel_us += float(
                    getattr(event, "self_device_time_total", None)
                    or getattr(event, "self_cuda_time_total", 0.0)
                )
        return round(kernel_us / 1e6 / wall, 3)
    except Exception as exc:
        return f"failed: {type(exc).__name__}: {str(exc)[:200]}"


# --------------------------------------------------------------------------- dtypes, bytes


def payload(tiles: np.ndarray, tiles_per_request: int, answer: str) -> dict[str, Any]:
    """Bytes per tile on the wire for one request shape: the .npy body (and what zstd or
    LZ4 make of it, when installed, with their CPU cost) and the JSON answer."""
    body = npy(tiles[:tiles_per_request])
    n = len(tiles[:tiles_per_request])
    out: dict[str, Any] = {
        "dtype": str(tiles.dtype),
        "bands": int(tiles.shape[1]),
        "request_bytes_per_tile": round(len(body) / n, 1),
        "answer_bytes_per_tile": round(len(answer.encode()) / n, 1),
        "compressed": {},
    }
    codecs: dict[str, Callable[[bytes], bytes]] = {}
    with contextlib.suppress(ImportError):
        import zstandard

        for level in (1, 3):
            codecs[f"zstd-{level}"] = zstandard.ZstdCompressor(level=level).compress
    with contextlib.suppress(ImportError):
        import lz4.frame

        codecs["lz4"] = lz4.frame.compress
    # Random pixels do not compress; a smooth synthetic tile (8x8 blocks upsampled, +-4 of
    # noise) stands for imagery. Real imagery: run the bench with your own tiles.
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 200, (n, tiles.shape[1], 8, 8)).repeat(32, 2).repeat(32, 3)
    smooth = (coarse + rng.integers(0, 8, coarse.shape)).astype(tiles.dtype)
    for kind, raw in (("random", body), ("smooth_synthetic", npy(smooth))):
        for name, compress in codecs.items():
            packed = compress(raw)
            out["compressed"][f"{kind}:{name}"] = {
                "bytes_per_tile": round(len(packed) / n, 1),
                "ratio": round(len(raw) / len(packed), 3),
                "compress_ms_per_tile": round(
                    wall_per_call(lambda c=compress, r=raw: c(r), 5) * 1000 / n, 4
                ),
            }
    if not codecs:
        out["compressed"] = "neither zstandard nor lz4 is installed"
    return out


def dtype_rates(drivers: dict[str, HandlerDriver], seconds: float) -> dict[str, Any]:
    """Handler-path tiles/s and per-call decode for each input kind, alternated."""
    rates: dict[str, list[float]] = {name: [] for name in drivers}
    for _ in range(3):
        for name, driver in drivers.items():
            done, begin = 0, time.perf_counter()
            while time.perf_counter() - begin < seconds / 3:
                done += driver.one_pass()
            rates[name].append(done / (time.perf_counter() - begin))
    out: dict[str, Any] = {}
    for name, driver in drivers.items():
        body = driver.bodies[0]
        tiles = chipscale_handler.decode_tiles(body)
        assert isinstance(tiles, np.ndarray)
        per_tile = tiles[0].nbytes
        out[name] = {
            "dtype": str(tiles.dtype),
            "bands": int(tiles.shape[1]),
            "source_bytes_per_tile": per_tile,
            "request_bytes_per_tile": round(len(body) / len(tiles), 1),
            "handler_tiles_per_s": round(statistics.median(rates[name]), 1),
            "decode_ms_per_request": round(
                wall_per_call(lambda b=body: chipscale_handler.decode_tiles(b), 9) * 1000, 4
            ),
        }
    names = list(out)
    if len(names) == 2:
        a, b = names
        out["ratio_tiles_per_s"] = {
            f"{b}/{a}": round(out[b]["handler_tiles_per_s"] / out[a]["handler_tiles_per_s"], 3)
        }
    return out
