"""The chipscale model runtime: model files (TorchScript ``.pt`` or ``torch.export`` ``.pt2``)
with their metadata inside, written, loaded and run on batches of tiles. Shared by the
TorchServe handler and chipscale's in-process predictor; imports nothing from ``chipscale``.

    save_torchscript(module, "landcover.pt", ModelMetadata(...))
    runtime = load_model("landcover.pt", device="auto")
    scores = runtime.predict(tiles)  # (N, 3, 256, 256) uint8 -> (N, 2) float32

A segmentation model (metadata ``"task": "segmentation"``) with a margin m takes
``(N, bands, S + 2m, S + 2m)`` and answers ``(N, S, S)`` uint8 class indices: the argmax over
the classes of the central S x S of its output (:meth:`ModelRuntime.predict_masks`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickletools
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

if (
    TYPE_CHECKING or __package__
):  # model_server.chipscale_runtime, in a checkout or an installed distribution
    from .chipscale_metadata import (
        DETECTION_NOT_YET,
        FLOAT_DTYPE_NAMES,
        INPUT_DTYPE_NAMES,
        MAX_SEGMENTATION_CLASSES,
        METADATA_FILE,
        METADATA_FORMAT,
        InferenceSettings,
        MetadataError,
        ModelFileError,
        ModelMetadata,
        ModelRuntimeError,
        Scaling,
        as_metadata,
    )
else:  # a flat module in TorchServe's model directory (the .mar), which is on sys.path
    from chipscale_metadata import (
        DETECTION_NOT_YET,
        FLOAT_DTYPE_NAMES,
        INPUT_DTYPE_NAMES,
        MAX_SEGMENTATION_CLASSES,
        METADATA_FILE,
        METADATA_FORMAT,
        InferenceSettings,
        MetadataError,
        ModelFileError,
        ModelMetadata,
        ModelRuntimeError,
        Scaling,
        as_metadata,
    )

__all__ = [
    "METADATA_FILE",
    "METADATA_FORMAT",
    "NO_CLASS",
    "BatchShapeError",
    "InferenceSettings",
    "MetadataError",
    "ModelFileError",
    "ModelMetadata",
    "ModelRuntime",
    "ModelRuntimeError",
    "Scaling",
    "load_model",
    "read_metadata",
    "resolve_device",
    "rewrite_metadata",
    "save_exported",
    "save_torchscript",
    "set_threads",
]

#: One line telling how to write a proper model file; every refusal ends with it.
EXPORT_HINT = (
    "export it with model_server.chipscale_runtime.save_torchscript(module, path, metadata) "
    "or save_exported(module, path, metadata, example)"
)

#: The torch dtype of each ``input_dtype`` name the metadata accepts.
FLOAT_DTYPES = {name: getattr(torch, name) for name in FLOAT_DTYPE_NAMES}
INPUT_DTYPES = {name: getattr(torch, name) for name in INPUT_DTYPE_NAMES}

log = logging.getLogger(__name__)

#: The class index of a pixel with no class in a uint8 segmentation mask (a tile whose output
#: was not finite; a pixel outside the source, once chipscale masks it).
NO_CLASS = MAX_SEGMENTATION_CLASSES

#: The autocast dtype of each ``inference.precision`` (fp32: no autocast).
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

#: numpy dtypes copied to the device as they are (uint16 moves 2 bytes a pixel and is widened
#: there, not on the CPU); any other goes through float32 first.
_TORCH_NATIVE = {
    np.dtype(t): getattr(torch, t)
    for t in ("uint8", "int8", "uint16", "int16", "int32", "float16", "float32", "float64")
}
# A batch read in place from a request body (the handler's np.frombuffer) is read-only; it is
# only ever read, so torch's warning about writing through it does not apply.
warnings.filterwarnings(
    "ignore", "The given NumPy array is not writable", UserWarning, module=__name__
)


class BatchShapeError(ModelRuntimeError, ValueError):
    """A batch of tiles does not have the shape or dtype the model's metadata asks for."""


