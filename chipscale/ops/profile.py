"""``chipscale profile``: this machine's per-stage rates, the inputs of
:mod:`chipscale.ops.system_model` (written as a profile file for ``chipscale plan``).

Reads go through :class:`LatencyServer` when the source is a local file: an HTTP server with
range requests that waits a set latency before each answer, so GDAL reads it as it reads S3
(``/vsicurl/``, one round trip per range). The model is timed in process, or through a
TorchServe endpoint; the store with the worker's one write per pack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from chipscale.errors import ChipscaleError
from chipscale.ops.plan import DEFAULT_RATES
from chipscale.ops.system_model import Rates

#: Tiles a request carries, as the worker sends them (TorchServePredictor's default).
TILES_PER_REQUEST = 8
#: Requests in flight while the endpoint's throughput is measured.
ENDPOINT_CONCURRENCY = 4


class ProfileError(ChipscaleError):
    """A profile could not be measured (names what)."""


def _handler(path: Path, latency_s: float) -> type[BaseHTTPRequestHandler]:
    size = path.stat().st_size

    class Ranges(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            time.sleep(latency_s)
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

        def do_GET(self) -> None:
            time.sleep(latency_s)
            spec = self.headers.get("Range", "")
            start, end = 0, size - 1
            if spec.startswith("bytes=") and "," not in spec:
                first, _, last = spec[6:].partition("-")
                start = int(first) if first else max(0, size - int(last))
                end = min(size - 1, int(last)) if first and last else size - 1
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            with path.open("rb") as handle:
                handle.seek(start)
                self.wfile.write(handle.read(end - start + 1))

    return Ranges


class LatencyServer:
    """Serves one file over HTTP with ``latency_s`` before each answer (an S3 stand-in)."""

    def __init__(self, path: str | os.PathLike[str], latency_s: float) -> None:
        self.path = Path(path)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.path, latency_s))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{self.path.name}"

    def __enter__(self) -> LatencyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def s3_like(source: str, latency_s: float) -> Iterator[str]:
    """``source`` itself when remote or with no latency; else its URL on a LatencyServer."""
    if latency_s <= 0 or "://" in source:
        yield source
        return
    with LatencyServer(source, latency_s) as server:
        yield server.url


def read_seconds_per_tile(source: str, zoom: int, tiles: int, pack: int = 100) -> float:
    """One worker's seconds per tile reading packs of ``pack`` tiles one after another with
    the worker's cached reader (opened, its header read, before the clock starts, as in a
    warm Lambda)."""
    from itertools import islice

    from chipscale.grid.packs import pack_tiles
    from chipscale.sources import cached_reader, clear_reader_cache
    from chipscale.sources.footprint import cover

    found = list(islice(cover(zoom, source=source), tiles + pack))
    if len(found) < 2:
        raise ProfileError(f"source {source} has fewer than 2 tiles at zoom {zoom}")
    packs = list(pack_tiles(found, pack, presorted=False))
    clear_reader_cache()
    for _ in cached_reader(source).read(packs[0][:1]):  # open: header and the first block
        pass
    timed = packs[1:] or packs
    count = sum(len(p) for p in timed)
    start = time.perf_counter()
    for p in timed:
        for _ in cached_reader(source).read(p):
            pass
    elapsed = time.perf_counter() - start
    clear_reader_cache()
    return elapsed / count


def sample_batch(source: str, zoom: int, count: int) -> Any:
    """``count`` tiles of ``source`` with pixels, stacked, for the model."""
    from itertools import islice

    import numpy as np

    from chipscale.sources import read_tiles
    from chipscale.sources.footprint import cover

    found = list(islice(cover(zoom, source=source), count * 4))
    images = [img.data for _, img in read_tiles(source, found) if not img.is_empty][:count]
    if not images:
        raise ProfileError(f"source {source} has no tile with pixels at zoom {zoom}")
    while len(images) < count:
        images += images[: count - len(images)]
    return np.stack(images)


def model_rates(
    model_file: str, endpoint: str | None, batch: Any, endpoint_workers: int
) -> tuple[dict[str, float], dict[str, str]]:
    """The model's tiles/s (in process, or through ``endpoint``) and the client's overhead."""
    from chipscale.models.predictors import open_predictor

    rates: dict[str, float] = {}
    sources: dict[str, str] = {}
    if endpoint is None:
        predictor = open_predictor(model_file, device="cpu", threads=1, sub_batch=len(batch))
        batch = _bands(batch, predictor.info)
        rate = _rate(lambda: predictor.predict(batch), len(batch))
        rates["gpu_tiles_per_s"] = rate
        sources["gpu_tiles_per_s"] = f"measured: {model_file} in process, one torch thread"
        return rates, sources
    through = open_predictor(endpoint, concurrency=ENDPOINT_CONCURRENCY)
    one = open_predictor(endpoint, concurrency=1, tiles_per_request=TILES_PER_REQUEST)
    batch = _bands(batch, through.info)
    try:
        rate = _rate(lambda: through.predict(batch), len(batch))
        small = batch[:TILES_PER_REQUEST]
        latency = 1.0 / _rate(lambda: one.predict(small), len(small))
    finally:
        through.close()
        one.close()
    per_worker = rate / max(1, min(endpoint_workers, os.cpu_count() or 1))
    rates["gpu_tiles_per_s"] = per_worker
    rates["predict_overhead_s"] = max(0.0, latency - 1.0 / per_worker)
    rates["shared_device"] = 0.0
    sources["gpu_tiles_per_s"] = (
        f"measured: {endpoint} with {ENDPOINT_CONCURRENCY} requests in flight, {rate:.1f} "
        f"tiles/s over {endpoint_workers} CPU worker(s)"
    )
    sources["predict_overhead_s"] = "measured: one request stream's wait per tile - 1/rate"
    sources["shared_device"] = "CPU TorchServe: each worker is its own server"
    return rates, sources


def _bands(batch: Any, info: Any) -> Any:
    """The batch cut to the bands the model takes, as the worker stacks it (its first ones)."""
    accepted = [n for n in (info.band_counts or (info.bands,)) if n <= batch.shape[1]]
    return batch if batch.shape[1] in accepted or not accepted else batch[:, : max(accepted)]


def _rate(call: Any, tiles: int, seconds: float = 2.0) -> float:
    """Tiles/s of ``call`` repeated for at least ``seconds`` (after one warm-up call)."""
    call()
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or done == 0:
        call()
        done += tiles
    return done / elapsed


def write_seconds_per_tile(db: str | None, zoom: int, rows: int = 2000, pack: int = 100) -> float:
    """Seconds per tile of the worker's one write per pack of ``pack`` results."""
    import tempfile

    from mercantile import Tile

    from chipscale.results import open_store
    from chipscale.values import JobInfo, TileResult

    job = f"profile-{os.getpid()}-{int(time.time())}"
    with tempfile.TemporaryDirectory() as tmp:
        url = db or f"sqlite:///{tmp}/profile.db"
        with open_store(url) as store:
            store.start_job(JobInfo(job, "profile", zoom, "m", "1"))
            output = {"scores": {"a": 0.5, "b": 0.5}}
            results = [
                TileResult(job, Tile(i % 4096, i // 4096, zoom), "ok", output, None, "m", "1")
                for i in range(rows)
            ]
            start = time.perf_counter()
            for i in range(0, rows, pack):
                store.write(results[i : i + pack])
            return (time.perf_counter() - start) / rows


def cold_start_seconds() -> float:
    """Seconds a fresh Python takes to import what the worker Lambda imports."""
    code = "import numpy, rasterio, chipscale.pipeline.process, chipscale.results"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    if done.returncode != 0:
        raise ProfileError(f"the worker's imports fail: {done.stderr.decode()[-200:]}")
    return time.perf_counter() - start


def gpu_rates(path: str) -> tuple[dict[str, float], dict[str, str]]:
    """The GPU rate and the handler's CPU per request from bench/gpu_serving.py's JSON."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        inputs = raw["torchserve"]["feed_model_inputs"]
        rate = float(inputs["gpu_tiles_per_s"])
        cpu = float(inputs["handler_cpu_s_per_request_upper_bound"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProfileError(
            f"{path} is not bench/gpu_serving.py output with torchserve.feed_model_inputs "
            f"({type(exc).__name__}: {exc})"
        ) from None
    device = raw.get("device", "?")
    source = f"measured: bench/gpu_serving.py on {device} ({path})"
    return (
        {"gpu_tiles_per_s": rate, "handler_cpu_s_per_request": cpu, "shared_device": 1.0},
        {"gpu_tiles_per_s": source, "handler_cpu_s_per_request": source},
    )


def measure_profile(
    *,
    source: str,
    model_file: str,
    endpoint: str | None,
    zoom: int | None,
    tiles: int,
    read_latency_s: float,
    db: str | None,
    gpu_json: str | None,
    endpoint_workers: int = 1,
) -> tuple[Rates, dict[str, str], dict[str, Any]]:
    """Every rate of :class:`Rates`: measured where this machine can, the defaults (with
    their sources) for the rest; and what was measured on."""
    import platform
    from datetime import UTC, datetime

    z = 18 if zoom is None else zoom
    values: dict[str, float] = {k: float(v) for k, (v, _) in DEFAULT_RATES.items()}
    sources = {k: s for k, (_, s) in DEFAULT_RATES.items()}
    with s3_like(source, read_latency_s) as read_from:
        values["read_s"] = read_seconds_per_tile(read_from, z, tiles)
    sources["read_s"] = f"measured: one worker reading packs of 100 tiles of {source} at z{z}" + (
        f" with {read_latency_s * 1000:g} ms per range request" if read_latency_s else ""
    )
    batch = sample_batch(source, z, 32)
    found, said = model_rates(model_file, endpoint, batch, endpoint_workers)
    values.update(found)
    sources.update(said)
    if gpu_json is not None:
        found, said = gpu_rates(gpu_json)
        values.update(found)
        sources.update(said)
    write = write_seconds_per_tile(db, z)
    values["write_s"] = write
    values["db_rows_per_s"] = 1.0 / write
    where = "a temporary SQLite" if db is None else "the store given"
    sources["write_s"] = f"measured: writes of 100 results into {where}"
    sources["db_rows_per_s"] = f"measured: one connection's rows/s into {where} (lower bound)"
    values["cold_start_s"] = cold_start_seconds()
    sources["cold_start_s"] = "measured: a fresh Python importing the worker's modules"
    values["tiles_per_request"] = float(TILES_PER_REQUEST)
    typed: dict[str, Any] = dict(values)
    typed["tiles_per_request"] = int(values["tiles_per_request"])
    typed["shared_device"] = bool(values["shared_device"])
    rates = Rates(**typed)
    about = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)",
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    return rates, sources, about
