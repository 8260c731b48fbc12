"""The colours of classes people expect (snow light blue, forest green, road red...), shared
by the preview picture and the web map; other classes take a categorical palette in order."""

from __future__ import annotations

#: Colours of common cover classes, by lower-case class name.
CLASS_COLORS: dict[str, str] = {
    "snow": "#9ecae1",
    "ice": "#c6dbef",
    "water": "#2171b5",
    "forest": "#238b45",
    "tree": "#238b45",
    "vegetation": "#74c476",
    "grass": "#a1d99b",
    "bare_ground": "#d8a35d",
    "road": "#e31a1c",
    "building": "#6a3d9a",
}