def example_batch(metadata: ModelMetadata, n: int = 2) -> torch.Tensor:
    """A zero batch of the shape and dtype the model receives (after scaling)."""
    size = metadata.input_size
    return torch.zeros((n, metadata.bands, size, size), dtype=INPUT_DTYPES[metadata.input_dtype])


def save_torchscript(
    module: torch.nn.Module,
    path: str | os.PathLike[str],
    metadata: ModelMetadata | Mapping[str, Any],
    *,
    method: Literal["auto", "script", "trace"] = "auto",
    example: torch.Tensor | None = None,
) -> Path:
    """Save ``module`` as TorchScript with ``metadata`` inside; return the path.

    ``method``: ``"script"`` (torch.jit.script), ``"trace"`` (torch.jit.trace on ``example``,
    a zero batch from the metadata when omitted) or ``"auto"`` (an already scripted module as
    it is, else script, falling back to trace). The saved module is checked: it must map an
    example batch to ``(N, len(classes))`` (segmentation: ``(N, len(classes), S + 2m,
    S + 2m)``, the size of its input).
    """
    meta = as_metadata(metadata)
    module = module.eval()
    if example is None:
        example = example_batch(meta)
    if isinstance(module, torch.jit.ScriptModule):
        scripted = module
    elif method == "trace":
        scripted = _trace(module, example)
    else:
        try:
            scripted = torch.jit.script(module)
        except Exception:
            if method == "script":
                raise
            scripted = _trace(module, example)
    _check_output(scripted, example, meta)
    path = Path(path)
    torch.jit.save(scripted, str(path), _extra_files={METADATA_FILE: meta.to_json()})
    return path


