"""Request bodies: bytes per tile, zstd's trade, and the handler's CPU per tile before and
after zero-copy decoding, under a real TorchServe; prints JSON.

Three parts, one run, on real imagery from shared/data (uint8 RGB aerial, NAIP 4-band uint8,
Landsat uint16 as 4-band tiles):

* ``bytes``: the ``.npy`` body per tile at 8 tiles a request, and for each codec (zstd levels
  1 and 3 via ``backports.zstd``, the production library; ``zstandard`` and ``lz4`` when
  installed, for comparison) the ratio and CPU ms per tile to compress and to decompress;
* ``decode``: the handler's decode of one 8-tile body in-process, ``np.load(BytesIO(body))``
  (before) against ``decode_tiles`` (after: ``np.frombuffer`` over the header-parsed body), µs;
* ``torchserve``: two TorchServe 0.12 servers side by side, one with the handler as it is and
  one with its decode replaced by the old ``np.load`` (the bench patches its ``.mar``), one
  worker each, a model that costs almost nothing (a per-tile mean), so the worker's CPU is the
  handler's. Tiles go 8 a request, 4 in flight, as plain ``.npy`` to both and as zstd to the
  new one; CPU ms per tile of the worker (handler), the JVM and the client, medians over rounds
  that rotate the order. Ratios are old / new, measured in the same run.

Usage: ``python bench/handler_decode.py [--rounds 5] [--tiles 512] [--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import urllib3

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "model_server"))

import chipscale_handler  # noqa: E402
from serving import CpuSnapshot, cpu_seconds, other_load  # noqa: E402

from chipscale.models.request_body import npy, zstd  # noqa: E402
from chipscale.models.serving import ServingConfig, TorchServe, package_model  # noqa: E402
from chipscale.sources import read_tiles  # noqa: E402
from chipscale.sources.footprint import cover  # noqa: E402
from model_server.chipscale_runtime import ModelMetadata, Scaling, save_torchscript  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "handler_decode.json"
DATA = Path(os.environ.get("CHIPSCALE_SHARED_DATA", ROOT.parent / "shared" / "data"))
TILES_PER_REQUEST = 8
CONCURRENCY = 4
#: Decodes per timing of the in-process decode.
LOOPS = 200
#: What the bench appends to the handler of the "before" server: the decode as it was.
LEGACY_DECODE = """

def _legacy_decode_tiles(body, encoding=None):  # bench/handler_decode.py: the old decode
    if not isinstance(body, bytes | bytearray):
        return HttpRefusal(400, "the body was decoded by TorchServe")
    if not body.startswith(NPY_MAGIC):
        return HttpRefusal(400, "the body is not a .npy file (numpy.save of the tile array)")
    try:
        tiles = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:
        return HttpRefusal(400, f"the body is not a readable .npy array: {exc}")
    if tiles.ndim == 3:
        tiles = tiles[np.newaxis]
    return tiles


decode_tiles = _legacy_decode_tiles
"""


class MeanModel(torch.nn.Module):
    """Almost free: the worker's CPU is then the handler's own (decode, stack, answer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3)).unsqueeze(1) / 65535.0
        return torch.cat([m, 1.0 - m], dim=1)


def imagery() -> dict[str, np.ndarray]:
    """Real tiles, each set fully inside its image (no empty margins to flatter a codec)."""

    def tiles(name: str, zoom: int) -> np.ndarray:
        src = str(DATA / name)
        read = read_tiles(src, cover(zoom, source=src), size=256)
        return np.stack([im.data for _, im in read if not im.is_empty and im.mask.all()])

    rgb = tiles("rasterio_cogeo.tif", 18)  # native resolution: no duplicated pixels
    naip = tiles("naip_m_4709963_se_14_1_20200831.tif", 15)
    # 1 band uint16, its fill outside the scene masked (nodata=1): 4 neighbouring tiles make a
    # 4-band tile.
    landsat = tiles("cog_nodata.tif", 9)
    landsat = landsat[: len(landsat) // 4 * 4].reshape(-1, 4, 256, 256)
    return {"uint8_rgb_aerial": rgb, "uint8_4band_naip": naip, "uint16_4band_landsat": landsat}


def bodies(tiles: np.ndarray, count: int) -> list[bytes]:
    """``count`` tiles (cycled) as 8-tile ``.npy`` bodies."""
    idx = np.arange(count) % len(tiles)
    return [npy(tiles[idx[i : i + TILES_PER_REQUEST]]) for i in range(0, count, 8)]


def codecs() -> dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]]:
    found: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
        f"zstd{level}": (lambda b, lv=level: zstd.compress(b, level=lv), zstd.decompress)
        for level in (1, 3)
    }
    if importlib.util.find_spec("zstandard"):
        import zstandard

        c, d = zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor()
        found["zstandard1"] = (c.compress, d.decompress)
    if importlib.util.find_spec("lz4"):
        import lz4.frame

        found["lz4"] = (lz4.frame.compress, lz4.frame.decompress)
    return found


