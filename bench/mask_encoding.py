"""Segmentation answers: bytes per tile of each way to send a class mask from the TorchServe
handler to the client, and the CPU it costs; prints JSON.

Masks are real-looking: the demo land-cover heuristic (4 classes) on every fully valid
256 x 256 tile of the demo image (``rasterio_cogeo.tif`` at z18, its native resolution: 16
tiles) and of the NAIP scene (RGB+NIR, z17, near its 1 m: the first 256 tiles), in three
forms:

* ``blocks``: the argmax of its 4 x 4 pixel block scores, each block 16 pixels (coarse);
* ``smooth``: the block scores upsampled bilinearly, then the argmax (what a segmentation
  network at pixel resolution tends to give: smooth class boundaries);
* ``pixels``: the same heuristic run per pixel (block size 1: texture from the 3 x 3
  neighbourhood), the noisiest, as a per-pixel heuristic model gives.

Each is encoded 8 tiles at a time (the client's default request) as: raw uint8; zstd levels
1, 3 and 9 of the 8 tiles as one frame (``backports.zstd``, the production library); zstd
of each tile alone; PNG per tile (Pillow, default level 6); row-major run lengths (value
uint8 + length uint16 per run) alone and under zstd 3; 2-bit packing then zstd 3. Figures:
bytes per tile (mean over requests) and CPU microseconds per tile to encode and to decode.

Usage: ``python bench/mask_encoding.py [--quick] [--out FILE]``
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chipscale.models.demo_model import DemoLandcover  # noqa: E402
from chipscale.models.request_body import zstd  # noqa: E402
from chipscale.sources import read_tiles  # noqa: E402
from chipscale.sources.footprint import cover  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "mask_encoding.json"
DATA = Path(os.environ.get("CHIPSCALE_SHARED_DATA", ROOT.parent / "shared" / "data"))
TILES_PER_REQUEST = 8
SIZE = 256


#: Imagery (shared/data), the zoom of about its own resolution, and the most tiles used.
SOURCES = {
    "aerial": ("rasterio_cogeo.tif", 18, 16),
    "naip": ("naip_m_4709963_se_14_1_20200831.tif", 17, 256),
}


def masks(name: str, quick: bool) -> dict[str, np.ndarray]:
    """The three mask forms over a source's first fully valid tiles."""
    file, zoom, limit = SOURCES[name]
    src = str(DATA / file)
    read = read_tiles(src, list(cover(zoom, source=src))[: 4 * limit], size=SIZE)
    tiles = np.stack([im.data for _, im in read if im.mask.all()])[: 16 if quick else limit]
    model = DemoLandcover().eval()
    x = torch.from_numpy(tiles).float() / 255.0
    out: dict[str, list[np.ndarray]] = {"blocks": [], "smooth": [], "pixels": []}
    with torch.inference_mode():
        for chunk in torch.split(x, 16):
            blocks = model.block_scores(chunk)
            up = F.interpolate(blocks, scale_factor=model.block, mode="nearest")
            out["blocks"].append(up.argmax(1).to(torch.uint8).numpy())
            smooth = F.interpolate(blocks, size=(SIZE, SIZE), mode="bilinear")
            out["smooth"].append(smooth.argmax(1).to(torch.uint8).numpy())
            model.block = 1
            out["pixels"].append(model.block_scores(chunk).argmax(1).to(torch.uint8).numpy())
            model.block = 4
    return {name: np.concatenate(parts) for name, parts in out.items()}


def rle(tile: np.ndarray) -> bytes:
    """Row-major runs: a uint8 value and a uint16 length (minus one) per run, runs split at
    65536 pixels."""
    flat = tile.ravel()
    starts = np.flatnonzero(np.concatenate(([True], flat[1:] != flat[:-1])))
    lengths = np.diff(np.append(starts, flat.size))
    values, counts = [], []
    for start, length in zip(starts, lengths, strict=True):
        while length > 0:
            step = min(int(length), 65536)
            values.append(flat[start])
            counts.append(step - 1)
            length -= step
    runs = np.empty(len(values), dtype=[("v", "u1"), ("n", "<u2")])
    runs["v"], runs["n"] = values, counts
    return runs.tobytes()


def unrle(data: bytes) -> np.ndarray:
    runs = np.frombuffer(data, dtype=[("v", "u1"), ("n", "<u2")])
    return np.repeat(runs["v"], runs["n"].astype(np.int64) + 1).reshape(SIZE, SIZE)


