"""The chipscale model runtime: model files with their metadata inside, loaded and run.

This module is shared by the TorchServe handler and chipscale's in-process predictor, so a
model behaves the same on a GPU host and on a laptop: metadata, input checks, input scaling
and sub-batching exist here once. It imports nothing from ``chipscale`` because it ships alone
inside the TorchServe ``.mar`` (whose directory is on ``sys.path``: hence the specific module
name).

A model file is a TorchScript module (``.pt``) or a ``torch.export`` program (``.pt2``; a
TorchScript successor, as TorchScript is deprecated in current PyTorch), taking a float (or
uint8, see ``input_dtype``) tensor ``(N, bands, size, size)`` and returning ``(N, classes)``
scores. Its metadata is a JSON document stored in the file itself under the name
``chipscale.json`` (TorchScript ``_extra_files``, torch.export ``extra_files``), so the file
is the one source of truth. Write files with :func:`save_torchscript` or
:func:`save_exported`; read them with :func:`load_model`::

    meta = ModelMetadata(name="landcover", version="3", classes=("snow", "forest"), bands=3,
                         tile_size=256, scaling=Scaling.divided_by(255))
    save_torchscript(module, "landcover.pt", meta)
    runtime = load_model("landcover.pt", device="auto")
    scores = runtime.predict(tiles)  # (N, 3, 256, 256) uint8 -> (N, 2) float32

Metadata schema (``chipscale.json``, format 1)::

    {
      "format": 1,                      # schema version of this document
      "name": "landcover",              # required
      "version": "3",                   # required, a string
      "classes": ["snow", "forest"],    # required, non-empty, unique
      "bands": 3,                       # required: channels the model expects by default
      "band_counts": [3, 4],            # optional: every accepted channel count (default [bands])
      "band_names": ["red", "green", "blue", "nir"],  # optional, >= max(band_counts) if given
      "tile_size": 256,                 # required: tiles are (tile_size, tile_size)
      "input_dtype": "float32",         # dtype handed to the model: float32|float16|bfloat16|
                                        # float64, or uint8 (then scaling must be none)
      "scaling": {"type": "divide", "value": 255},   # or "none", or
                 # {"type": "normalize", "mean": [...], "std": [...], "divide": 255}
                 # normalize computes (x / divide - mean[c]) / std[c]; mean and std hold one
                 # value for every band or a single value for all
      "output": "scores",               # "scores": returned as the model gives them
                                        # (probabilities, sigmoid scores...); "logits": the
                                        # runtime applies a softmax over the classes
      "description": "..."              # optional, free text
    }

Thread safety: :meth:`ModelRuntime.predict` keeps no state between calls and the loaded
modules are only run, never changed, so several threads may call it at once (PyTorch runs
TorchScript and exported modules concurrently for inference); each call's sub-batches are
independent. ``torch.set_num_threads`` (see :func:`set_threads`) is process-wide.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickletools
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "METADATA_FILE",
    "METADATA_FORMAT",
    "BatchShapeError",
    "MetadataError",
    "ModelFileError",
    "ModelMetadata",
    "ModelRuntime",
    "ModelRuntimeError",
    "Scaling",
    "load_model",
    "read_metadata",
    "resolve_device",
    "save_exported",
    "save_torchscript",
    "set_threads",
]

#: Name of the metadata document inside a model file.
METADATA_FILE = "chipscale.json"
#: Version of the metadata schema this runtime writes and reads.
METADATA_FORMAT = 1

#: One line telling how to write a proper model file; every refusal ends with it.
EXPORT_HINT = (
    "export it with model_server.chipscale_runtime.save_torchscript(module, path, metadata) "
    "or save_exported(module, path, metadata, example)"
)

FLOAT_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
INPUT_DTYPES = {**FLOAT_DTYPES, "uint8": torch.uint8}
OUTPUT_KINDS = ("scores", "logits")

#: numpy dtypes handed to torch as they are; any other dtype goes through float32 first.
_TORCH_NATIVE = {np.dtype(t) for t in ("uint8", "int8", "int16", "int32", "float32", "float64")}


class ModelRuntimeError(Exception):
    """Base class of the errors this runtime raises on purpose."""


class ModelFileError(ModelRuntimeError, ValueError):
    """A file is not a chipscale model (not a model at all, a bare checkpoint, no metadata)."""


class MetadataError(ModelFileError):
    """A model's metadata is missing fields or has invalid values."""


