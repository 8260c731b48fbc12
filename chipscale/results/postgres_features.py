"""The SQL of the PostgreSQL store's vector features: a write that stores a pack's rows and
replaces its tiles' features in one statement, and the feature and window reads."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Final

from chipscale.results.feature_rows import FeatureValues, TileKey

# One statement, so one transaction and one round trip, as a classification write. The
# results upsert is a data-modifying CTE (always run to completion). No row is touched twice:
# the DELETE takes the tile's stored features numbered from the new count on, the INSERT
# writes (or overwrites) those numbered below it.
_WITH_FEATURES: Final = """
WITH written AS (
{results}
),
gone AS (
    DELETE FROM features AS f
    USING unnest(%b::text[], %b::int[], %b::bigint[], %b::bigint[], %b::int[])
        AS k(job, z, x, y, n)
    WHERE f.job = k.job AND f.z = k.z AND f.x = k.x AND f.y = k.y AND f.seq >= k.n
)
INSERT INTO features AS f (job, z, x, y, seq, class, score, size, background, geom)
SELECT * FROM unnest(%b::text[], %b::int[], %b::bigint[], %b::bigint[], %b::int[],
                     %b::text[], %b::float8[], %b::int[], %b::bool[], %b::bytea[])
ON CONFLICT (job, z, x, y, seq) DO UPDATE SET
    class = excluded.class,
    score = excluded.score,
    size = excluded.size,
    background = excluded.background,
    geom = excluded.geom
"""


@functools.cache
def write_with_features_sql(results_sql: str) -> str:
    """The results write ``results_sql`` with the features of its tiles replaced: its
    parameters are the results write's, then :func:`feature_parameters`'."""
    return _WITH_FEATURES.format(results=results_sql.strip())


def feature_parameters(replaced: Sequence[TileKey], rows: Sequence[FeatureValues]) -> list[Any]:
    """The arrays :func:`write_with_features_sql` takes after the results write's: the tiles
    replaced with their new feature counts, then the features column by column.

    >>> feature_parameters([("j", 3, 1, 2)], [("j", 3, 1, 2, 0, "a", None, 4, False, b"w")])
    [['j'], [3], [1], [2], [1], ['j'], [3], [1], [2], [0], ['a'], [None], [4], [False], [b'w']]
    """
    counts: dict[TileKey, int] = dict.fromkeys(replaced, 0)
    for row in rows:
        key = (row[0], row[1], row[2], row[3])
        counts[key] += 1
    keys: list[list[Any]] = [[], [], [], [], []]
    for key, n in counts.items():
        for column, value in zip(keys, (*key, n), strict=True):
            column.append(value)
    columns: list[list[Any]] = [[] for _ in range(10)]
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return [*keys, *columns]
