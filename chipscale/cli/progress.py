"""A progress bar for long runs: tiles done, rate and ETA, drawn on stderr."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Tiles per second, the figure an operator tunes against."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tiles/s" if speed else "- tiles/s", style="progress.data.speed")


class TileProgress:
    """Thread-safe adapter from the runner's callbacks to a rich progress bar."""

    def __init__(self, progress: Progress, description: str) -> None:
        self._progress = progress
        self._description = description
        self._task: TaskID | None = None

    def start(self, todo: int, skipped: int) -> None:
        if not todo:  # a finished job being resumed: no bar to draw
            return
        suffix = f" ({skipped} already done)" if skipped else ""
        self._task = self._progress.add_task(self._description + suffix, total=todo)

    def advance(self, tiles: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, tiles)

    def stop(self) -> None:
        self._progress.stop()


@contextmanager
def tile_progress(description: str, *, console: Console | None = None) -> Iterator[TileProgress]:
    """A progress bar on stderr that is cleaned up however the run ends."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
        console=console or Console(stderr=True),
    )
    with progress:
        yield TileProgress(progress, description)
