"""Tiles per second through a real TorchServe against in-process inference; prints JSON.

Why: the cloud fleet serves the model through TorchServe over HTTP; ``chipscale run --model
FILE`` runs the same model file in-process. Serving should cost little next to inference
itself, so the figure that matters is ``torchserve / in_process`` for the same model file,
the same tiles and the same model batch: goal at least 0.8 on this CPU. The model is
``bench/resnet_model.py`` (ResNet-18 layout, tens of ms per tile here): on a model of a few
arithmetic lines, HTTP and .npy encoding would be all that is measured.

What runs, all in one process and one TorchServe, so the figures share their conditions:

* ``in_process``: ``ModelRuntime.predict`` on batches of ``--batch`` tiles (``sub_batch`` the
  same), one torch thread: what ``chipscale run --model FILE`` does with one worker.
* ``torchserve``: TorchServe 0.12 started by ``chipscale.models.serving.TorchServe`` with
  ``model_server/config.properties`` (the GPU hosts' file), one worker, one torch thread, the
  handler's ``sub_batch`` equal to ``--batch``; tiles sent by the production client
  (``chipscale.models.torchserve_client.TorchServePredictor``) at 1, 8, 32 and 64 tiles per request.
  The headline is the request size equal to ``--batch``, so the handler runs the model on
  the same batch the in-process figure does. ``batchSize`` 4 requests (``--batch-size``;
  the figures in bench/results were taken with it), ``maxBatchDelay`` 10 ms; requests in
  flight per size: enough for two model batches (16 at 1 tile, 8 at 8, 2 at 32 and 64), so
  the batcher always has work queued.
* ``raw_http`` (at the headline request size): a bare urllib3 loop posting the same .npy
  bodies, which shows what the production client itself costs; it also reads the ``batch``
  field of each answer, to tell how full TorchServe's batches were.

Measurements alternate within each round, in an order that rotates every round, and medians
are reported: two cores are shared with other work, so drift hits every figure alike. Two
more views resist that noise: the median over rounds of each round's own ratio (paired), and
CPU milliseconds per tile counting every process a path uses (TorchServe's JVM and worker
and the client), which says what serving costs whatever else runs. The JSON says what else
used the CPU during the run (load average, other processes' CPU).

Usage: ``python bench/serving.py [--rounds 7] [--tiles 64] [--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import urllib3

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import resnet_model  # noqa: E402

from chipscale.models.serving import ServingConfig, TorchServe, package_model  # noqa: E402
from model_server.chipscale_runtime import load_model  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "serving.json"
TILES_PER_REQUEST = (1, 8, 32, 64)
GOAL = 0.8


class Client(Protocol):
    def predict(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------- clients


@dataclass
class RawHttpClient:
    """The least a client can do: .npy bodies posted by ``concurrency`` threads over a
    keep-alive pool, no retries. Records each answer's ``batch`` field (requests and tiles
    TorchServe put in the same handler call)."""

    url: str
    tiles_per_request: int
    concurrency: int
    batches: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._pool = urllib3.PoolManager(maxsize=self.concurrency, block=True)
        self._executor = ThreadPoolExecutor(self.concurrency)

    def _post(self, tiles: np.ndarray) -> np.ndarray:
        body = io.BytesIO()
        np.save(body, tiles, allow_pickle=False)
        answer = self._pool.request(
            "POST",
            self.url,
            body=body.getvalue(),
            headers={"Content-Type": "application/octet-stream"},
            timeout=urllib3.Timeout(connect=5, read=600),
            retries=False,
        )
        if answer.status != 200:
            raise RuntimeError(f"TorchServe answered {answer.status}: {answer.data[:300]!r}")
        data = json.loads(answer.data)
        self.batches.append((data["batch"]["requests"], data["batch"]["tiles"]))
        return np.asarray(data["scores"], dtype=np.float32)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        step = self.tiles_per_request
        chunks = [batch[i : i + step] for i in range(0, len(batch), step)]
        return np.concatenate(list(self._executor.map(self._post, chunks)))

    def close(self) -> None:
        self._executor.shutdown()
        self._pool.clear()


def production_client(url: str, tiles_per_request: int, concurrency: int) -> Client | None:
    """``TorchServePredictor`` as ``chipscale run --model URL`` uses it, or None when this
    checkout does not have it yet (the raw client then stands in, and the JSON says so)."""
    try:
        from chipscale.models.torchserve_client import TorchServePredictor
    except ImportError:
        return None
    return TorchServePredictor(url, tiles_per_request=tiles_per_request, concurrency=concurrency)


def concurrency_for(tiles_per_request: int, batch: int, cap: int = 16) -> int:
    """Requests in flight: enough for two model batches' worth of tiles, so one TorchServe
    batch is queued while the worker runs the other (at least 2, at most ``cap``)."""
    return max(2, min(cap, math.ceil(2 * batch / tiles_per_request)))


# ------------------------------------------------------------------------- CPU accounting


def process_ticks() -> dict[int, tuple[str, int, int]]:
    """Every process: pid -> (command, process group, CPU ticks used so far)."""
    processes: dict[int, tuple[str, int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):  # gone while we read
            text = Path(entry.path, "stat").read_text()
            command = text[text.index("(") + 1 : text.rindex(")")]
            fields = text[text.rindex(")") + 2 :].split()
            # fields[2] is the process group, fields[11] and [12] utime and stime
            processes[int(entry.name)] = (
                command,
                int(fields[2]),
                int(fields[11]) + int(fields[12]),
            )
    return processes


def cpu_seconds(group: int | None) -> dict[str, float]:
    """CPU seconds used so far by this process (the model in-process, or the client) and by
    the living processes of TorchServe's process group ``group``: its JVM (``frontend``)
    and its Python worker(s) (``worker``)."""
    parts = {"this_process": time.process_time(), "frontend": 0.0, "worker": 0.0}
    if group is not None:
        tick = os.sysconf("SC_CLK_TCK")
        for command, g, ticks in process_ticks().values():
            if g == group:
                parts["frontend" if command == "java" else "worker"] += ticks / tick
    return parts


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU ticks of the whole machine and of every process, to tell ours from the rest."""

    wall: float
    busy_ticks: int
    processes: dict[int, tuple[str, int, int]]

    @classmethod
    def take(cls) -> CpuSnapshot:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        busy = sum(values) - values[3] - values[4]  # minus idle and iowait
        return cls(time.monotonic(), busy, process_ticks())


