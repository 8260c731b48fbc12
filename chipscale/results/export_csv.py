"""The results CSV: written for ``chipscale download`` (text cells formula-safe), and read
back for ``convert-geojson``, in this project's format or chip-n-scale's ``tile,output``."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal, TextIO

from chipscale.grid.tilelist import make_tile
from chipscale.results.export_rows import (
    ASSETS_COLUMN,
    FIXED_HEAD,
    FIXED_TAIL,
    ExportError,
    PathLike,
    check_classes,
    open_output,
    row_values,
    scores_of,
)
from chipscale.safe_text import from_spreadsheet_text, spreadsheet_text
from chipscale.values import ResultRow

#: CSV quoting: minimal, or all for a row with a lone "\r" (csv leaves it unquoted).
_QUOTINGS: tuple[Literal[0, 1, 2, 3], ...] = (csv.QUOTE_MINIMAL, csv.QUOTE_ALL)


def write_csv(
    rows: Iterable[ResultRow],
    out: TextIO | PathLike,
    classes: Sequence[str],
    *,
    assets: bool = False,
) -> int:
    """Write rows as CSV (header first, text cells formula-safe); return how many were
    written. ``assets``: add the ``assets`` column (a JSON list of asset ids)."""
    classes = check_classes(classes)
    count = 0
    with open_output(out) as handle:
        writers = [csv.writer(handle, lineterminator="\n", quoting=q) for q in _QUOTINGS]
        extra = [ASSETS_COLUMN] if assets else []
        writers[0].writerow([*FIXED_HEAD, *map(spreadsheet_text, classes), *FIXED_TAIL, *extra])
        for row in rows:
            head, class_values = row_values(row, classes)
            scores = ["" if v is None else repr(v) for v in class_values]
            text = [row.job, row.model_name or "", row.model_version or "", row.error or ""]
            if assets:
                text.append(json.dumps(list(row.assets), ensure_ascii=False))
            job, *tail = map(spreadsheet_text, text)
            writers["\r" in "".join(text)].writerow([job, *head[1:], *scores, *tail])
            count += 1
    return count


def _parse_float(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ExportError(f"{text!r} is not a score") from None


def read_csv_rows(
    csv_in: TextIO | PathLike, *, tms: bool = False, classes: Sequence[str] = ()
) -> tuple[list[str], Iterator[ResultRow]]:
    """Read a results CSV: this project's format or chip-n-scale's ``tile,output``.

    Returns the class names and a stream of rows. In chip-n-scale's format the tile is
    ``x-y-z`` (``tms=True`` flips y from TMS numbering, as its convert script assumed) and the
    output a JSON list of scores (named by ``classes``, else ``p0, p1, ...``) or object.
    """
    if isinstance(csv_in, str | os.PathLike):
        name = os.fspath(csv_in)
        try:
            # Closed by the row generator when it ends (the rows outlive this call).
            handle: TextIO = open(csv_in, encoding="utf-8", newline="")  # noqa: SIM115
        except OSError as exc:
            raise ExportError(f"Cannot read {name!r}: {exc.strerror}") from None
        owned = True
    else:
        name, handle, owned = getattr(csv_in, "name", "<csv>"), csv_in, False
    reader = csv.reader(handle)
    try:
        header = next(reader)
    except StopIteration:
        if owned:
            handle.close()
        raise ExportError(f"{name!r} is empty: expected a results CSV") from None
    except csv.Error as exc:
        if owned:
            handle.close()
        raise ExportError(f"{name!r} is not a CSV: {exc}") from None
    header = [from_spreadsheet_text(h.strip()) for h in header]
    if all(col in header for col in (*FIXED_HEAD, *FIXED_TAIL)):
        start, end = header.index("status") + 1, header.index("model_name")
        found = header[start:end]
        return found, _ours(reader, header, found, name, handle if owned else None)
    if header[:1] == ["tile"] or (header and _looks_like_tile(header[0])):
        first = None if header[:1] == ["tile"] else header
        rows = _chip_n_scale(reader, first, tms, classes, name, handle if owned else None)
        peeked = next(rows, None)
        found = list(classes)
        if peeked is not None:
            found += [n for n in scores_of(peeked.output, classes) if n not in found]

        def chained() -> Iterator[ResultRow]:
            if peeked is not None:
                yield peeked
                yield from rows

        return found, chained()
    if owned:
        handle.close()
    raise ExportError(
        f"{name!r} is not a results CSV: expected a header with "
        f"{', '.join(FIXED_HEAD)} or chip-n-scale's tile,output"
    )


def _looks_like_tile(text: str) -> bool:
    parts = text.split("-")
    return len(parts) == 3 and all(p.strip().isdigit() for p in parts)


def _ours(
    reader: Iterator[list[str]],
    header: list[str],
    classes: list[str],
    name: str,
    owned: TextIO | None,
) -> Iterator[ResultRow]:
    index = {col: i for i, col in enumerate(header)}
    try:
        for number, values in enumerate(reader, start=2):
            if not values:
                continue
            try:
                scores = {}
                for cls in classes:
                    value = _parse_float(values[index[cls]])
                    if value is not None:
                        scores[cls] = value
                status = values[index["status"]]
                tile = make_tile(
                    int(values[index["x"]]), int(values[index["y"]]), int(values[index["z"]])
                )
                yield ResultRow(
                    job=from_spreadsheet_text(values[index["job"]]),
                    z=tile.z,
                    x=tile.x,
                    y=tile.y,
                    status=status,  # type: ignore[arg-type]
                    output=scores if status == "ok" else None,
                    error=from_spreadsheet_text(values[index["error"]]) or None,
                    model_name=from_spreadsheet_text(values[index["model_name"]]) or None,
                    model_version=from_spreadsheet_text(values[index["model_version"]]) or None,
                    attempts=0,
                    created_at="",
                    updated_at="",
                )
            except (IndexError, ValueError) as exc:
                raise ExportError(f"{name}, line {number}: {exc}") from None
    finally:
        if owned is not None:
            owned.close()


def _chip_n_scale(
    reader: Iterator[list[str]],
    first: list[str] | None,
    tms: bool,
    classes: Sequence[str],
    name: str,
    owned: TextIO | None,
) -> Iterator[ResultRow]:
    def lines() -> Iterator[tuple[int, list[str]]]:
        if first is not None:
            yield 1, first
        yield from enumerate(reader, start=2)

    try:
        for number, values in lines():
            if not values:
                continue
            try:
                x, y, z = (int(v) for v in values[0].strip().split("-"))
                if tms:
                    y = (1 << z) - 1 - y
                tile = make_tile(x, y, z)
                # chip-n-scale's download wrote the JSON unquoted: its commas split columns.
                output = json.loads(",".join(values[1:]))
            except (ValueError, IndexError) as exc:
                raise ExportError(f"{name}, line {number}: {exc}") from None
            scores = scores_of(output, classes)
            yield ResultRow(
                job="",
                z=tile.z,
                x=tile.x,
                y=tile.y,
                status="ok",
                output=scores,
                error=None,
                model_name=None,
                model_version=None,
                attempts=0,
                created_at="",
                updated_at="",
            )
    finally:
        if owned is not None:
            owned.close()