def _trace(module: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with torch.inference_mode(False), torch.no_grad():
        return torch.jit.trace(module, (example,))


def save_exported(
    module: torch.nn.Module | torch.export.ExportedProgram,
    path: str | os.PathLike[str],
    metadata: ModelMetadata | Mapping[str, Any],
    example: torch.Tensor | None = None,
) -> Path:
    """Save ``module`` as a ``torch.export`` program (``.pt2``) with ``metadata`` inside.

    The batch dimension is exported dynamic (``torch.export.Dim``), so the saved program takes
    any N; ``example`` (a zero batch from the metadata when omitted) fixes bands and size. An
    ``ExportedProgram`` is saved as it is. Returns the path.
    """
    meta = as_metadata(metadata)
    if example is None:
        example = example_batch(meta)
    if isinstance(module, torch.export.ExportedProgram):
        program = module
    else:
        if example.shape[0] < 2:
            # An example batch of 1 would let export specialise N to 1.
            example = example.expand(2, *example.shape[1:]).contiguous()
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(
            module.eval(), (example,), dynamic_shapes=({0: batch},), strict=False
        )
    _check_output(program.module(), example, meta)
    path = Path(path)
    torch.export.save(program, str(path), extra_files={METADATA_FILE: meta.to_json()})
    return path


def _check_output(module: Any, example: torch.Tensor, meta: ModelMetadata) -> None:
    if meta.task == "detection":
        raise MetadataError(DETECTION_NOT_YET)
    with torch.inference_mode():
        out = module(example)
    expected, axes = meta.output_shape(example.shape[0])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise MetadataError(
            f"model returns {shape} for an example batch {tuple(example.shape)}, "
            f"expected {expected} {axes} for classes {list(meta.classes)}"
        )


def _archive_kind(path: Path) -> Literal["torchscript", "exported", "checkpoint"]:
    """Tell the kind of a PyTorch zip archive from its member names, without unpickling."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelFileError(
            f"{path} is not a PyTorch model file (not a zip archive); {EXPORT_HINT}"
        ) from exc
    tails = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if "archive_format" in tails or any(t.startswith("models/") for t in tails):
        return "exported"
    if any(t.startswith("code/") for t in tails) and "constants.pkl" in tails:
        return "torchscript"
    if "data.pkl" in tails:
        return "checkpoint"
    raise ModelFileError(f"{path} is a zip archive but not a PyTorch model file; {EXPORT_HINT}")


def _checkpoint_kind(path: Path) -> str:
    """Describe a ``torch.save`` pickle by the classes it names (read, never unpickled)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            data = archive.read(pkl)
        globals_seen = {
            str(arg)
            for op, arg, _ in pickletools.genops(io.BytesIO(data))
            if op.name in ("GLOBAL", "STACK_GLOBAL") and arg is not None
        }
        strings = {
            str(arg)
            for op, arg, _ in pickletools.genops(io.BytesIO(data))
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE")
        }
    except Exception:
        return "a torch.save checkpoint"
    if any("torch.nn.modules" in g for g in globals_seen) or {"_modules", "_parameters"} <= strings:
        return "a pickled nn.Module (torch.save(model))"
    return "a plain state_dict (torch.save(model.state_dict()))"


def read_metadata(path: str | os.PathLike[str]) -> ModelMetadata:
    """Read a model file's metadata without loading the model."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"Model file {path} not found")
    kind = _archive_kind(path)
    if kind == "checkpoint":
        raise ModelFileError(
            f"{path} is {_checkpoint_kind(path)}, not an exported model; {EXPORT_HINT}"
        )
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith(f"/extra/{METADATA_FILE}"):
                return ModelMetadata.from_json(archive.read(name))
    raise ModelFileError(f"{path} has no chipscale metadata ({METADATA_FILE}); {EXPORT_HINT}")


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; asking for CUDA without one is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelRuntimeError(f"device {device!s} asked for but CUDA is not available")
    return resolved


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op threads for this process (None leaves torch's default).

    One thread per worker measured best on a 2-core machine with several worker threads.
    """
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def load_model(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    sub_batch: int = 32,
    threads: int | None = None,
    inference: InferenceSettings | None = None,
) -> ModelRuntime:
    """Load a TorchScript or ``torch.export`` model file with its metadata.

    The kind is read from the file's content, not its name. A bare checkpoint (state_dict or
    pickled module), a file without chipscale metadata or a file that is no model raise
    :class:`ModelFileError` saying how to export the model. ``inference`` overrides the
    file's own settings (the drift check compares them); a CUDA device becomes the process's
    current device (``torch.cuda.set_device``).
    """
    path = Path(path)
    set_threads(threads)
    meta = read_metadata(path)  # refuses checkpoints and files without metadata
    kind = _archive_kind(path)
    settings = meta.inference if inference is None else inference
    check_settings(settings, kind, path)
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    try:
        if kind == "torchscript":
            module: Any = torch.jit.load(str(path), map_location=dev)
            module.eval()
        else:
            program = torch.export.load(str(path))
            if dev.type != "cpu":
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, dev)
            module = program.module()
    except ModelRuntimeError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{path} could not be loaded as a {kind} model: {exc}") from exc
    return ModelRuntime(
        module, meta, device=dev, sub_batch=sub_batch, kind=kind, path=path, inference=settings
    )


def check_settings(settings: InferenceSettings, kind: str, path: Path | None = None) -> None:
    """Refuse settings the file's kind cannot take (``freeze`` is TorchScript's, ``compile``
    is ``torch.export``'s) rather than silently ignore them."""
    problems = settings.problems()
    if settings.freeze and kind != "torchscript":
        problems.append("inference.freeze needs a TorchScript model (a .pt2 takes compile)")
    if settings.compile and kind != "exported":
        problems.append("inference.compile needs a torch.export (.pt2) model (TorchScript: freeze)")
    if problems:
        raise MetadataError(f"{path or 'model'}: " + "; ".join(problems))


