"""The mosaic adapter of the TileSource port: :class:`MosaicReader` reads web-mercator tiles
from many rasters (a COG list, a STAC collection, a message's candidates), first valid pixel
in asset order, one warp per (pack, asset) window; :func:`open_mosaic` opens a list file."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import shapely
from mercantile import Tile
from rasterio.enums import Resampling
from shapely.geometry import box

from chipscale.errors import SourceError, SourceUnavailable
from chipscale.grid.tilelist import make_tile
from chipscale.sources.assets import Asset, AssetIndex, Order, load_assets, tile_boxes
from chipscale.sources.base import ClosesOnExit
from chipscale.sources.cog import MAX_WINDOW, TileReader, _pack_shift, group_tiles
from chipscale.values import ImageData

#: Open asset readers a mosaic keeps (least recently used closed first): a pack reads a few
#: neighbouring assets, and the next pack mostly the same ones.
MAX_OPEN = 16


@dataclass(slots=True)
class _Tile:
    """A tile being filled: its pixels so far and the assets that supplied them."""

    data: np.ndarray | None = None
    mask: np.ndarray | None = None
    assets: list[str] = field(default_factory=list)

    @property
    def full(self) -> bool:
        return self.mask is not None and bool(self.mask.all())

    def feed(self, asset: str, image: ImageData) -> None:
        """rio-tiler's FirstMethod: keep the pixels already valid, take the new asset's
        where they are not."""
        if self.data is None or self.mask is None:
            self.data, self.mask = image.data, image.mask.copy()
            if image.mask.any():
                self.assets.append(asset)
            return
        take = image.mask & ~self.mask
        if take.any():
            np.copyto(self.data, image.data, where=take)
            self.mask |= take
            self.assets.append(asset)


class MosaicReader(ClosesOnExit):
    """Reads tiles from many rasters as one source. Not thread-safe: one reader per thread.

    ``assets``: the rasters in priority order (or an :class:`AssetIndex` of them). Each may
    be in any CRS, local or remote; every one must have the same band count and dtype (the
    selected ``bands``).

    How a pack is read
        Tiles are grouped into packs as :class:`~chipscale.sources.cog.TileReader` groups
        them. The spatial index gives the assets whose footprint overlaps the pack; they are
        taken in priority order and each is warped ONCE, over the window of the pack's tiles
        that overlap its footprint and are not complete yet (the asset's own
        :class:`~chipscale.sources.cog.TileReader`, opened on first use and kept open). A
        pixel keeps the first valid value in asset order (rio-tiler's ``FirstMethod``); a
        tile is complete when its mask is full, and no later asset is read (nor opened) for
        it. So a tile on a scene border is read from every asset that overlaps it, until it
        is full.

    ``ImageData.assets`` lists the ids of the assets that supplied pixels, in that order. A
    tile no asset covers comes back empty (all-False mask). With ``margin`` m, the candidates
    are those overlapping the tile itself (a TileReader returns nothing for a tile whose own
    area misses its raster), and a tile is complete when its margin is full too.

    Errors: an asset that cannot be reached for now raises
    :class:`~chipscale.errors.SourceUnavailable` (the message is retried); one that can never
    be read raises :class:`~chipscale.errors.SourceError` naming the asset.
    """

    def __init__(
        self,
        assets: Sequence[Asset] | AssetIndex,
        *,
        source: str | None = None,
        size: int = 256,
        bands: Sequence[int] | None = None,
        resampling: Resampling | str = Resampling.nearest,
        max_window: int = MAX_WINDOW,
        margin: int = 0,
        max_open: int = MAX_OPEN,
    ) -> None:
        if size <= 0:
            raise ValueError(f"tile size must be positive, got {size}")
        if margin < 0:
            raise ValueError(f"tile margin must be >= 0, got {margin}")
        self.index = assets if isinstance(assets, AssetIndex) else AssetIndex(assets)
        if not len(self.index):
            raise SourceError("a mosaic needs at least one asset")
        self.source = source if source is not None else f"mosaic of {len(self.index)} assets"
        self.size = size
        self.margin = int(margin)
        self.bands = None if bands is None else tuple(int(b) for b in bands)
        self.resampling = resampling
        self.max_window = max_window
        self.max_open = max(1, max_open)
        self.shift = _pack_shift(size, max_window)
        self._readers: OrderedDict[str, TileReader] = OrderedDict()
        #: Band count, dtype and fill value of the mosaic (from the first asset opened).
        self._layout: tuple[int, np.dtype, float] | None = None
        #: How many asset readers were opened (a reader closed and opened again counts twice).
        self.opens = 0

    # -- assets ---------------------------------------------------------------------------

    def _reader(self, asset: Asset) -> TileReader:
        reader = self._readers.pop(asset.id, None)
        if reader is None:
            try:
                reader = TileReader(
                    asset.href,
                    size=self.size,
                    bands=self.bands,
                    resampling=self.resampling,
                    max_window=self.max_window,
                    **({"margin": self.margin} if self.margin else {}),
                )
            except SourceError as exc:
                raise _asset_error(asset, exc) from None
            self.opens += 1
            self._check_layout(asset, reader)
            while len(self._readers) >= self.max_open:
                self._readers.popitem(last=False)[1].close()
        self._readers[asset.id] = reader
        return reader

    def _check_layout(self, asset: Asset, reader: TileReader) -> None:
        fill = 0.0 if reader.nodata is None or np.isnan(reader.nodata) else float(reader.nodata)
        layout = (len(reader.bands), reader.dtype, fill)
        if self._layout is None:
            self._layout = layout
        elif layout[:2] != self._layout[:2]:
            reader.close()
            raise SourceError(
                f"asset {asset.id} has {layout[0]} bands of {layout[1]}; the mosaic's first "
                f"asset read has {self._layout[0]} bands of {self._layout[1]}"
            )

    def _empty(self) -> ImageData:
        if self._layout is None:
            self._reader(self.index.assets[0])
        assert self._layout is not None
        count, dtype, fill = self._layout
        side = self.size + 2 * self.margin
        data = np.full((count, side, side), fill, dtype=dtype)
        mask = np.zeros((side, side), dtype=bool)
        return ImageData(data=data, mask=mask, margin=self.margin)

    # -- reading ----------------------------------------------------------------------------

    def read_pack(self, tiles: Sequence[Tile]) -> Iterator[tuple[Tile, ImageData]]:
        """Read tiles of one zoom that share a pack parent: one warp per overlapping asset."""
        if not tiles:
            return
        boxes = tile_boxes(tiles)
        west, south, east, north = shapely.total_bounds(boxes)
        window = box(west, south, east, north)
        states = [_Tile() for _ in tiles]
        pending = np.arange(len(tiles))
        for i in self.index.query(window):
            if pending.size == 0:
                break
            footprint = self.index.geometries[i]
            candidates = boxes[pending]
            hits = pending[
                shapely.intersects(footprint, candidates) & ~shapely.touches(footprint, candidates)
            ]
            if hits.size == 0:
                continue
            asset = self.index.assets[i]
            reader = self._reader(asset)
            try:
                images = list(reader.read_pack([tiles[k] for k in hits]))
            except SourceError as exc:
                raise _asset_error(asset, exc) from None
            for k, (_tile, image) in zip(hits, images, strict=True):
                states[k].feed(asset.id, image)
            pending = np.array([k for k in pending if not states[k].full], dtype=int)
        for tile, state in zip(tiles, states, strict=True):
            if state.data is None or state.mask is None:
                yield tile, self._empty()
            else:
                image = ImageData(
                    state.data, state.mask, margin=self.margin, assets=tuple(state.assets)
                )
                yield tile, image

    def read(self, tiles: Iterable[Tile | Sequence[int]]) -> Iterator[tuple[Tile, ImageData]]:
        """Read every distinct tile once, pack by pack (the order of
        :meth:`~chipscale.sources.cog.TileReader.read`)."""
        unique = list(dict.fromkeys(make_tile(*t) for t in tiles))
        for group in group_tiles(unique, self.shift):
            yield from self.read_pack(group)

    def tile(self, tile: Tile | Sequence[int]) -> ImageData:
        """Read one tile."""
        return next(self.read_pack([make_tile(*tile)]))[1]

    def candidates(self, tile: Tile | Sequence[int]) -> list[Asset]:
        """The assets (priority order) that may supply ``tile``'s pixels."""
        return self.index.candidates(make_tile(*tile), size=self.size)

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close every open asset reader."""
        while self._readers:
            self._readers.popitem(last=False)[1].close()


def _asset_error(asset: Asset, exc: SourceError) -> SourceError:
    """``exc`` naming the asset (its id and href), of the same kind (transient or not)."""
    text = str(exc)
    if asset.id not in text:
        text = f"asset {asset.id}: {text}"
    kind = SourceUnavailable if isinstance(exc, SourceUnavailable) else SourceError
    return kind(text)


def open_mosaic(
    source: str | os.PathLike[str],
    *,
    asset_key: str | None = None,
    order: Order | str = "listed",
    size: int = 256,
    bands: Sequence[int] | None = None,
    resampling: Resampling | str = Resampling.nearest,
    max_window: int = MAX_WINDOW,
    margin: int = 0,
) -> MosaicReader:
    """A :class:`MosaicReader` of a ``.txt`` COG list or a ``.json``/``.geojson`` STAC
    collection (:func:`~chipscale.sources.assets.load_assets`)."""
    assets = load_assets(source, asset_key=asset_key, order=order)
    return MosaicReader(
        assets,
        source=os.fspath(source),
        size=size,
        bands=bands,
        resampling=resampling,
        max_window=max_window,
        margin=margin,
    )
