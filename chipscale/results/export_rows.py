"""What every export shares: its columns, the scores read from a model output, the
thresholds that keep rows, and where an export is written (a stream, or a path written
atomically). Columns, in this order (GeoParquet adds ``geometry`` and ``bbox``)::

    job, z, x, y, quadkey, status, <one per class: its score>, model_name, model_version, error

and, for a mosaic job, ``assets``: the ids of the assets that supplied each tile's pixels
(CSV: a JSON list; GeoJSON: a list; GeoParquet: a list of strings).

A model output is read as ``{"scores": {class: score}}``, ``{class: score}``, or a list of
scores in class order (``{"scores": [...]}`` or chip-n-scale's bare list).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

import mercantile

from chipscale.atomic import atomic_write
from chipscale.errors import ChipscaleError
from chipscale.results.base import ResultStore
from chipscale.values import ResultRow

FIXED_HEAD = ("job", "z", "x", "y", "quadkey", "status")
FIXED_TAIL = ("model_name", "model_version", "error")
#: The provenance column of a mosaic job's export, after :data:`FIXED_TAIL`.
ASSETS_COLUMN = "assets"

PathLike = str | os.PathLike[str]


class ExportError(ChipscaleError, ValueError):
    """An export cannot be made as asked (bad format, unknown class or job, unreadable CSV)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def scores_of(output: Any, classes: Sequence[str] = ()) -> dict[str, float]:
    """The class scores in a model output, ``{}`` when there are none.

    >>> scores_of({"scores": {"road": 0.9, "field": 0.1}})
    {'road': 0.9, 'field': 0.1}
    >>> scores_of({"road": 0.9, "label": "road"})
    {'road': 0.9}
    >>> scores_of([0.2, 0.8], ["no", "yes"])
    {'no': 0.2, 'yes': 0.8}
    """
    if isinstance(output, dict) and "scores" in output:
        output = output["scores"]
    if isinstance(output, dict):
        return {str(k): float(v) for k, v in output.items() if _is_number(v)}
    if isinstance(output, list):
        names = list(classes) + [f"p{i}" for i in range(len(classes), len(output))]
        return {name: float(v) for name, v in zip(names, output, strict=False) if _is_number(v)}
    return {}


def top_class(scores: dict[str, float]) -> tuple[str, float] | None:
    """The best-scoring class and its score, ignoring non-finite scores; None if none."""
    finite = [(name, s) for name, s in scores.items() if math.isfinite(s)]
    return max(finite, key=lambda item: item[1]) if finite else None


def classes_for(store: ResultStore, job: str | None = None) -> list[str]:
    """The class columns of an export: the job's classes (all jobs: their union in first-seen
    order), or, when no job records any, the score keys seen in the outputs."""
    jobs = [store.get_job(job)] if job is not None else store.jobs()
    names: dict[str, None] = {}
    for info in jobs:
        if info is not None:
            names.update(dict.fromkeys(info.classes))
    if not names:  # a second streamed pass, only when the jobs do not say
        for row in store.iter_results(job, status="ok"):
            names.update(dict.fromkeys(scores_of(row.output)))
    return list(names)


def filter_rows(
    rows: Iterable[ResultRow],
    class_name: str | None = None,
    min_score: float | None = None,
    *,
    classes: Sequence[str] | None = None,
) -> Iterator[ResultRow]:
    """Keep the rows that pass a threshold; streams.

    - ``class_name`` and ``min_score``: rows whose score for that class is ``>= min_score``;
    - ``class_name`` alone: rows whose top class is ``class_name``;
    - ``min_score`` alone: rows whose top score is ``>= min_score``;
    - neither: every row (``empty`` and ``error`` ones included).

    With any filter, rows without scores (``empty``, ``error``) are dropped. An unknown
    ``class_name`` raises :class:`ExportError` listing the known classes: at once when
    ``classes`` is given, else at the first scored row that lacks it.
    """
    if class_name is not None and classes is not None and class_name not in classes:
        raise _unknown_class(class_name, classes)
    if min_score is not None and not math.isfinite(min_score):
        raise ExportError(f"min_score must be a finite number, not {min_score!r}")
    if class_name is None and min_score is None:
        return iter(rows)
    return _filter(rows, class_name, min_score, classes or ())


def _unknown_class(class_name: str, known: Iterable[str]) -> ExportError:
    listed = ", ".join(repr(name) for name in known) or "(none recorded)"
    return ExportError(f"Unknown class {class_name!r}: the known classes are {listed}")


def _filter(
    rows: Iterable[ResultRow],
    class_name: str | None,
    min_score: float | None,
    classes: Sequence[str],
) -> Iterator[ResultRow]:
    for row in rows:
        if row.status != "ok":
            continue
        scores = scores_of(row.output, classes)
        if not scores:
            continue
        if class_name is not None:
            if class_name not in scores:
                raise _unknown_class(class_name, classes or scores)
            if min_score is None:
                top = top_class(scores)
                keep = top is not None and top[0] == class_name
            else:
                keep = scores[class_name] >= min_score
        else:
            top = top_class(scores)
            keep = top is not None and min_score is not None and top[1] >= min_score
        if keep:
            yield row


@contextlib.contextmanager
def open_output(out: IO[Any] | PathLike, *, binary: bool = False) -> Iterator[IO[Any]]:
    """An open stream as it is; a path written atomically (nothing half written on error)."""
    if isinstance(out, str | os.PathLike):
        text = {} if binary else {"encoding": "utf-8", "newline": ""}
        with atomic_write(out, "wb" if binary else "w", **text) as handle:
            yield handle
    else:
        yield out


def row_values(row: ResultRow, classes: Sequence[str]) -> tuple[list[Any], list[float | None]]:
    tile = mercantile.Tile(row.x, row.y, row.z)
    scores = scores_of(row.output, classes) if row.status == "ok" else {}
    class_values = []
    for name in classes:
        value = scores.get(name)
        class_values.append(value if value is not None and math.isfinite(value) else None)
    head = [row.job, row.z, row.x, row.y, mercantile.quadkey(tile), row.status]
    return head, class_values


def has_assets(store: ResultStore, job: str | None = None) -> bool:
    """Whether the export carries the ``assets`` column: the job (any job, for all) is a
    mosaic's, with its asset list frozen in its ``extra``."""
    jobs = [store.get_job(job)] if job is not None else store.jobs()
    return any(info is not None and ASSETS_COLUMN in info.extra for info in jobs)


def check_classes(classes: Sequence[str], reserved: Sequence[str] = ()) -> list[str]:
    classes = list(classes)
    clash = [
        name for name in classes if name in (*FIXED_HEAD, *FIXED_TAIL, ASSETS_COLUMN, *reserved)
    ]
    if clash:
        raise ExportError(f"Class names {clash} clash with the export's fixed columns")
    if len(set(classes)) != len(classes):
        raise ExportError(f"Class names repeat: {classes}")
    return classes
