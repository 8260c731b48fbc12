"""The Predictor port and its in-process adapter.

A predictor turns a batch of tiles ``(N, bands, size, size)`` into ``(N, classes)`` float32
scores, or for a segmentation model (``info.task``) with margin m, ``(N, bands, S + 2m,
S + 2m)`` into ``(N, S, S)`` uint8 class indices (255: no class). The worker only sees this
port; :func:`open_predictor` picks the adapter from a spec (the demo model, a model file, a
TorchServe URL). The in-process adapter runs
``model_server.chipscale_runtime``, the same code the TorchServe handler runs, so input
checks, scaling and sub-batching behave alike in both.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from chipscale.errors import (
    ChipscaleError,
    ModelFormatError,
    PartialPrediction,
    PredictorUnavailable,
)
from chipscale.models.model_info import model_info
from chipscale.values import ModelInfo

#: Where the bundled demo model lives in a source checkout.
DEMO_MODEL_PATH = Path(__file__).resolve().parents[2] / "examples" / "demo-model.pt"

_demo_lock = threading.Lock()


@runtime_checkable
class Predictor(Protocol):
    """Scores batches of tiles with one model."""

    info: ModelInfo

    def predict(self, batch: np.ndarray, *, deadline: float | None = None) -> np.ndarray:
        """``(N, bands, size, size)`` in the source dtype -> ``(N, classes)`` float32 scores;
        a segmentation model: ``(N, S, S)`` uint8 class indices of the tiles' central S x S
        (size is ``S + 2 * info.margin``).

        ``deadline`` is a :func:`time.monotonic` instant a remote predictor must answer by; an
        in-process model has no network to wait on and ignores it.

        Raises :class:`~chipscale.errors.PredictorUnavailable` for transient failures and
        :class:`~chipscale.errors.ModelFormatError` when the batch does not fit the model or
        the model's output does not fit its metadata (its text names both shapes).
        :class:`~chipscale.errors.PartialPrediction` carries the answers of the tiles that
        have one when others have none: a segmentation tile whose scores were not finite (its
        mask is all 255), a tile a server refused.
        """
        ...

    def close(self) -> None:
        """Release the model; the predictor is unusable afterwards."""
        ...


class InProcessPredictor:
    """Runs a model file in this process with ``model_server.chipscale_runtime``.

    ``device`` is ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available);
    ``sub_batch`` is how many tiles go through the model at once; ``threads`` sets torch's
    intra-op threads for the whole process (one per worker measured best on 2 cores).

    Thread safety: ``predict`` may be called from several threads at once. The runtime keeps
    no per-call state and PyTorch runs a loaded module concurrently for inference, so calls
    are not serialised (a lock would make a thread pool of workers no faster than one).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "cpu",
        sub_batch: int = 32,
        threads: int | None = None,
    ) -> None:
        from model_server import chipscale_runtime as rt

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFormatError(f"Model file {self.path} not found")
        try:
            self.runtime: Any = rt.load_model(
                self.path, device, sub_batch=sub_batch, threads=threads
            )
        except rt.ModelFileError as exc:
            raise ModelFormatError(str(exc)) from exc
        except rt.ModelRuntimeError as exc:  # e.g. CUDA asked for and missing
            raise ChipscaleError(str(exc)) from exc
        meta = self.runtime.metadata
        self.metadata = meta
        self.info = model_info(meta.to_dict())

    def __repr__(self) -> str:
        return f"InProcessPredictor({str(self.path)!r}, {self.runtime!r})"

    def predict(self, batch: np.ndarray, *, deadline: float | None = None) -> np.ndarray:
        from model_server import chipscale_runtime as rt

        runtime = self.runtime
        if runtime is None:
            raise ChipscaleError(f"predictor for {self.path} is closed")
        try:
            if runtime.metadata.task != "segmentation":
                return runtime.predict(batch)
            masks, failed = runtime.predict_masks(batch)
        except (rt.BatchShapeError, rt.ModelFileError) as exc:
            # Permanent: tiles that can never fit this model (wrong bands or size), or a model
            # that broke its contract (output shape).
            raise ModelFormatError(str(exc)) from exc
        except MemoryError as exc:
            raise PredictorUnavailable(f"out of memory running {self.info.name}: {exc}") from exc
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():  # torch.OutOfMemoryError and CPU OOM
                raise PredictorUnavailable(
                    f"out of memory running {self.info.name} (lower sub_batch): {exc}"
                ) from exc
            raise
        if failed:  # as the TorchServe adapter does: the other tiles keep their masks
            raise PartialPrediction(masks, failed)
        return masks

    def close(self) -> None:
        self.runtime = None

    def __enter__(self) -> InProcessPredictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def demo_model_path() -> Path:
    """The demo model file, built with :func:`chipscale.models.demo_model.build` if missing or
    stale.

    Lives at ``<repo>/examples/demo-model.pt``; where that directory is not writable (an
    installed package) it is built into the user cache directory instead.
    """
    from chipscale.models import demo_model

    candidates = [DEMO_MODEL_PATH, _user_cache_dir() / "demo-model.pt"]
    with _demo_lock:
        for path in candidates:
            if path.is_file() and _demo_is_current(path, demo_model.VERSION):
                return path
        for path in candidates:
            if _writable(path.parent):
                return demo_model.build(path)
    raise ChipscaleError(
        f"cannot build the demo model: none of {[str(p.parent) for p in candidates]} is writable"
    )


def _demo_is_current(path: Path, version: str) -> bool:
    from model_server import chipscale_runtime as rt

    try:
        return rt.read_metadata(path).version == version
    except rt.ModelRuntimeError:
        return False


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chipscale"


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


def read_model_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata inside a model file as a plain dict, without loading the model."""
    from model_server import chipscale_runtime as rt

    try:
        return rt.read_metadata(path).to_dict()
    except rt.ModelFileError as exc:
        raise ModelFormatError(str(exc)) from exc


def open_predictor(spec: str | os.PathLike[str] | None = None, **kwargs: Any) -> Predictor:
    """Open the predictor a spec names; ``kwargs`` go to the adapter (device, sub_batch...).

    - ``None``: the bundled demo model (``examples/demo-model.pt``, built on first use);
    - a path: :class:`InProcessPredictor` on that TorchScript or ``.pt2`` file;
    - an ``http(s)://`` URL: a TorchServe endpoint
      (:class:`~chipscale.models.torchserve_client.TorchServePredictor`).
    """
    if spec is None:
        return InProcessPredictor(demo_model_path(), **kwargs)
    text = os.fspath(spec)
    if text.startswith(("http://", "https://")):
        return _open_remote(text, **kwargs)
    if "://" in text:
        raise ChipscaleError(
            f"model {text!r}: only local files and http(s) TorchServe endpoints are supported; "
            "download the file first"
        )
    return InProcessPredictor(text, **kwargs)


def _open_remote(url: str, **kwargs: Any) -> Predictor:
    """A :class:`~chipscale.models.torchserve_client.TorchServePredictor` on a TorchServe URL.

    ``device``, ``sub_batch`` and ``threads`` tune an in-process model; on an endpoint they are
    the server's business (its model-config), so they are ignored here. Imported lazily, and
    torch-free, so the Lambda bundle can open an endpoint.
    """
    from chipscale.models.torchserve_client import TorchServePredictor

    for in_process_only in ("device", "sub_batch", "threads"):
        kwargs.pop(in_process_only, None)
    return TorchServePredictor(url, **kwargs)