def cpu_ms(run: Callable[[], Any], tiles: int, repeat: int) -> float:
    """Median CPU ms per tile of ``run`` (this process), over ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return round(statistics.median(times) * 1000 / tiles, 4)


def measure_bytes(images: dict[str, np.ndarray], repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, tiles in images.items():
        plain = bodies(tiles, len(tiles) // 8 * 8 or len(tiles))
        n = sum(np.load(io.BytesIO(b)).shape[0] for b in plain)
        raw = sum(map(len, plain))
        entry: dict[str, Any] = {"tiles": n, "npy_bytes_per_tile": round(raw / n)}
        for codec, (compress, decompress) in codecs().items():
            packed = [compress(b) for b in plain]
            entry[codec] = {
                "ratio": round(raw / sum(map(len, packed)), 3),
                "bytes_per_tile": round(sum(map(len, packed)) / n),
                "compress_ms_per_tile": cpu_ms(
                    lambda c=compress, p=plain: [c(b) for b in p], n, repeat
                ),
                "decompress_ms_per_tile": cpu_ms(
                    lambda d=decompress, p=packed: [d(b) for b in p], n, repeat
                ),
            }
        out[name] = entry
    return out


def legacy(body: bytes) -> np.ndarray:
    return np.load(io.BytesIO(body), allow_pickle=False)


def measure_decode(images: dict[str, np.ndarray], repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("uint8_rgb_aerial", "uint16_4band_landsat"):
        body = bytearray(bodies(images[name], 8)[0])
        old = cpu_ms(lambda b=body: [legacy(b) for _ in range(LOOPS)], LOOPS, repeat)
        new = cpu_ms(lambda b=body: [chipscale_handler.decode_tiles(b) for _ in range(LOOPS)],
                     LOOPS, repeat)  # fmt: skip
        out[name] = {
            "body_bytes": len(body),
            "np_load_us_per_body": round(old * 1000, 1),
            "frombuffer_us_per_body": round(new * 1000, 1),
            "ratio_old_over_new": round(old / new, 1),
        }
    return out


@contextlib.contextmanager
def servers(work: Path) -> Iterator[dict[str, TorchServe]]:
    meta = ModelMetadata(
        name="mean", version="1", classes=("a", "b"), bands=3, band_counts=(3, 4),
        tile_size=256, scaling=Scaling.none(),
    )  # fmt: skip
    model = save_torchscript(torch.jit.script(MeanModel()), work / "mean.pt", meta)
    config = ServingConfig(batch_size=4, max_batch_delay_ms=5, workers=1, sub_batch=64)
    new = package_model(model, work / "new", config=config)
    old = work / "old" / "mean.mar"
    old.parent.mkdir()
    with zipfile.ZipFile(new) as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("chipscale_handler.py"):
                data += LEGACY_DECODE.encode()
            dst.writestr(item, data)
    started: dict[str, TorchServe] = {}
    try:
        for name, mar in (("before", old), ("after", new)):
            started[name] = TorchServe.on_free_ports(mar, work / f"ts-{name}").start()
        yield started
    finally:
        for server in started.values():
            server.stop()


def measure_torchserve(
    images: dict[str, np.ndarray], tiles: int, rounds: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    http = urllib3.PoolManager(maxsize=CONCURRENCY * 3)
    pool = ThreadPoolExecutor(CONCURRENCY)

    def send(url: str, body: bytes, encoding: str | None) -> None:
        headers = {"Content-Type": "application/octet-stream"}
        if encoding:
            headers["Content-Encoding"] = encoding
        answer = http.request("POST", url, body=body, headers=headers, retries=False)
        if answer.status != 200:
            raise RuntimeError(f"{url}: HTTP {answer.status} {answer.data[:200]!r}")

    def path(url: str, plain: list[bytes], encoding: str | None) -> Callable[[], None]:
        def run() -> None:  # the client's part (compression included) is in this process
            sent = [zstd.compress(b, level=1) for b in plain] if encoding else plain
            list(pool.map(lambda b: send(url, b, encoding), sent))

        return run

    results: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="chipscale-bench-decode-") as tmp,
        servers(Path(tmp)) as started,
    ):
        load = None
        for name in ("uint8_rgb_aerial", "uint16_4band_landsat"):
            plain = bodies(images[name], tiles)
            old, new = started["before"], started["after"]
            runs = {
                "before_npy": (old, path(old.predictions_url, plain, None)),
                "after_npy": (new, path(new.predictions_url, plain, None)),
                "after_zstd1": (new, path(new.predictions_url, plain, "zstd")),
            }
            for _, run in runs.values():
                run()  # warm-up
            per: dict[str, dict[str, list[float]]] = {k: {} for k in runs}
            names = list(runs)
            start = CpuSnapshot.take()
            for r in range(rounds):
                for key in names[r % 3 :] + names[: r % 3]:
                    server, run = runs[key]
                    assert server.process is not None
                    before = cpu_seconds(server.process.pid)
                    wall = time.perf_counter()
                    run()
                    wall = time.perf_counter() - wall
                    after = cpu_seconds(server.process.pid)
                    used = {p: (after[p] - before[p]) * 1000 / tiles for p in before}
                    used["tiles_per_s"] = tiles / wall
                    for part, value in used.items():
                        per[key].setdefault(part, []).append(value)
            load = other_load(
                start, CpuSnapshot.take(),
                ours={os.getpgid(0), *(s.process.pid for s in started.values() if s.process)},
            )  # fmt: skip
            med = {
                k: {
                    ("client" if p == "this_process" else p)
                    + ("" if p == "tiles_per_s" else "_cpu_ms_per_tile"): round(
                        statistics.median(v), 3
                    )
                    for p, v in parts.items()
                }
                for k, parts in per.items()
            }
            worker = {k: med[k]["worker_cpu_ms_per_tile"] for k in med}
            results[name] = {
                **med,
                "handler_cpu_ratio_before_over_after_npy": round(
                    worker["before_npy"] / worker["after_npy"], 2
                ),
                "handler_cpu_ms_saved_per_tile_npy": round(
                    worker["before_npy"] - worker["after_npy"], 3
                ),
                "handler_cpu_ms_added_per_tile_by_zstd": round(
                    worker["after_zstd1"] - worker["after_npy"], 3
                ),
            }
    pool.shutdown()
    return results, load or {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiles", type=int, default=512, help="tiles per TorchServe measurement")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds, 64 tiles")
    parser.add_argument("--no-torchserve", action="store_true")
    parser.add_argument("--out", default=None, help=f"JSON file (default {RESULTS}; none quick)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tiles = 2, 64
    out = Path(args.out) if args.out else (None if args.quick else RESULTS)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    images = imagery()
    repeat = 2 if args.quick else 5
    result: dict[str, Any] = {
        "benchmark": "handler_decode",
        "date": time.strftime("%Y-%m-%d"),
        "conditions": {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "zstd": f"backports.zstd, libzstd {zstd.zstd_version}",
            "tiles_per_request": TILES_PER_REQUEST,
            "requests_in_flight": CONCURRENCY,
            "imagery": {k: [len(v), str(v.dtype), list(v.shape[1:])] for k, v in images.items()},
            "rounds": args.rounds,
            "tiles_per_measurement": args.tiles,
            "load_average_before": [round(v, 2) for v in load_before],
        },
        "bytes": measure_bytes(images, repeat),
        "decode": measure_decode(images, repeat),
    }  # fmt: skip
    if not args.no_torchserve:
        result["torchserve"], result["other_load"] = measure_torchserve(
            images, args.tiles, args.rounds
        )
    result["conditions"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
