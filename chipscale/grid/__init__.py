"""The web-mercator tile grid: tile lists, covers of an area, packs of adjacent tiles."""