def other_load(start: CpuSnapshot, end: CpuSnapshot, ours: set[int]) -> dict[str, Any]:
    """CPU the rest of the machine used while we measured: cores busy on average, and the
    busiest other processes. ``ours`` holds process-group ids (this process, TorchServe's)."""
    tick = os.sysconf("SC_CLK_TCK")
    seconds = end.wall - start.wall
    ours_ticks = 0
    others: dict[str, int] = {}
    for pid, (command, group, ticks) in end.processes.items():
        delta = ticks - (start.processes[pid][2] if pid in start.processes else 0)
        if group in ours or pid == os.getpid():
            ours_ticks += delta
        elif delta > 0:
            others[command] = others.get(command, 0) + delta
    other_cores = max(0.0, (end.busy_ticks - start.busy_ticks - ours_ticks) / tick / seconds)
    busiest = sorted(others.items(), key=lambda item: -item[1])[:5]
    return {
        "seconds": round(seconds, 1),
        "cores_busy_this_benchmark": round(ours_ticks / tick / seconds, 2),
        "cores_busy_other_processes": round(other_cores, 2),
        "busiest_other_processes_cpu_s": {name: round(t / tick, 1) for name, t in busiest},
    }


# ---------------------------------------------------------------------------------- running


def java_version() -> str:
    java = shutil.which("java")
    if java is None:
        return "absent"
    done = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    return (done.stderr or done.stdout).splitlines()[0] if done.returncode == 0 else "error"


