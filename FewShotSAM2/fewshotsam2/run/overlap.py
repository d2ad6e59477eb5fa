"""Dice, the one overlap measure of the package (reverse scoring, evaluation, tests).

Dice = 2|A∩B| / (|A| + |B|); two empty masks agree perfectly (1.0): an absent structure correctly predicted
absent is not an error.
"""

from __future__ import annotations

import numpy as np


def dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """Dice from true-positive, false-positive and false-negative voxel counts."""
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2.0 * tp / denom


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks of one shape (anything nonzero is inside)."""
    a = np.asarray(a).astype(bool, copy=False)
    b = np.asarray(b).astype(bool, copy=False)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} and {b.shape}")
    tp = int(np.count_nonzero(a & b))
    return dice_from_counts(tp, int(np.count_nonzero(a)) - tp, int(np.count_nonzero(b)) - tp)
