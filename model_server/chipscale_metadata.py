"""The metadata a chipscale model file carries (``chipscale.json``): :class:`ModelMetadata`
and its :class:`Scaling`, parsed and checked. Imports neither torch nor ``chipscale``: it
ships in the TorchServe ``.mar`` beside ``chipscale_runtime``."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "DETECTION_NOT_YET",
    "FLOAT_DTYPE_NAMES",
    "INPUT_DTYPE_NAMES",
    "KNOWN_FIELDS",
    "MAX_SEGMENTATION_CLASSES",
    "METADATA_FILE",
    "METADATA_FORMAT",
    "OUTPUT_KINDS",
    "PRECISIONS",
    "TASKS",
    "InferenceSettings",
    "MetadataError",
    "ModelFileError",
    "ModelMetadata",
    "ModelRuntimeError",
    "Scaling",
    "as_metadata",
]

#: Name of the metadata document inside a model file.
METADATA_FILE = "chipscale.json"
#: Version of the metadata schema this runtime writes and reads.
METADATA_FORMAT = 1
#: ``input_dtype`` values: the float dtypes, and uint8 (which needs scaling "none").
FLOAT_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
INPUT_DTYPE_NAMES = (*FLOAT_DTYPE_NAMES, "uint8")
OUTPUT_KINDS = ("scores", "logits")
#: ``inference.precision`` values: fp32 runs the model as exported; fp16/bf16 under autocast.
PRECISIONS = ("fp32", "fp16", "bf16")
#: ``task`` values: scores per tile (the default), a class per pixel, boxes (not yet run).
TASKS = ("classification", "segmentation", "detection")
#: A segmentation mask is uint8 and 255 means "no class": at most 255 classes.
MAX_SEGMENTATION_CLASSES = 255
#: What loading or saving a detection model says until its runtime exists.
DETECTION_NOT_YET = (
    "detection models (metadata task 'detection') are not yet supported by this runtime: "
    "classification and segmentation are"
)
#: Every field a metadata document may hold (any other is refused).
KNOWN_FIELDS = (
    "format",
    "name",
    "version",
    "classes",
    "bands",
    "band_counts",
    "band_names",
    "tile_size",
    "input_dtype",
    "scaling",
    "output",
    "description",
    "inference",
    "task",
    "margin",
    "background",
)


class ModelRuntimeError(Exception):
    """Base class of the errors this runtime raises on purpose."""


class ModelFileError(ModelRuntimeError, ValueError):
    """A file is not a chipscale model (not a model at all, a bare checkpoint, no metadata)."""


class MetadataError(ModelFileError):
    """A model's metadata is missing fields or has invalid values."""


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
class InferenceSettings:
    """How the runtime runs the model (metadata ``inference``); the defaults are the model as
    exported, in fp32. See docs/design.md section 9.3 for what each buys.

    ``precision`` fp16/bf16 runs the forward under ``torch.autocast``; ``channels_last`` puts
    weights and input in NHWC; ``cudnn_benchmark`` lets cuDNN time its algorithms (CUDA only,
    with a warm-up at load); ``freeze`` applies ``torch.jit.freeze`` and
    ``optimize_for_inference`` (TorchScript only); ``compile`` applies ``torch.compile``
    (``.pt2`` only, falling back to eager, and saying so, when it cannot compile).
    """

    precision: str = "fp32"
    channels_last: bool = False
    cudnn_benchmark: bool = False
    freeze: bool = False
    compile: bool = False

    def problems(self) -> list[str]:
        found: list[str] = []
        if self.precision not in PRECISIONS:
            found.append(
                f"'inference.precision' must be one of {list(PRECISIONS)}, got {self.precision!r}"
            )
        for flag in ("channels_last", "cudnn_benchmark", "freeze", "compile"):
            if not isinstance(getattr(self, flag), bool):
                found.append(f"'inference.{flag}' must be true or false")
        if self.freeze is True and self.compile is True:
            found.append("'inference.freeze' (TorchScript) and 'compile' (.pt2) exclude each other")
        return found

    def is_default(self) -> bool:
        return self == InferenceSettings()

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "channels_last": self.channels_last,
            "cudnn_benchmark": self.cudnn_benchmark,
            "freeze": self.freeze,
            "compile": self.compile,
        }

    @classmethod
    def from_dict(cls, data: Any) -> InferenceSettings:
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise MetadataError(f"model metadata 'inference' must be an object, got {data!r}")
        unknown = sorted(set(data) - set(cls().to_dict()))
        if unknown:
            raise MetadataError(
                "model metadata 'inference' has unknown fields: " + ", ".join(unknown)
            )
        return cls(**data)  # ModelMetadata reports its problems with the others


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """What a model file says about itself: the ``chipscale.json`` document.

    Metadata schema (``chipscale.json``, format 1)::

        {
          "format": 1,                      # schema version of this document
          "name": "landcover",              # required
          "version": "3",                   # required, a string
          "classes": ["snow", "forest"],    # required, non-empty, unique
          "bands": 3,                       # required: channels the model expects by default
          "band_counts": [3, 4],            # optional: every accepted channel count
                                            # (default [bands])
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
          "description": "...",             # optional, free text
          "inference": {"precision": "bf16", "channels_last": true}  # optional, how the runtime
                     # runs it (InferenceSettings; default fp32, as exported): precision
                     # fp32|fp16|bf16, channels_last, cudnn_benchmark, freeze, compile
          "task": "segmentation",           # optional: "classification" (default; output
                                            # (N, classes)), "segmentation" (output (N, classes,
                                            # S + 2 margin, S + 2 margin): per-pixel scores or
                                            # logits; at most 255 classes) or "detection"
                                            # (known, not yet run)
          "margin": 16,                     # optional, default 0: pixels of context read on
                                            # each side; the model takes S + 2 margin square
          "background": "other"             # optional, a class never vectorized
                                            # (segmentation and detection only)
        }

    Fields left at their defaults (``task``, ``margin``, ``background``, ``inference``) are not
    written, so files made before them stay byte-for-byte the same.
    """

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
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    task: Literal["classification", "segmentation", "detection"] = "classification"
    margin: int = 0
    background: str | None = None

    @property
    def input_size(self) -> int:
        """The side of the square the model takes: ``tile_size + 2 * margin``."""
        return self.tile_size + 2 * self.margin

    def output_shape(self, n: int) -> tuple[tuple[int, ...], str]:
        """The output shape the model must return for ``n`` tiles, and its axes in words."""
        if self.task == "segmentation":
            size, m = self.input_size, self.margin
            side = f"{self.tile_size} + 2 x margin {m}" if m else "tile_size"
            return (n, len(self.classes), size, size), f"(N, len(classes), {side}, {side})"
        return (n, len(self.classes)), "(N, len(classes))"

    def __post_init__(self) -> None:
        # Accept lists from callers; store tuples so the value stays hashable and frozen.
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "band_counts", tuple(self.band_counts) or (self.bands,))
        object.__setattr__(self, "band_names", tuple(self.band_names))
        if isinstance(self.scaling, (Mapping, str)) or self.scaling is None:
            object.__setattr__(self, "scaling", Scaling.from_dict(self.scaling))
        if not isinstance(self.inference, InferenceSettings):
            object.__setattr__(self, "inference", InferenceSettings.from_dict(self.inference))
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
        if self.input_dtype not in INPUT_DTYPE_NAMES:
            found.append(
                f"'input_dtype' must be one of {sorted(INPUT_DTYPE_NAMES)}, "
                f"got {self.input_dtype!r}"
            )
        elif self.input_dtype not in FLOAT_DTYPE_NAMES and self.scaling.type != "none":
            found.append(f"'input_dtype' {self.input_dtype} needs scaling 'none'")
        found.extend(self.scaling.problems())
        means = len(self.scaling.mean)
        if self.scaling.type == "normalize" and counts_ok and 1 < means < max(self.band_counts):
            found.append(
                f"scaling normalize has {means} means for up to {max(self.band_counts)} bands"
            )
        if self.output not in OUTPUT_KINDS:
            found.append(f"'output' must be one of {list(OUTPUT_KINDS)}, got {self.output!r}")
        found.extend(self.inference.problems())
        found.extend(self._task_problems())
        return found

    def _task_problems(self) -> list[str]:
        found: list[str] = []
        if self.task not in TASKS:
            found.append(f"'task' must be one of {list(TASKS)}, got {self.task!r}")
        if not isinstance(self.margin, int) or isinstance(self.margin, bool) or self.margin < 0:
            found.append(f"'margin' must be an integer >= 0, got {self.margin!r}")
        if self.background is not None:
            if self.task == "classification":
                found.append(
                    "'background' names a class never vectorized: it applies to segmentation "
                    "and detection models, not classification"
                )
            elif self.background not in self.classes:
                found.append(
                    f"'background' {self.background!r} is not one of the classes "
                    f"{list(self.classes)}"
                )
        if self.task == "segmentation" and len(self.classes) > MAX_SEGMENTATION_CLASSES:
            found.append(
                f"a segmentation model has at most {MAX_SEGMENTATION_CLASSES} classes (masks are "
                f"uint8, 255 is no class), got {len(self.classes)}"
            )
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
        if not self.inference.is_default():  # files without settings stay byte-for-byte as before
            data["inference"] = self.inference.to_dict()
        if self.task != "classification":  # likewise for the defaults below
            data["task"] = self.task
        if self.margin:
            data["margin"] = self.margin
        if self.background is not None:
            data["background"] = self.background
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
        unknown = sorted(set(data) - set(KNOWN_FIELDS))
        if unknown:
            raise MetadataError(
                "model metadata has unknown fields: "
                + ", ".join(unknown)
                + "; the known fields are "
                + ", ".join(KNOWN_FIELDS)
            )
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
            inference=InferenceSettings.from_dict(data.get("inference")),
            task=data.get("task", "classification"),
            margin=data.get("margin", 0),
            background=data.get("background"),
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


def as_metadata(metadata: ModelMetadata | Mapping[str, Any]) -> ModelMetadata:
    if isinstance(metadata, ModelMetadata):
        return metadata
    return ModelMetadata.from_dict(metadata)
