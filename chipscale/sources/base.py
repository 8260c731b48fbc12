"""The TileSource port: what the pipeline reads tiles through, whatever serves the pixels (a
raster through GDAL, an XYZ tile endpoint). :func:`chipscale.sources.open_tile_source` picks
the adapter."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from mercantile import Tile

from chipscale.values import ImageData


@runtime_checkable
class TileSource(Protocol):
    """Reads web-mercator tiles of one source, opened once. Not thread-safe: one per thread.

    Every tile comes back as :class:`~chipscale.values.ImageData`: ``data`` is
    ``(bands, size + 2 * margin, size + 2 * margin)``, ``mask`` the same without bands, bool,
    True where valid; a tile that misses the source has an all-False mask. The margin holds
    the source's own neighbouring pixels (those the neighbouring tiles read), not padding;
    beyond the source its data is 0 and its mask False. A source that cannot be read raises
    :class:`~chipscale.errors.SourceError` (``SourceUnavailable`` when a retry may succeed).
    """

    #: The source as given (a path, a URL, a URL template).
    source: str
    #: Tile size in pixels.
    size: int
    #: Pixels of context read on each side of every tile (0: the tile alone).
    margin: int

    def read(self, tiles: Iterable[Tile | Sequence[int]]) -> Iterator[tuple[Tile, ImageData]]:
        """Yield ``(tile, ImageData)`` once for every distinct tile."""
        ...

    def tile(self, tile: Tile | Sequence[int]) -> ImageData:
        """Read one tile."""
        ...

    def close(self) -> None:
        """Release what the reader holds (datasets, connections); idempotent."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class ClosesOnExit:
    """``with reader:`` closes the reader on the way out: the context-manager half of the
    port, written once for every adapter."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
