"""What a model's scores must be to be stored: finite, one row a tile.

Shared by every predictor adapter (in process and TorchServe) and the worker, so it imports
nothing of theirs.
"""

from __future__ import annotations

import numpy as np


def non_finite_rows(scores: np.ndarray) -> dict[int, str]:
    """Rows of ``(N, classes)`` scores holding NaN or inf, each with the reason to store.

    Part of the port's contract: a tile the model answers NaN for has no score, and becomes
    an ``error`` row (never an ``ok`` row with empty cells, which a resume would skip).

    >>> non_finite_rows(np.array([[0.5, 0.5], [np.nan, 1.0]], dtype=np.float32))
    {1: 'the model returned non-finite scores [nan, 1.0] for this tile'}
    """
    bad = ~np.isfinite(np.asarray(scores, dtype=np.float32)).all(axis=1)
    return {
        int(i): f"the model returned non-finite scores {scores[i].tolist()} for this tile"
        for i in np.flatnonzero(bad)
    }