class BatchShapeError(ModelRuntimeError, ValueError):
    """A batch of tiles does not have the shape or dtype the model's metadata asks for."""


# ---------------------------------------------------------------------------------------------
# Metadata


@dataclass(frozen=True, slots=True)
class Scaling:
    """How raw pixel values become model input, applied by the runtime before the model.

    ``type`` is ``"none"`` (values as they are, cast to ``input_dtype``), ``"divide"``
    (``x / value``) or ``"normalize"`` (``(x / divide - mean[c]) / std[c]``).
    """

    type: Literal["none", "divide", "normalize"] = "none"
    value: float | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    divide: float = 1.0

    @classmethod
    def none(cls) -> Scaling:
        return cls("none")

    @classmethod
    def divided_by(cls, value: float) -> Scaling:
        """``x / value`` (e.g. 255 for 8-bit imagery)."""
        return cls("divide", value=float(value))

    @classmethod
    def normalized(
        cls, mean: Sequence[float], std: Sequence[float], divide: float = 1.0
    ) -> Scaling:
        """``(x / divide - mean[c]) / std[c]`` (e.g. ImageNet statistics with divide=255)."""
        return cls(
            "normalize",
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
            divide=float(divide),
        )

    def problems(self) -> list[str]:
        """What is wrong with these settings, one entry per problem (empty when valid)."""
        found: list[str] = []
        if self.type == "none":
            return found
        if self.type == "divide":
            if self.value is None or not _finite(self.value) or self.value == 0:
                found.append(f"scaling divide needs a non-zero number 'value', got {self.value!r}")
        elif self.type == "normalize":
            if not self.mean or len(self.mean) != len(self.std):
                found.append(
                    "scaling normalize needs 'mean' and 'std' lists of the same non-zero length"
                )
            if any(not _finite(v) for v in self.mean):
                found.append("scaling normalize 'mean' holds a value that is not a number")
            if any(not _finite(v) or v == 0 for v in self.std):
                found.append("scaling normalize 'std' holds zero or a value that is not a number")
            if not _finite(self.divide) or self.divide == 0:
                found.append(f"scaling normalize 'divide' must be non-zero, got {self.divide!r}")
        else:
            found.append(f"scaling type must be 'none', 'divide' or 'normalize', got {self.type!r}")
        return found

    def to_dict(self) -> dict[str, Any] | str:
        if self.type == "none":
            return "none"
        if self.type == "divide":
            return {"type": "divide", "value": self.value}
        return {
            "type": "normalize",
            "mean": list(self.mean),
            "std": list(self.std),
            "divide": self.divide,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str | None) -> Scaling:
        if data is None or data == "none":
            return cls.none()
        if isinstance(data, str):
            raise MetadataError(f"model metadata scaling must be 'none' or an object, got {data!r}")
        if not isinstance(data, Mapping):
            raise MetadataError(f"model metadata scaling must be an object, got {data!r}")
        kind = data.get("type", "none")
        try:
            if kind == "divide":
                value = data.get("value")
                return cls("divide", value=None if value is None else float(value))
            if kind == "normalize":
                return cls(
                    "normalize",
                    mean=tuple(float(v) for v in data.get("mean", ())),
                    std=tuple(float(v) for v in data.get("std", ())),
                    divide=float(data.get("divide", 1.0)),
                )
        except (TypeError, ValueError) as exc:
            raise MetadataError(f"model metadata scaling has a non-number: {data!r}") from exc
        return cls(kind)  # "none" or an unknown type that problems() reports


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """What a model file says about itself (the ``chipscale.json`` document, see module doc)."""

    name: str
    version: str
    classes: tuple[str, ...]
    bands: int
    tile_size: int
    band_counts: tuple[int, ...] = ()
    band_names: tuple[str, ...] = ()
    input_dtype: str = "float32"
    scaling: Scaling = field(default_factory=Scaling.none)
    output: Literal["scores", "logits"] = "scores"
    description: str = ""

    def __post_init__(self) -> None:
        # Accept lists from callers; store tuples so the value stays hashable and frozen.
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "band_counts", tuple(self.band_counts) or (self.bands,))
        object.__setattr__(self, "band_names", tuple(self.band_names))
        if isinstance(self.scaling, (Mapping, str)) or self.scaling is None:
            object.__setattr__(self, "scaling", Scaling.from_dict(self.scaling))
        problems = self.problems()
        if problems:
            raise MetadataError("invalid model metadata: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every rule this metadata breaks (empty when valid)."""
        found: list[str] = []
        if not isinstance(self.name, str) or not self.name.strip():
            found.append("'name' must be a non-empty string")
        if not isinstance(self.version, str) or not self.version.strip():
            found.append("'version' must be a non-empty string (e.g. \"1\")")
        if not self.classes or not all(isinstance(c, str) and c for c in self.classes):
            found.append("'classes' must be a non-empty list of class names")
        elif len(set(self.classes)) != len(self.classes):
            found.append(f"'classes' has duplicates: {list(self.classes)}")
        if not _positive_int(self.bands):
            found.append(f"'bands' must be a positive integer, got {self.bands!r}")
        if not all(_positive_int(b) for b in self.band_counts):
            found.append(f"'band_counts' must hold positive integers, got {self.band_counts!r}")
        elif _positive_int(self.bands) and self.bands not in self.band_counts:
            found.append(f"'band_counts' {list(self.band_counts)} must include 'bands'")
        counts_ok = all(_positive_int(b) for b in self.band_counts)
        if self.band_names and counts_ok and len(self.band_names) < max(self.band_counts):
            found.append(
                f"'band_names' names {len(self.band_names)} bands, "
                f"fewer than the {max(self.band_counts)} accepted"
            )
        if not _positive_int(self.tile_size):
            found.append(f"'tile_size' must be a positive integer, got {self.tile_size!r}")
        if self.input_dtype not in INPUT_DTYPES:
            found.append(
                f"'input_dtype' must be one of {sorted(INPUT_DTYPES)}, got {self.input_dtype!r}"
            )
        elif self.input_dtype not in FLOAT_DTYPES and self.scaling.type != "none":
            found.append(f"'input_dtype' {self.input_dtype} needs scaling 'none'")
        found.extend(self.scaling.problems())
        means = len(self.scaling.mean)
        if self.scaling.type == "normalize" and counts_ok and 1 < means < max(self.band_counts):
            found.append(
                f"scaling normalize has {means} means for up to {max(self.band_counts)} bands"
            )
        if self.output not in OUTPUT_KINDS:
            found.append(f"'output' must be one of {list(OUTPUT_KINDS)}, got {self.output!r}")
        return found

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": METADATA_FORMAT,
            "name": self.name,
            "version": self.version,
            "classes": list(self.classes),
            "bands": self.bands,
            "band_counts": list(self.band_counts),
            "tile_size": self.tile_size,
            "input_dtype": self.input_dtype,
            "scaling": self.scaling.to_dict(),
            "output": self.output,
            "description": self.description,
        }
        if self.band_names:
            data["band_names"] = list(self.band_names)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelMetadata:
        """Parse a metadata document; a missing or invalid field raises :class:`MetadataError`
        naming every problem at once."""
        if not isinstance(data, Mapping):
            raise MetadataError(f"model metadata must be a JSON object, got {type(data).__name__}")
        fmt = data.get("format", METADATA_FORMAT)
        if fmt != METADATA_FORMAT:
            raise MetadataError(
                f"model metadata format {fmt!r} is not supported by this runtime "
                f"(reads format {METADATA_FORMAT})"
            )
        required = ("name", "version", "classes", "bands", "tile_size")
        missing = [key for key in required if data.get(key) in (None, "", [])]
        if missing:
            raise MetadataError("model metadata is missing required fields: " + ", ".join(missing))
        known = {
            "format",
            *required,
            "band_counts",
            "band_names",
            "input_dtype",
            "scaling",
            "output",
            "description",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise MetadataError("model metadata has unknown fields: " + ", ".join(unknown))
        classes = data["classes"]
        if isinstance(classes, str) or not isinstance(classes, Sequence):
            raise MetadataError(f"'classes' must be a list of names, got {classes!r}")
        return cls(
            name=data["name"],
            version=str(data["version"]),
            classes=tuple(classes),
            bands=data["bands"],
            tile_size=data["tile_size"],
            band_counts=tuple(data.get("band_counts") or ()),
            band_names=tuple(data.get("band_names") or ()),
            input_dtype=data.get("input_dtype", "float32"),
            scaling=Scaling.from_dict(data.get("scaling")),
            output=data.get("output", "scores"),
            description=data.get("description", ""),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelMetadata:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise MetadataError(f"model metadata is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _as_metadata(metadata: ModelMetadata | Mapping[str, Any]) -> ModelMetadata:
    if isinstance(metadata, ModelMetadata):
        return metadata
    return ModelMetadata.from_dict(metadata)


# ---------------------------------------------------------------------------------------------
# Saving


def example_batch(metadata: ModelMetadata, n: int = 2) -> torch.Tensor:
    """A zero batch of the shape and dtype the model receives (after scaling)."""
    size = metadata.tile_size
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
    example batch to ``(N, len(classes))``.
    """
    meta = _as_metadata(metadata)
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
    meta = _as_metadata(metadata)
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
    with torch.inference_mode():
        out = module(example)
    expected = (example.shape[0], len(meta.classes))
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise MetadataError(
            f"model returns {shape} for an example batch {tuple(example.shape)}, "
            f"expected {expected} (N, len(classes)) for classes {list(meta.classes)}"
        )


# ---------------------------------------------------------------------------------------------
# Loading


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
) -> ModelRuntime:
    """Load a TorchScript or ``torch.export`` model file with its metadata.

    The kind is read from the file's content, not its name. A bare checkpoint (state_dict or
    pickled module), a file without chipscale metadata or a file that is no model raise
    :class:`ModelFileError` saying how to export the model.
    """
    path = Path(path)
    set_threads(threads)
    meta = read_metadata(path)  # refuses checkpoints and files without metadata
    kind = _archive_kind(path)
    dev = resolve_device(device)
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
    return ModelRuntime(module, meta, device=dev, sub_batch=sub_batch, kind=kind, path=path)


# ---------------------------------------------------------------------------------------------
# Running


class ModelRuntime:
    """A loaded model and its metadata: checks, scales and runs batches of tiles."""

    def __init__(
        self,
        module: Any,
        metadata: ModelMetadata,
        *,
        device: str | torch.device = "cpu",
        sub_batch: int = 32,
        kind: Literal["torchscript", "exported"] = "torchscript",
        path: Path | None = None,
    ) -> None:
        if sub_batch < 1:
            raise ValueError(f"sub_batch must be >= 1, got {sub_batch}")
        self.module = module
        self.metadata = metadata
        self.device = resolve_device(device)
        self.sub_batch = sub_batch
        self.kind = kind
        self.path = path
        self._dtype = INPUT_DTYPES[metadata.input_dtype]
        self._scale = self._scaling_tensors()

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"ModelRuntime({m.name!r} v{m.version}, {self.kind}, device={self.device}, "
            f"sub_batch={self.sub_batch})"
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
        """Raise :class:`BatchShapeError` unless ``batch`` is ``(N, bands, size, size)``."""
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
        if (height, width) != (meta.tile_size, meta.tile_size):
            raise BatchShapeError(
                f"model {meta.name!r} takes {meta.tile_size}x{meta.tile_size} tiles, "
                f"got {height}x{width} (batch {batch.shape})"
            )
        if meta.input_dtype == "uint8" and batch.dtype != np.uint8:
            raise BatchShapeError(f"model {meta.name!r} takes uint8 tiles, got {batch.dtype}")

    def preprocess(self, batch: np.ndarray) -> torch.Tensor:
        """Move a (checked) numpy batch to the device, cast and scale it."""
        if batch.dtype not in _TORCH_NATIVE:
            batch = batch.astype(np.float32)  # uint16, uint32, float16...: via float32
        # Copy to the device in the source dtype (uint8 moves 4x fewer bytes than float32).
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
        if self._scale is not None:
            a, b = self._scale
            c = x.shape[1]
            x = torch.addcmul(b[:, :c], x.to(torch.float32), a[:, :c])
        return x.to(self._dtype)

    def postprocess(self, out: Any, n: int) -> torch.Tensor:
        expected = (n, len(self.metadata.classes))
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelFileError(
                f"model {self.metadata.name!r} returned {shape}, expected {expected} "
                f"(N, len(classes))"
            )
        out = out.float()
        if self.metadata.output == "logits":
            out = torch.softmax(out, dim=1)
        return out

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Score tiles: ``(N, bands, size, size)`` uint8/uint16/float -> ``(N, classes)``
        float32, run ``sub_batch`` tiles at a time under ``torch.inference_mode``."""
        self.check_batch(batch)
        n = batch.shape[0]
        out = np.empty((n, len(self.metadata.classes)), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, n, self.sub_batch):
                chunk = batch[start : start + self.sub_batch]
                scores = self.postprocess(self.module(self.preprocess(chunk)), len(chunk))
                out[start : start + len(chunk)] = scores.cpu().numpy()
        return out