def rewrite_metadata(
    path: str | os.PathLike[str], out: str | os.PathLike[str], metadata: ModelMetadata
) -> Path:
    """Write a copy of model file ``path`` to ``out`` with ``metadata`` inside instead."""
    path, out = Path(path), Path(out)
    kind = _archive_kind(path)
    check_settings(metadata.inference, kind, path)
    if kind == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu")
        torch.jit.save(module, str(out), _extra_files={METADATA_FILE: metadata.to_json()})
    elif kind == "exported":
        program = torch.export.load(str(path))
        torch.export.save(program, str(out), extra_files={METADATA_FILE: metadata.to_json()})
    else:
        raise ModelFileError(f"{path} is {_checkpoint_kind(path)}, not an exported model")
    return out


class ModelRuntime:
    """A loaded model and its metadata: checks, scales and runs batches of tiles.

    Thread safety: :meth:`predict` keeps no state between calls and the loaded module is only
    run, never changed, so several threads may call it at once (PyTorch runs TorchScript and
    exported modules concurrently for inference); each call's sub-batches are independent.
    ``torch.set_num_threads`` (see :func:`set_threads`) is process-wide.
    """

    def __init__(
        self,
        module: Any,
        metadata: ModelMetadata,
        *,
        device: str | torch.device = "cpu",
        sub_batch: int = 32,
        kind: Literal["torchscript", "exported", "checkpoint"] = "torchscript",
        path: Path | None = None,
        inference: InferenceSettings | None = None,
    ) -> None:
        if sub_batch < 1:
            raise ValueError(f"sub_batch must be >= 1, got {sub_batch}")
        if metadata.task == "detection":
            raise ModelFileError(f"{path or metadata.name}: {DETECTION_NOT_YET}")
        self.metadata = metadata
        self.device = resolve_device(device)
        self.sub_batch = sub_batch
        self.kind = kind
        self.path = path
        self.inference = metadata.inference if inference is None else inference
        self._dtype = INPUT_DTYPES[metadata.input_dtype]
        self._scale = self._scaling_tensors()
        self.frozen = self.compiled = False
        #: Why ``compile`` was asked for and not applied (the model then runs eagerly).
        self.compile_error = ""
        self.module = self._prepare(module)

    def _prepare(self, module: Any) -> Any:
        """Apply the inference settings to the loaded module; warm it up where that pays
        (CUDA: cuDNN's autotuning and lazy init; compile: the compilation itself)."""
        s = self.inference
        if s.cudnn_benchmark and self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # process-wide: one model per worker
        if s.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if s.freeze and self.kind == "torchscript":
            module = torch.jit.optimize_for_inference(torch.jit.freeze(module.eval()))
            self.frozen = True
        eager = module
        if s.compile and self.kind == "exported":
            try:
                module = torch.compile(module, dynamic=True)
                self.compiled = True
            except Exception as exc:  # no compiler, an unsupported op...
                self.compile_error = _one_line(exc)
        if self.device.type == "cuda" or self.compiled or self.frozen:
            self.module = module
            try:
                self._warm_up()
            except Exception as exc:
                if not self.compiled:
                    raise
                self.compile_error, self.compiled = _one_line(exc), False
                self.module = module = eager
        if self.compile_error:
            log.warning("torch.compile not applied, running eagerly: %s", self.compile_error)
        return module

    def _warm_up(self) -> None:
        """One full sub-batch through the model, so the first requests pay no set-up."""
        meta = self.metadata
        dtype = np.uint8 if meta.input_dtype == "uint8" else np.float32
        shape = (self.sub_batch, meta.bands, meta.input_size, meta.input_size)
        self.predict(np.zeros(shape, dtype=dtype))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def settings(self) -> dict[str, Any]:
        """How this runtime runs the model: device, precision and the other settings applied
        (what the TorchServe metadata answer reports)."""
        return {
            "device": str(self.device),
            **self.inference.to_dict(),
            "frozen": self.frozen,
            "compiled": self.compiled,
            "sub_batch": self.sub_batch,
        }

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"ModelRuntime({m.name!r} v{m.version}, {self.kind}, device={self.device}, "
            f"sub_batch={self.sub_batch}, precision={self.inference.precision})"
        )

    def _scaling_tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-band (multiplier, offset) so scaling is one fused ``x * a + b``."""
        s = self.metadata.scaling
        n = max(self.metadata.band_counts)
        if s.type == "divide":
            assert s.value is not None
            a, b = [1.0 / s.value] * n, [0.0] * n
        elif s.type == "normalize":
            mean = list(s.mean) * n if len(s.mean) == 1 else list(s.mean)
            std = list(s.std) * n if len(s.std) == 1 else list(s.std)
            a = [1.0 / (s.divide * sd) for sd in std[:n]]
            b = [-m / sd for m, sd in zip(mean[:n], std[:n], strict=True)]
        else:
            return None
        shape = (1, n, 1, 1)
        return (
            torch.tensor(a, dtype=torch.float32, device=self.device).reshape(shape),
            torch.tensor(b, dtype=torch.float32, device=self.device).reshape(shape),
        )

    def check_batch(self, batch: np.ndarray) -> None:
        """Raise :class:`BatchShapeError` unless ``batch`` is ``(N, bands, size, size)``, where
        size is ``tile_size + 2 * margin``."""
        meta = self.metadata
        if not isinstance(batch, np.ndarray):
            raise BatchShapeError(f"a batch must be a numpy array, got {type(batch).__name__}")
        if batch.ndim != 4:
            raise BatchShapeError(
                f"a batch must be (N, bands, size, size), got shape {batch.shape}"
            )
        if batch.dtype.kind not in "uif":
            raise BatchShapeError(f"a batch must hold numbers, got dtype {batch.dtype}")
        _, bands, height, width = batch.shape
        if bands not in meta.band_counts:
            accepted = " or ".join(str(b) for b in meta.band_counts)
            raise BatchShapeError(
                f"model {meta.name!r} takes {accepted} bands, got {bands} (batch {batch.shape})"
            )
        size = meta.input_size
        if (height, width) != (size, size):
            with_margin = f" ({meta.tile_size} + 2 x margin {meta.margin})" if meta.margin else ""
            raise BatchShapeError(
                f"model {meta.name!r} takes {size}x{size} tiles{with_margin}, "
                f"got {height}x{width} (batch {batch.shape})"
            )
        if meta.input_dtype == "uint8" and batch.dtype != np.uint8:
            raise BatchShapeError(f"model {meta.name!r} takes uint8 tiles, got {batch.dtype}")

    def preprocess(self, batch: np.ndarray) -> torch.Tensor:
        """Move a (checked) numpy batch to the device, cast and scale it."""
        x = to_device(batch, self.device)
        if self._scale is not None:
            a, b = self._scale
            c = x.shape[1]
            x = torch.addcmul(b[:, :c], x.to(torch.float32), a[:, :c])
        x = x.to(self._dtype)
        if self.inference.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _check_output(self, out: Any, n: int) -> torch.Tensor:
        expected, axes = self.metadata.output_shape(n)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelFileError(
                f"model {self.metadata.name!r} returned {shape}, expected {expected} {axes}"
            )
        return out

    def postprocess(self, out: Any, n: int) -> torch.Tensor:
        """A classification model's output for ``n`` tiles as ``(n, classes)`` float32 scores
        (a softmax over the classes for ``"logits"``)."""
        out = self._check_output(out, n).float()
        if self.metadata.output == "logits":
            out = torch.softmax(out, dim=1)
        return out

    def segment(self, out: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A segmentation model's output for ``n`` tiles as ``(n, S, S)`` uint8 class indices
        (the argmax over the classes of the central S x S; ``"logits"`` need no softmax, which
        keeps the argmax) and each tile's count of non-finite values in that crop."""
        out = self._check_output(out, n)
        m, s = self.metadata.margin, self.metadata.tile_size
        crop = out[:, :, m : m + s, m : m + s] if m else out
        # Counted only when the per-pixel sums say some value is not finite (a NaN or inf
        # makes its pixel's sum so): isfinite over every score costs 9x more on CPU.
        if bool(torch.isfinite(crop.sum(dim=1)).all()):
            bad = torch.zeros(crop.shape[0], dtype=torch.int64, device=crop.device)
        else:
            bad = (~torch.isfinite(crop)).flatten(1).sum(dim=1)
        # max(dim).indices, the first maximum as argmax: 8x faster than argmax on CPU (torch
        # 2.x, a crop of (N, 5, 256, 256) float32: 5 ms a tile against 43).
        return crop.max(dim=1).indices.to(torch.uint8), bad

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Score tiles: ``(N, bands, size, size)`` uint8/uint16/float -> ``(N, classes)``
        float32, run ``sub_batch`` tiles at a time under ``torch.inference_mode``.

        A segmentation model answers ``(N, S, S)`` uint8 class indices instead, a tile whose
        output was not finite all :data:`NO_CLASS` (:meth:`predict_masks` says which and why).
        """
        if self.metadata.task == "segmentation":
            return self.predict_masks(batch)[0]
        return self._run(batch)[0]

    def predict_masks(self, batch: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
        """A segmentation model's ``(N, S, S)`` uint8 class indices for ``(N, bands, S + 2m,
        S + 2m)`` tiles, and the reason for each tile whose output held NaN or inf in its
        central S x S (batch row -> reason): that tile's mask is all :data:`NO_CLASS`."""
        if self.metadata.task != "segmentation":
            raise ModelRuntimeError(f"model {self.metadata.name!r} is not a segmentation model")
        masks, bad = self._run(batch)
        masks[bad > 0] = NO_CLASS
        scores = f"{len(self.metadata.classes)}x{self.metadata.tile_size}x{self.metadata.tile_size}"
        return masks, {
            int(i): f"the model returned {bad[i]} non-finite values in the {scores} scores of "
            "this tile"
            for i in np.flatnonzero(bad)
        }

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The model's answer for a batch, ``sub_batch`` tiles at a time, and (segmentation)
        each tile's count of non-finite values (zeros for classification)."""
        self.check_batch(batch)
        n, s, step = batch.shape[0], self.metadata.tile_size, self.sub_batch
        segmentation = self.metadata.task == "segmentation"
        shape = (n, s, s) if segmentation else (n, len(self.metadata.classes))
        out = np.empty(shape, dtype=np.uint8 if segmentation else np.float32)
        bad = np.zeros(n, dtype=np.int64)
        with torch.inference_mode():
            x = self.preprocess(batch[:step]) if n else None
            for start in range(0, n, step):
                rows = slice(start, min(start + step, n))
                with self._autocast():
                    y = self.module(x)
                k = rows.stop - start
                answer, counts = (
                    self.segment(y, k) if segmentation else (self.postprocess(y, k), None)
                )
                if start + step < n:  # stage the next sub-batch while the GPU runs this one
                    x = self.preprocess(batch[start + step : start + 2 * step])
                out[rows] = answer.cpu().numpy()
                if counts is not None:
                    bad[rows] = counts.cpu().numpy()
        return out, bad

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = AUTOCAST_DTYPES.get(self.inference.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)


def to_device(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """``batch`` as a tensor on ``device`` in its own dtype (uint8 and uint16 move 4x and 2x
    fewer bytes than float32). On CUDA one copy stages it in pinned memory, so the copy to the
    GPU is asynchronous; on the CPU a contiguous batch is not copied at all."""
    if not batch.dtype.isnative:
        batch = batch.astype(batch.dtype.newbyteorder("="))
    if batch.dtype not in _TORCH_NATIVE:
        batch = batch.astype(np.float32)
    if device.type != "cuda":
        return torch.from_numpy(np.ascontiguousarray(batch))
    staged = torch.empty(batch.shape, dtype=_TORCH_NATIVE[batch.dtype], pin_memory=True)
    np.copyto(staged.numpy(), batch)
    return staged.to(device, non_blocking=True)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]
