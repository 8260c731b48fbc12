"""The one conversion across the model-runtime boundary: a model's metadata document (the
``chipscale.json`` of :mod:`model_server.chipscale_metadata`, as the in-process runtime
holds it and as the TorchServe handler sends it) read as chipscale's
:class:`~chipscale.values.ModelInfo`. Needs no torch: the worker Lambda calls it too."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast, get_args

from chipscale.values import ModelInfo, Task


def model_info(
    metadata: Mapping[str, Any], *, name: str | None = None, version: str | None = None
) -> ModelInfo:
    """``metadata`` (``ModelMetadata.to_dict()``) as a ModelInfo; ``name`` and ``version``,
    when given, are what the server registered the model as.

    Raises KeyError, TypeError or ValueError for a document that lacks or garbles a field.

    >>> info = model_info({"name": "m", "version": "1", "classes": ["a", "b"], "bands": 3,
    ...                    "tile_size": 256})
    >>> info.classes, info.band_counts, info.task, info.margin, info.background
    (('a', 'b'), (3,), 'classification', 0, None)
    """
    classes = tuple(str(c) for c in metadata["classes"])
    bands = int(metadata["bands"])
    task = str(metadata.get("task") or "classification")
    if task not in get_args(Task):
        raise ValueError(f"'task' {task!r} (known: {', '.join(get_args(Task))})")
    margin = int(metadata.get("margin") or 0)
    if margin < 0:
        raise ValueError(f"'margin' {margin} (must be >= 0)")
    background = metadata.get("background")
    if background is not None and str(background) not in classes:
        raise ValueError(f"'background' {background!r} (not one of the classes)")
    return ModelInfo(
        name=str(name or metadata["name"]),
        version=str(version or metadata["version"]),
        classes=classes,
        bands=bands,
        tile_size=int(metadata["tile_size"]),
        band_counts=tuple(int(b) for b in metadata.get("band_counts") or (bands,)),
        task=cast(Task, task),
        margin=margin,
        background=None if background is None else str(background),
    )