@contextlib.contextmanager
def torchserve(model: Path, work: Path, config: ServingConfig) -> Iterator[TorchServe]:
    mar = package_model(model, work / "mar", config=config, force=True)
    server = TorchServe.on_free_ports(mar, work / "torchserve")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Measured:
    """One path's measurements: tiles/s (wall) and CPU seconds per tile (all processes
    involved), one value per round."""

    rates: list[float] = field(default_factory=list)
    cpu_per_tile: dict[str, list[float]] = field(
        default_factory=lambda: {"total": [], "this_process": [], "frontend": [], "worker": []}
    )

    def cpu_ms(self) -> dict[str, float]:
        """Median CPU milliseconds per tile, by part."""
        return {k: round(statistics.median(v) * 1000, 1) for k, v in self.cpu_per_tile.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tiles", type=int, default=64, help="tiles per measurement")
    parser.add_argument("--batch", type=int, default=32, help="model batch (sub_batch)")
    parser.add_argument("--width", type=int, default=resnet_model.DEFAULT_WIDTH)
    parser.add_argument(
        "--batch-size", type=int, default=4, help="TorchServe batchSize (requests per call)"
    )
    parser.add_argument("--max-batch-delay", type=int, default=10, help="milliseconds")
    parser.add_argument(
        "--concurrency", type=int, default=None, help="requests in flight (default: per size)"
    )
    parser.add_argument("--no-raw-http", action="store_true", help="skip the raw HTTP figure")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 32 tiles: a smoke run")
    parser.add_argument(
        "--out",
        default=None,
        help=f"JSON file, and a .png plot beside it (default {RESULTS}; none with --quick)",
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tiles = 2, min(args.tiles, 32)
    out = Path(args.out) if args.out else (None if args.quick else RESULTS)
    sizes = sorted({*TILES_PER_REQUEST, args.batch})  # the headline size is measured too

    torch.set_num_threads(1)  # as the TorchServe worker (handler threads: 1)
    load_before = os.getloadavg()
    tiles = np.random.default_rng(0).integers(0, 256, (args.tiles, 3, 256, 256), dtype=np.uint8)
    config = ServingConfig(
        batch_size=args.batch_size,
        max_batch_delay_ms=args.max_batch_delay,
        workers=1,
        sub_batch=args.batch,
        threads=1,
    )
    with tempfile.TemporaryDirectory(prefix="chipscale-bench-serving-") as tmp:
        work = Path(tmp)
        model_file = resnet_model.save_resnet(work / "bench-resnet.pt", args.width)
        network = resnet_model.build_resnet(args.width)
        runtime = load_model(model_file, "cpu", sub_batch=args.batch, threads=1)

        def in_process() -> int:
            for i in range(0, len(tiles), args.batch):
                runtime.predict(tiles[i : i + args.batch])
            return len(tiles)

        with torchserve(model_file, work, config) as server:
            assert server.process is not None
            group = server.process.pid  # started in its own session: pid = process group
            clients: dict[str, Client] = {}
            concurrency: dict[str, int] = {}
            client_kind = "chipscale.models.torchserve_client.TorchServePredictor"
            for size in sizes:
                c = args.concurrency or concurrency_for(size, args.batch)
                client = production_client(server.predictions_url, size, c)
                if client is None:
                    client_kind = (
                        "raw urllib3 (chipscale.models.torchserve_client not in this checkout)"
                    )
                    client = RawHttpClient(server.predictions_url, size, c)
                clients[f"torchserve_{size}"] = client
                concurrency[f"torchserve_{size}"] = c
            raw: RawHttpClient | None = None
            if not args.no_raw_http:
                c = args.concurrency or concurrency_for(args.batch, args.batch)
                raw = RawHttpClient(server.predictions_url, args.batch, c)
                clients["raw_http"] = raw
                concurrency["raw_http"] = c

            def through(client: Client) -> Callable[[], int]:
                return lambda: len(client.predict(tiles))

            runs: dict[str, Callable[[], int]] = {"in_process": in_process}
            runs.update({name: through(client) for name, client in clients.items()})

            # Warm-up (lazy initialisation in the worker and here, connection pools), and a
            # check that both paths compute the same thing.
            expected = runtime.predict(tiles[: args.batch])
            served = {n: c.predict(tiles[: args.batch]) for n, c in clients.items()}
            worst = max(float(np.abs(s - expected).max()) for s in served.values())
            if raw is not None:
                raw.batches.clear()

            measured = {name: Measured() for name in runs}
            names = list(runs)
            start = CpuSnapshot.take()
            for r in range(args.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    # CPU of every process the path uses: this one (the model in-process, or
                    # the client), plus TorchServe's JVM and worker for the served paths.
                    processes = None if name == "in_process" else group
                    before = cpu_seconds(processes)
                    wall = time.perf_counter()
                    count = runs[name]()
                    wall = time.perf_counter() - wall
                    after = cpu_seconds(processes)
                    measured[name].rates.append(count / wall)
                    used = {part: after[part] - before[part] for part in before}
                    used["total"] = sum(used.values())
                    for part, seconds in used.items():
                        measured[name].cpu_per_tile[part].append(seconds / count)
            end = CpuSnapshot.take()
            load = other_load(start, end, ours={os.getpgid(0), group})
            for client in clients.values():
                client.close()

    median = {name: statistics.median(m.rates) for name, m in measured.items()}
    cpu_ms = {name: m.cpu_ms() for name, m in measured.items()}

    def ratio(name: str, to: str = "in_process") -> float:
        return round(median[name] / median[to], 3)

    def paired(name: str) -> float:
        """Median over rounds of this path's rate over the in-process rate of the same round:
        drift between rounds cancels out."""
        pairs = zip(measured[name].rates, measured["in_process"].rates, strict=True)
        return round(statistics.median(a / b for a, b in pairs), 3)

    headline = f"torchserve_{args.batch}"
    result: dict[str, Any] = {
        "benchmark": "serving",
        "tiles_per_s": {
            "in_process": round(median["in_process"], 2),
            "torchserve": round(median[headline], 2),
        },
        "ratio_torchserve_to_in_process": ratio(headline),
        "ratio_paired_by_round_median": paired(headline),
        "goal": GOAL,
        "headline": (
            f"{args.batch} tiles per request, handler sub_batch {args.batch}, against "
            f"in-process predict on {args.batch}-tile batches"
        ),
        "cpu_ms_per_tile": {
            "in_process": cpu_ms["in_process"]["total"],
            "torchserve": cpu_ms[headline],
            "note": (
                "median by round of the CPU every process involved used per tile: for "
                "TorchServe total = worker (Python, runs the model) + frontend (JVM) + "
                "this_process (the client). Much less sensitive to other load than tiles/s; "
                "with the frontend and client on the other core, the worker's share is what "
                "bounds throughput"
            ),
        },
        "by_tiles_per_request": [
            {
                "tiles_per_request": size,
                "concurrency": concurrency[f"torchserve_{size}"],
                "tiles_per_s": round(median[f"torchserve_{size}"], 2),
                "ratio_to_in_process": ratio(f"torchserve_{size}"),
                "ratio_paired_by_round_median": paired(f"torchserve_{size}"),
                "cpu_ms_per_tile": cpu_ms[f"torchserve_{size}"]["total"],
                "model_batch_at_most": min(size * args.batch_size, args.batch),
            }
            for size in sizes
        ],
        "max_abs_score_difference_served_vs_in_process": worst,
        "runs_tiles_per_s": {name: [round(v, 2) for v in m.rates] for name, m in measured.items()},
        "runs_cpu_ms_per_tile": {
            name: [round(v * 1000, 1) for v in m.cpu_per_tile["total"]]
            for name, m in measured.items()
        },
    }
    if raw is not None:
        requests = [b[0] for b in raw.batches]
        batch_tiles = [b[1] for b in raw.batches]
        result["raw_http"] = {
            "tiles_per_request": args.batch,
            "concurrency": concurrency["raw_http"],
            "tiles_per_s": round(median["raw_http"], 2),
            "ratio_to_in_process": ratio("raw_http"),
            "ratio_paired_by_round_median": paired("raw_http"),
            "cpu_ms_per_tile": cpu_ms["raw_http"],
            "production_client_to_raw": ratio(headline, "raw_http"),
            "torchserve_batch_mean": {
                "requests": round(statistics.mean(requests), 2) if requests else None,
                "tiles": round(statistics.mean(batch_tiles), 1) if batch_tiles else None,
            },
        }
    result["conditions"] = {
        "model": {
            "file": "bench/resnet_model.py (TorchScript, untrained, seed 0)",
            "width": args.width,
            "parameters": resnet_model.parameter_count(network),
            "gflops_per_tile": round(resnet_model.gflops_per_tile(network), 3),
            "input": "uint8 (N, 3, 256, 256), random pixels, divided by 255 in the runtime",
        },
        "tiles_per_measurement": args.tiles,
        "rounds": args.rounds,
        "order": "rotating per round: " + ", ".join(names),
        "model_batch": args.batch,
        "torch_threads": {"in_process": torch.get_num_threads(), "torchserve_worker": 1},
        "torchserve": {
            "version": importlib.metadata.version("torchserve"),
            "config": "model_server/config.properties",
            **config.settings(),
        },
        "client": client_kind,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "java": java_version(),
        "load_average_1_5_15": {
            "before": [round(v, 2) for v in load_before],
            "after": [round(v, 2) for v in os.getloadavg()],
        },
        "cpu_during_measurements": load,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"plot: {plot(result, out.with_suffix('.png'))}", file=sys.stderr)


def plot(result: dict[str, Any], path: Path) -> Path:
    """tiles/s by tiles per request against the in-process line: the figure people look at
    first, next to the JSON that holds the conditions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["by_tiles_per_request"]
    labels = [f"{r['tiles_per_request']}\n({r['concurrency']} in flight)" for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    bars = ax.bar(labels, [r["tiles_per_s"] for r in rows], color="#4c72b0", label="TorchServe")
    ax.bar_label(bars, labels=[f"{r['ratio_to_in_process']:.2f}x" for r in rows], padding=2)
    in_process = result["tiles_per_s"]["in_process"]
    ax.axhline(in_process, color="#dd8452", linestyle="--", label=f"in-process {in_process}")
    ax.axhline(0.8 * in_process, color="grey", linestyle=":", label="goal 0.8x in-process")
    top = max([in_process, *(r["tiles_per_s"] for r in rows)])
    ax.set_ylim(0, top * 1.2)  # room for the ratio labels
    ax.set_xlabel("tiles per request")
    ax.set_ylabel("tiles/s")
    ax.set_title("Serving the benchmark ResNet: TorchServe vs in-process (CPU)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
