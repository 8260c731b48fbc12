"""Message schema v1 and chip-n-scale's single-tile message."""

from __future__ import annotations

import json

import pytest
from mercantile import Tile

from chipscale.errors import InvalidMessageError
from chipscale.pipeline.messages import PackMessage, parse_message


def test_round_trip() -> None:
    message = PackMessage(job="j1", source="s3://b/k.tif", tiles=(Tile(1, 2, 3), Tile(2, 2, 3)))
    assert parse_message(message.to_json()) == message
    assert json.loads(message.to_json())["v"] == 1


def test_chip_n_scale_single_tile_takes_job_and_source_from_config() -> None:
    message = parse_message('{"x": 5, "y": 6, "z": 4}', default_job="j", default_source="a.tif")
    assert message == PackMessage("j", "a.tif", (Tile(5, 6, 4),))
    with pytest.raises(InvalidMessageError, match="source is missing"):
        parse_message('{"x": 5, "y": 6, "z": 4}', default_job="j")


def test_duplicate_tiles_are_dropped() -> None:
    body = {"v": 1, "job": "j", "source": "s", "tiles": [[1, 1, 2], [1, 1, 2]]}
    assert parse_message(body).tiles == (Tile(1, 1, 2),)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ({"v": 2, "job": "j", "source": "s", "tiles": [[0, 0, 0]]}, "version 2"),
        ({"job": "j", "source": "s", "tiles": [[0, 0, 0]]}, "version None"),
        ({"v": 1, "job": "j", "source": "s", "tiles": []}, "non-empty list"),
        ({"v": 1, "job": "j", "source": "s", "tiles": [[0, 0]]}, r"tiles\[0\]"),
        ({"v": 1, "job": "j", "source": "s", "tiles": [[-1, 0, 3]]}, "outside"),
        ({"v": 1, "job": "j", "source": "s", "tiles": [[0, 0, 40]]}, "zoom"),
        ({"v": 1, "job": "j", "source": "s", "tiles": [["a", 0, 3]]}, "not an integer"),
        ({"v": 1, "job": "", "source": "s", "tiles": [[0, 0, 0]]}, "job must be"),
        ({"v": 1, "job": "j", "source": 7, "tiles": [[0, 0, 0]]}, "source must be"),
        ({"v": 1, "job": "j", "source": "s", "tiles": [[0, 0, 0]], "x": 1}, "unknown"),
        ({"x": 99, "y": 0, "z": 2, "job": "j", "source": "s"}, "outside"),
        # JSON escapes reach characters no store can keep: refused, so the reject is kept
        ('{"v": 1, "job": "a\\u0000b", "source": "s", "tiles": [[0, 0, 0]]}', "control"),
        ('{"v": 1, "job": "a\\ud800", "source": "s", "tiles": [[0, 0, 0]]}', "surrogate"),
        ({"v": 1, "job": "two\nlines", "source": "s", "tiles": [[0, 0, 0]]}, "control"),
        ({"v": 1, "job": "j", "source": "s3://b/\x7f.tif", "tiles": [[0, 0, 0]]}, "control"),
    ],
)
def test_invalid_messages_say_why(body, reason: str) -> None:
    with pytest.raises(InvalidMessageError, match=reason):
        parse_message(body)


def test_too_many_tiles_is_invalid() -> None:
    tiles = [[x, 0, 8] for x in range(11)]
    with pytest.raises(InvalidMessageError, match="max_tiles_per_message=10"):
        parse_message({"v": 1, "job": "j", "source": "s", "tiles": tiles}, max_tiles=10)
