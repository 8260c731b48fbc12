"""TorchServe handler serving any chipscale model: decodes ``.npy`` tiles, answers scores
(or a segmentation model's class masks), the model's metadata or a per-request refusal as
JSON. Loading, checks, scaling and sub-batching live in ``chipscale_runtime``, shared with
chipscale's in-process predictor.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import chipscale_runtime as rt
import numpy as np
import torch

try:  # zstd request bodies (Content-Encoding: zstd): the standard library from Python 3.14
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # the backport, in the model extra
    try:
        from backports import zstd  # type: ignore[import-not-found,no-redef,unused-ignore]
    except ImportError:  # a host without it refuses zstd bodies and does not advertise them
        zstd = None

log = logging.getLogger(__name__)

NPY_MAGIC = b"\x93NUMPY"
#: Request body encodings the handler decodes (``Content-Encoding``), besides ``identity``.
CONTENT_ENCODINGS: tuple[str, ...] = ("zstd",) if zstd is not None else ()
#: The most bytes a compressed body may expand to (a decompression bomb is refused with 413).
MAX_DECODED_BYTES = 2**30
#: numpy's own bound on a .npy header (``np.load``'s ``max_header_size``).
_MAX_HEADER = 10_000
#: zstd level of a segmentation answer's masks: 1.6 KB (smooth classes) to 4.6 KB (per-pixel
#: noise) a 256 x 256 tile instead of 64 KiB; docs/design.md 9.3, bench/mask_encoding.py.
MASK_ZSTD_LEVEL = 1
#: The request header listing the mask encodings a client decodes (``zstd, identity``);
#: without it a segmentation answer is zstd when this host has zstd.
MASK_ENCODINGS_HEADER = "x-chipscale-mask-encodings"
#: Defaults for the model-config ``handler:`` section.
DEFAULT_SUB_BATCH = 32
DEFAULT_CPU_THREADS = 1
#: Set (to 1) by the GPU hosts' TorchServe unit: a worker there must run on a GPU.
GPU_HOST_ENV = "CHIPSCALE_GPU_HOST"


def on_gpu_host() -> bool:
    """Whether this worker runs on a host that declared itself a GPU host."""
    return os.environ.get(GPU_HOST_ENV, "").strip().lower() not in ("", "0", "false", "no")


def worker_device(gpu_id: Any) -> str:
    """The device TorchServe gave this worker (``cuda:N``, or ``cpu`` without a ``gpu_id``).

    On a GPU host (:data:`GPU_HOST_ENV`) a worker with no ``gpu_id``, or with one torch cannot
    use, raises: serving silently on one CPU thread would look healthy and be ~100x slower.
    """
    if gpu_id is None:
        if on_gpu_host():
            raise rt.ModelRuntimeError(
                f"{GPU_HOST_ENV} is set but TorchServe gave this worker no gpu_id (it found no "
                "GPU: is nvidia-smi on its PATH, number_of_gpu 0?); refusing to serve on the CPU"
            )
        return "cpu"
    if not torch.cuda.is_available():
        if on_gpu_host():
            raise rt.ModelRuntimeError(
                f"TorchServe gave this worker gpu_id {gpu_id} but torch sees no CUDA device "
                f"(torch {torch.__version__}: a CPU build, or a driver too old for it); "
                "refusing to serve on the CPU"
            )
        log.warning("gpu_id %s given but CUDA is not available: serving on the CPU", gpu_id)
        return "cpu"
    return f"cuda:{int(gpu_id)}"


@dataclass(frozen=True, slots=True)
class HttpRefusal:
    """Why one request gets no scores: an HTTP status and a message for the caller."""

    status: int
    message: str

    def body(self) -> str:
        return json.dumps({"error": self.message, "status": self.status})


#: One request's answer: its scores (or masks) and the reasons of its tiles that have none.
_Outcome = tuple[np.ndarray, dict[int, str]]


def decode_tiles(body: Any, encoding: str | None = None) -> np.ndarray | HttpRefusal:
    """The tiles of one request body, always 4-D, or the reason they cannot be read.

    ``encoding`` is the request's ``Content-Encoding`` (``None`` or ``identity``: a plain
    ``.npy``). The array is a view over the (decoded) body: no copy of the pixels.
    """
    if not isinstance(body, bytes | bytearray):
        return HttpRefusal(
            400,
            f"the body was decoded by TorchServe as {type(body).__name__}: send tiles as "
            "a .npy file with Content-Type application/octet-stream",
        )
    if encoding:
        decoded = decompress(body, encoding)
        if isinstance(decoded, HttpRefusal):
            return decoded
        body = decoded
    if not body.startswith(NPY_MAGIC):
        return HttpRefusal(400, "the body is not a .npy file (numpy.save of the tile array)")
    try:
        tiles = npy_view(body)
    except Exception as exc:  # truncated, bad header, object dtype (pickles refused)...
        return HttpRefusal(400, f"the body is not a readable .npy array: {exc}")
    if tiles.ndim == 3:
        tiles = tiles[np.newaxis]
    if tiles.ndim != 4 or tiles.shape[0] == 0:
        return HttpRefusal(400, f"tiles must be (N, bands, size, size), N >= 1, got {tiles.shape}")
    return tiles


def npy_view(body: bytes | bytearray) -> np.ndarray:
    """The array of a ``.npy`` file held in ``body``, as a view over it (``np.frombuffer``).

    The header is read and checked by ``numpy.lib.format`` as ``np.load`` does (same errors);
    object arrays are refused, as ``np.load(allow_pickle=False)`` refuses them. Writable when
    ``body`` is (TorchServe hands over a ``bytearray``).
    """
    head = io.BytesIO(bytes(memoryview(body)[: _MAX_HEADER + 16]))
    version = np.lib.format.read_magic(head)
    if version == (1, 0):
        header = np.lib.format.read_array_header_1_0(head, max_header_size=_MAX_HEADER)
    elif version == (2, 0):
        header = np.lib.format.read_array_header_2_0(head, max_header_size=_MAX_HEADER)
    else:  # 3.0 (utf-8 field names: structured dtypes, refused later anyway): numpy reads it
        loaded: np.ndarray = np.load(io.BytesIO(body), allow_pickle=False)
        return loaded
    shape, fortran_order, dtype = header
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    offset = head.tell()
    count = int(np.prod(shape, dtype=np.int64))
    expected = count * dtype.itemsize
    if len(body) - offset < expected:
        raise ValueError(
            f"EOF: reading array data, expected {expected} bytes got {len(body) - offset}"
        )
    flat = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    if fortran_order:
        return flat.reshape(shape[::-1]).transpose()
    return flat.reshape(shape)


def decompress(body: bytes | bytearray, encoding: str) -> bytes | bytearray | HttpRefusal:
    """The ``.npy`` inside a body sent with ``Content-Encoding: encoding``, or the refusal:
    415 an encoding this host does not decode, 400 a corrupt or truncated stream, 413 one
    that expands past :data:`MAX_DECODED_BYTES`."""
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return body
    if name not in CONTENT_ENCODINGS:
        accepted = ", ".join(("identity", *CONTENT_ENCODINGS))
        return HttpRefusal(
            415, f"Content-Encoding {encoding!r} is not decoded here; accepted: {accepted}"
        )
    assert zstd is not None
    too_large = HttpRefusal(
        413, f"the zstd body expands past {MAX_DECODED_BYTES} bytes: send fewer tiles"
    )
    decompressor = zstd.ZstdDecompressor()
    try:
        declared = zstd.get_frame_info(body).decompressed_size  # None when not declared
        if declared is not None and declared > MAX_DECODED_BYTES:
            return too_large
        data: bytes = decompressor.decompress(body, max_length=MAX_DECODED_BYTES + 1)
    except zstd.ZstdError as exc:
        return HttpRefusal(400, f"the body is not a readable zstd stream: {exc}")
    if len(data) > MAX_DECODED_BYTES:
        return too_large
    if not decompressor.eof:
        return HttpRefusal(400, "the body is not a readable zstd stream: it is truncated")
    if decompressor.unused_data:
        return HttpRefusal(400, "the body holds data after its zstd frame (one frame a request)")
    return data


def content_encoding(context: Any, i: int) -> str | None:
    """The ``Content-Encoding`` header of request ``i`` (names are matched in any case)."""
    return request_header(context, i, "content-encoding")


def masks_in_zstd(context: Any, i: int) -> bool:
    """Whether request ``i``'s masks go as zstd: this host has it and the client decodes it
    (it lists ``zstd`` in :data:`MASK_ENCODINGS_HEADER`, or sends no such header)."""
    accepted = request_header(context, i, MASK_ENCODINGS_HEADER)
    listed = accepted is None or "zstd" in (e.strip().lower() for e in accepted.split(","))
    return zstd is not None and listed


def request_header(context: Any, i: int, name: str) -> str | None:
    """Header ``name`` (lower case) of request ``i``; names are matched in any case."""
    headers = getattr(context, "get_all_request_header", None)
    if headers is None:
        return None
    for key, value in (headers(i) or {}).items():
        if isinstance(value, str) and str(key).lower() == name:
            return value
    return None


class ChipscaleHandler:
    """One model per TorchServe worker; :meth:`handle` is called with each TorchServe batch.

    Wire protocol (``POST /predictions/NAME``, one request = one or more tiles):

    - request body: a ``.npy`` file (``numpy.save``, no pickles) of shape
      ``(N, bands, size, size)`` (or ``(bands, size, size)`` for one tile) in the source dtype,
      sent as ``application/octet-stream`` so TorchServe hands the bytes over untouched;
    - ``Content-Encoding: zstd`` (one zstd frame around that ``.npy``) when the metadata
      answer lists ``"zstd"`` in ``content_encodings``; the handler reads the array as a view
      over the body, with no copy of the pixels;
    - an empty body asks for the model's metadata (how a client learns bands and tile size)
      with this worker's ``worker`` (host, pid, gpu_host, device, inference settings) and
      the body encodings this host decodes (``content_encodings``);
    - answer 200: ``{"model", "version", "classes", "scores": [[...] per tile],
      "batch": {"requests", "tiles"}}``; ``batch`` says how many requests and tiles TorchServe's
      batcher put in the same handler call as this one; a tile the model answered NaN or inf for
      has ``null`` scores and its reason in ``"errors": {"ROW": reason}`` (never a ``NaN``
      literal, which is not JSON);
    - a segmentation model (metadata ``task``) answers ``"masks"`` instead of ``"scores"``:
      ``{"shape": [N, S, S], "dtype": "uint8", "encoding": "zstd" or "identity", "data":
      base64}``, the tiles' class indices (argmax of the central S x S) in one zstd frame
      unless the request's ``X-Chipscale-Mask-Encodings`` header leaves zstd out;
      a tile whose output held NaN or inf is all 255 with its reason in ``"errors"``;
    - errors are per request, JSON ``{"error": message, "status": code}``: 400 a body that is not
      a numeric ``.npy`` array of tiles (or a corrupt zstd stream), 413 a zstd body expanding
      past :data:`MAX_DECODED_BYTES`, 415 an encoding this host does not decode, 422 tiles that
      do not fit the model (bands, size, dtype),
      500 the model raised on this request's tiles, 507 out of memory (worth a retry). One bad
      request never fails the others TorchServe batched with it.

    TorchServe batches *requests* (``batchSize``); the handler stacks the good ones of a call and
    runs them through the model ``sub_batch`` tiles at a time (model-config ``handler.sub_batch``),
    on the GPU the worker was given, or the CPU. Kept thin on purpose: loading, checks, scaling
    and sub-batching live in ``chipscale_runtime``, shared with chipscale's in-process predictor.
    """

    def __init__(self) -> None:
        self.runtime: rt.ModelRuntime | None = None

    def initialize(self, context: Any) -> None:
        props = context.system_properties
        manifest = context.manifest
        config = (getattr(context, "model_yaml_config", None) or {}).get("handler", {}) or {}
        model_file = os.path.join(props["model_dir"], manifest["model"]["serializedFile"])
        device = worker_device(props.get("gpu_id"))
        threads = config.get("threads", DEFAULT_CPU_THREADS) if device == "cpu" else None
        self.runtime = rt.load_model(
            model_file,
            device,
            sub_batch=int(config.get("sub_batch", DEFAULT_SUB_BATCH)),
            threads=threads,
        )
        log.info("chipscale handler ready: %r", self.runtime)

    def metadata(self) -> str:
        """The answer to an empty body: the model's metadata and this worker's placement and
        settings (``worker``: host, pid, gpu_host, device, precision...)."""
        assert self.runtime is not None
        meta = self.runtime.metadata
        worker = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "gpu_host": on_gpu_host(),
            **self.runtime.settings(),
        }
        return json.dumps(
            {
                "model": meta.name,
                "version": meta.version,
                "metadata": meta.to_dict(),
                "worker": worker,
                "content_encodings": list(CONTENT_ENCODINGS),
            }
        )

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        """Answer every request of a TorchServe batch: scores, metadata or a rejection."""
        runtime = self.runtime
        assert runtime is not None, "handler used before initialize()"
        answers: list[str | HttpRefusal | None] = [None] * len(data)
        tiles: dict[int, np.ndarray] = {}
        for i, request in enumerate(data):
            body = request.get("body", request.get("data", b""))
            if body in (b"", None):
                answers[i] = self.metadata()
                continue
            decoded = decode_tiles(body, content_encoding(context, i))
            if isinstance(decoded, HttpRefusal):
                answers[i] = decoded
                continue
            try:
                runtime.check_batch(decoded)
            except rt.BatchShapeError as exc:
                answers[i] = HttpRefusal(422, str(exc))
                continue
            tiles[i] = decoded
        total = sum(len(t) for t in tiles.values())
        batch_info = {"requests": len(data), "tiles": total}
        for i, outcome in self._score(tiles).items():
            if isinstance(outcome, HttpRefusal):
                answers[i] = outcome
            elif runtime.metadata.task == "segmentation":
                answers[i] = self._masks_body(*outcome, batch_info, masks_in_zstd(context, i))
            else:
                answers[i] = self._scores_body(outcome[0], batch_info)
        if len(data) > 1 or any(isinstance(a, HttpRefusal) for a in answers):
            log.info(
                "batch of %d requests, %d tiles, %d rejected",
                len(data),
                total,
                sum(isinstance(a, HttpRefusal) for a in answers),
            )
        return [self._finish(context, i, answer) for i, answer in enumerate(answers)]

    def _score(self, tiles: dict[int, np.ndarray]) -> dict[int, _Outcome | HttpRefusal]:
        """Scores (or masks, with the reasons of the tiles that have none) per request: all
        stacked through the model at once, and only when that fails each request alone, so
        the request that breaks the model is the only one refused."""
        assert self.runtime is not None
        if not tiles:
            return {}
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, t in tiles.items():  # np.concatenate needs one dtype and band count
            groups.setdefault((t.dtype.str, t.shape[1:]), []).append(i)
        results: dict[int, _Outcome | HttpRefusal] = {}
        for members in groups.values():
            stacked = [tiles[i] for i in members]
            try:
                scores, failed = self._predict(
                    stacked[0] if len(stacked) == 1 else np.concatenate(stacked)
                )
            except Exception as exc:
                if len(members) == 1:
                    results[members[0]] = self._failure(exc)
                    continue
                for i in members:
                    results.update(self._score({i: tiles[i]}))
                continue
            offsets = np.cumsum([0] + [len(t) for t in stacked])
            for i, start, stop in zip(members, offsets[:-1], offsets[1:], strict=True):
                mine = {row - start: why for row, why in failed.items() if start <= row < stop}
                results[i] = (scores[start:stop], mine)
        return results

    def _predict(self, batch: np.ndarray) -> _Outcome:
        """The model's answer for a batch: ``(N, classes)`` scores, or a segmentation model's
        ``(N, S, S)`` masks and the reason of each tile that has none."""
        assert self.runtime is not None
        if self.runtime.metadata.task == "segmentation":
            return self.runtime.predict_masks(batch)
        return self.runtime.predict(batch), {}

    def _failure(self, exc: Exception) -> HttpRefusal:
        # TorchScript errors span pages with the cause on the last line; HTTP reason phrases
        # may not hold line breaks at all.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        text = f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:500]
        if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
            return HttpRefusal(507, f"out of memory running the model, retry smaller: {text}")
        log.warning("model raised on a request: %s", text)
        return HttpRefusal(500, f"the model raised on these tiles: {text}")

    def _scores_body(self, scores: np.ndarray, batch_info: dict[str, int]) -> str:
        """The 200 answer; a tile the model answered NaN or inf for gets ``null`` scores and
        its reason in ``errors`` (JSON has no NaN: the answer stays strict JSON)."""
        assert self.runtime is not None
        meta = self.runtime.metadata
        finite = np.isfinite(scores).all(axis=1)
        errors = {
            str(i): f"the model returned non-finite scores {scores[i].tolist()} for this tile"
            for i in np.flatnonzero(~finite)
        }
        if errors:
            log.warning("the model returned non-finite scores for %d tiles", len(errors))
        body: dict[str, Any] = {
            "model": meta.name,
            "version": meta.version,
            "classes": list(meta.classes),
            "scores": [
                row if ok else None for row, ok in zip(scores.tolist(), finite, strict=True)
            ],
            "batch": batch_info,
        }
        if errors:
            body["errors"] = errors
        return json.dumps(body, allow_nan=False)

    def _masks_body(
        self,
        masks: np.ndarray,
        failed: dict[int, str],
        batch_info: dict[str, int],
        compress: bool,
    ) -> str:
        """The 200 answer of a segmentation model: its masks (base64) in one zstd frame when
        ``compress``, and the reason of each tile whose output was not finite (mask all 255)."""
        assert self.runtime is not None
        meta = self.runtime.metadata
        raw = np.ascontiguousarray(masks, dtype=np.uint8).tobytes()
        data = zstd.compress(raw, level=MASK_ZSTD_LEVEL) if compress and zstd else raw
        if failed:
            log.warning("the model returned non-finite scores for %d tiles", len(failed))
        body: dict[str, Any] = {
            "model": meta.name,
            "version": meta.version,
            "classes": list(meta.classes),
            "masks": {
                "shape": list(masks.shape),
                "dtype": "uint8",
                "encoding": "zstd" if compress and zstd else "identity",
                "data": base64.b64encode(data).decode("ascii"),
            },
            "batch": batch_info,
        }
        if failed:
            body["errors"] = {str(row): why for row, why in sorted(failed.items())}
        return json.dumps(body)

    @staticmethod
    def _finish(context: Any, i: int, answer: str | HttpRefusal | None) -> str:
        context.set_response_content_type(i, "application/json")
        if isinstance(answer, HttpRefusal):
            phrase = " ".join(answer.message.split())[:200]
            context.set_response_status(answer.status, phrase, idx=i)
            return answer.body()
        assert answer is not None
        return answer


_service = ChipscaleHandler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[str] | None:
    """TorchServe's entry point: called once with ``None`` to load, then with each batch."""
    if data is None:
        _service.initialize(context)
        return None
    return _service.handle(data, context)