def png(tile: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(tile, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def unpng(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def pack2(tiles: np.ndarray) -> bytes:
    return bytes(np.packbits(np.unpackbits(tiles[..., None], axis=-1)[..., 6:]))


def unpack2(data: bytes, n: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8)).reshape(n, SIZE, SIZE, 2)
    return (bits[..., 0] * 2 + bits[..., 1]).astype(np.uint8)


Codec = tuple[Callable[[np.ndarray], list[bytes]], Callable[[list[bytes], int], np.ndarray]]


def codecs() -> dict[str, Codec]:
    def whole(level: int) -> Codec:
        return (
            lambda t: [zstd.compress(t.tobytes(), level=level)],
            lambda b, n: np.frombuffer(zstd.decompress(b[0]), np.uint8).reshape(n, SIZE, SIZE),
        )

    return {
        "raw": (
            lambda t: [t.tobytes()],
            lambda b, n: np.frombuffer(b[0], np.uint8).reshape(n, SIZE, SIZE),
        ),
        "zstd1": whole(1),
        "zstd3": whole(3),
        "zstd9": whole(9),
        "zstd3_per_tile": (
            lambda t: [zstd.compress(tile.tobytes(), level=3) for tile in t],
            lambda b, n: np.stack(
                [np.frombuffer(zstd.decompress(x), np.uint8).reshape(SIZE, SIZE) for x in b]
            ),
        ),
        "png": (lambda t: [png(tile) for tile in t], lambda b, n: np.stack([unpng(x) for x in b])),
        "rle": (lambda t: [rle(tile) for tile in t], lambda b, n: np.stack([unrle(x) for x in b])),
        "rle_zstd3": (
            lambda t: [zstd.compress(rle(tile), level=3) for tile in t],
            lambda b, n: np.stack([unrle(zstd.decompress(x)) for x in b]),
        ),
        "pack2_zstd3": (
            lambda t: [zstd.compress(pack2(t), level=3)],
            lambda b, n: unpack2(zstd.decompress(b[0]), n),
        ),
    }


def measure(tiles: np.ndarray) -> dict[str, Any]:
    requests = [
        tiles[i : i + TILES_PER_REQUEST]
        for i in range(0, len(tiles) - TILES_PER_REQUEST + 1, TILES_PER_REQUEST)
    ]
    result: dict[str, Any] = {}
    for name, (encode, decode) in codecs().items():
        size = enc = dec = 0.0
        for request in requests:
            t0 = time.process_time()
            parts = encode(request)
            t1 = time.process_time()
            back = decode(parts, len(request))
            t2 = time.process_time()
            if not np.array_equal(back, request):
                raise AssertionError(f"{name} does not round-trip")
            size += sum(len(p) for p in parts)
            enc, dec = enc + t1 - t0, dec + t2 - t1
        count = len(requests) * TILES_PER_REQUEST
        result[name] = {
            "bytes_per_tile": round(size / count, 1),
            "encode_us_per_tile": round(enc / count * 1e6, 1),
            "decode_us_per_tile": round(dec / count * 1e6, 1),
        }
    chosen = result["zstd3"]["bytes_per_tile"]
    b64 = sum(len(base64.b64encode(zstd.compress(r.tobytes(), level=3))) for r in requests) / (
        len(requests) * TILES_PER_REQUEST
    )
    result["zstd3_base64_in_json"] = {
        "bytes_per_tile": round(b64, 1),
        "vs_zstd3": round(b64 / chosen, 3),
    }
    classes = np.bincount(tiles.ravel(), minlength=4) / tiles.size
    result["class_fractions"] = [round(float(c), 3) for c in classes]
    runs = [int(np.count_nonzero(t.ravel()[1:] != t.ravel()[:-1]) + 1) for t in tiles]
    result["runs_per_tile_median"] = int(np.median(runs))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 tiles, no results file")
    parser.add_argument("--out", default=None, help=f"JSON file (default {RESULTS})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    forms = {
        f"{source}/{form}": array
        for source in SOURCES
        for form, array in masks(source, args.quick).items()
    }
    result: dict[str, Any] = {
        "bench": "mask_encoding",
        "conditions": {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(),
            "tiles": {name: len(forms[f"{name}/blocks"]) for name in SOURCES},
            "tile": f"{SIZE}x{SIZE} uint8 class indices, 4 classes",
            "tiles_per_request": TILES_PER_REQUEST,
            "source": "demo heuristic on fully valid tiles: "
            + ", ".join(f"{name} {file} z{zoom}" for name, (file, zoom, _) in SOURCES.items()),
            "cpu": "process_time, one thread; load average before "
            + str([round(v, 2) for v in os.getloadavg()]),
        },
        "masks": {name: measure(tiles) for name, tiles in forms.items()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(args.out) if args.out else (None if args.quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
