"""TorchServe handler serving any chipscale model: decodes ``.npy`` tiles, answers scores,
the model's metadata or a per-request refusal as JSON. Loading, checks, scaling and
sub-batching live in ``chipscale_runtime``, shared with chipscale's in-process predictor.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import chipscale_runtime as rt
import numpy as np
import torch

log = logging.getLogger(__name__)

NPY_MAGIC = b"\x93NUMPY"
#: Defaults for the model-config ``handler:`` section.
DEFAULT_SUB_BATCH = 32
DEFAULT_CPU_THREADS = 1


@dataclass(frozen=True, slots=True)
class HttpRefusal:
    """Why one request gets no scores: an HTTP status and a message for the caller."""

    status: int
    message: str

    def body(self) -> str:
        return json.dumps({"error": self.message, "status": self.status})


def decode_tiles(body: Any) -> np.ndarray | HttpRefusal:
    """The tiles of one request body, always 4-D, or the reason they cannot be read."""
    if not isinstance(body, bytes | bytearray):
        return HttpRefusal(
            400,
            f"the body was decoded by TorchServe as {type(body).__name__}: send tiles as "
            "a .npy file with Content-Type application/octet-stream",
        )
    if not body.startswith(NPY_MAGIC):
        return HttpRefusal(400, "the body is not a .npy file (numpy.save of the tile array)")
    try:
        tiles = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:  # truncated, bad header, object dtype (pickles refused)...
        return HttpRefusal(400, f"the body is not a readable .npy array: {exc}")
    if tiles.ndim == 3:
        tiles = tiles[np.newaxis]
    if tiles.ndim != 4 or tiles.shape[0] == 0:
        return HttpRefusal(400, f"tiles must be (N, bands, size, size), N >= 1, got {tiles.shape}")
    return tiles


class ChipscaleHandler:
    """One model per TorchServe worker; :meth:`handle` is called with each TorchServe batch.

    Wire protocol (``POST /predictions/NAME``, one request = one or more tiles):

    - request body: a ``.npy`` file (``numpy.save``, no pickles) of shape
      ``(N, bands, size, size)`` (or ``(bands, size, size)`` for one tile) in the source dtype,
      sent as ``application/octet-stream`` so TorchServe hands the bytes over untouched;
    - an empty body asks for the model's metadata (how a client learns bands and tile size);
    - answer 200: ``{"model", "version", "classes", "scores": [[...] per tile],
      "batch": {"requests", "tiles"}}``; ``batch`` says how many requests and tiles TorchServe's
      batcher put in the same handler call as this one; a tile the model answered NaN or inf for
      has ``null`` scores and its reason in ``"errors": {"ROW": reason}`` (never a ``NaN``
      literal, which is not JSON);
    - errors are per request, JSON ``{"error": message, "status": code}``: 400 a body that is not
      a numeric ``.npy`` array of tiles, 422 tiles that do not fit the model (bands, size, dtype),
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
        gpu_id = props.get("gpu_id")
        device = f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu"
        threads = config.get("threads", DEFAULT_CPU_THREADS) if device == "cpu" else None
        self.runtime = rt.load_model(
            model_file,
            device,
            sub_batch=int(config.get("sub_batch", DEFAULT_SUB_BATCH)),
            threads=threads,
        )
        log.info("chipscale handler ready: %r", self.runtime)

    def metadata(self) -> str:
        assert self.runtime is not None
        meta = self.runtime.metadata
        return json.dumps({"model": meta.name, "version": meta.version, "metadata": meta.to_dict()})

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
            decoded = decode_tiles(body)
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
            else:
                answers[i] = self._scores_body(outcome, batch_info)
        if len(data) > 1 or any(isinstance(a, HttpRefusal) for a in answers):
            log.info(
                "batch of %d requests, %d tiles, %d rejected",
                len(data),
                total,
                sum(isinstance(a, HttpRefusal) for a in answers),
            )
        return [self._finish(context, i, answer) for i, answer in enumerate(answers)]

    def _score(self, tiles: dict[int, np.ndarray]) -> dict[int, np.ndarray | HttpRefusal]:
        """Scores per request: all stacked through the model at once, and only when that fails
        each request alone, so the request that breaks the model is the only one refused."""
        assert self.runtime is not None
        if not tiles:
            return {}
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, t in tiles.items():  # np.concatenate needs one dtype and band count
            groups.setdefault((t.dtype.str, t.shape[1:]), []).append(i)
        results: dict[int, np.ndarray | HttpRefusal] = {}
        for members in groups.values():
            stacked = [tiles[i] for i in members]
            try:
                scores = self.runtime.predict(
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
                results[i] = scores[start:stop]
        return results

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
