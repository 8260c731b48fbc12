"""The viewer's imagery: XYZ PNG tiles read through chipscale's own tile readers
(:func:`chipscale.sources.open_tile_source`), so the page shows any source a job reads.

Readers are not thread-safe: each of the server's worker threads keeps its own, opened once
per source, and all are closed when the server stops. A source that cannot be opened is
remembered for :data:`RETRY_AFTER` seconds, so a broken source costs one attempt, not one
per tile.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from chipscale.errors import ChipscaleError, InvalidTileError, one_line

#: Seconds before a source that failed to open is tried again.
RETRY_AFTER = 30.0


class ImageryError(ChipscaleError):
    """The source cannot be read (the message says which and why, in one line)."""


class Imagery:
    """PNG tiles of sources, with one reader per source and thread."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[Any] = []
        self._failed: dict[str, tuple[float, str]] = {}

    def _reader(self, source: str) -> Any:
        readers: dict[str, Any] | None = getattr(self._local, "readers", None)
        if readers is None:
            readers = self._local.readers = {}
        reader = readers.get(source)
        if reader is not None:
            return reader
        with self._lock:
            failed = self._failed.get(source)
        if failed is not None and time.monotonic() - failed[0] < RETRY_AFTER:
            raise ImageryError(failed[1])
        from chipscale.sources import open_tile_source

        try:
            reader = open_tile_source(source, size=self.size)
        except (ChipscaleError, OSError) as exc:
            message = f"cannot read imagery {source}: {one_line(exc)}"
            with self._lock:
                self._failed[source] = (time.monotonic(), message)
            raise ImageryError(message) from None
        readers[source] = reader
        with self._lock:
            self._failed.pop(source, None)
            self._all.append(reader)
        return reader

    def check(self, source: str) -> str | None:
        """None when the source opens, else the one-line reason it does not."""
        if not source:
            return "the job records no imagery source: give --source"
        try:
            self._reader(source)
        except ImageryError as exc:
            return str(exc)
        return None

    def png(self, source: str, z: int, x: int, y: int) -> bytes | None:
        """The PNG of map tile ``z/x/y`` (invalid pixels transparent), or None when no pixel
        of the source falls in it. :class:`ImageryError` when the source cannot be read,
        :class:`~chipscale.errors.InvalidTileError` for a tile off the grid."""
        if not source:
            raise ImageryError("the job records no imagery source: give --source")
        if not (0 <= z <= 30 and 0 <= x < 2**z and 0 <= y < 2**z):
            raise InvalidTileError(f"tile {z}/{x}/{y} is not on the web-mercator grid")
        from mercantile import Tile

        from chipscale.sources.images import to_png

        reader = self._reader(source)
        try:
            image = reader.tile(Tile(x, y, z))
        except InvalidTileError:
            raise
        except (ChipscaleError, OSError) as exc:
            raise ImageryError(f"cannot read imagery {source}: {one_line(exc)}") from None
        if image.is_empty:
            return None
        return to_png(image)

    def close(self) -> None:
        """Close every reader any thread opened."""
        with self._lock:
            readers, self._all = self._all, []
        for reader in readers:
            with contextlib.suppress(Exception):  # best effort: the server is stopping
                reader.close()
