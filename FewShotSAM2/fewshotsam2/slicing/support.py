"""Which labeled support slices prompt SAM2.

1 shot: the middle labeled slice. k shots: k slices evenly spaced over the labeled slices. The stacks
are the canonical slice stacks of `slices.SlicePlan`, so "middle" and "evenly spaced" are anatomical.
"""

from __future__ import annotations

import warnings

import numpy as np

from fewshotsam2.errors import InputError


def labeled_slices(label_stack: np.ndarray, value: int) -> np.ndarray:
    """Ascending indices of the slices of `label_stack` (n, h, w) that contain `value`."""
    if label_stack.ndim != 3:
        raise ValueError(f"expected a (n, h, w) stack, got shape {label_stack.shape}")
    present = (label_stack == value).any(axis=(1, 2))
    return np.flatnonzero(present)


def select_support_slices(label_stack: np.ndarray, value: int, shots: int) -> list[int]:
    """Slice indices to use as support for structure `value`.

    shots == 1: the middle labeled slice (present[len(present) // 2]). shots == k: k slices evenly spaced
    over the labeled slices (positions np.linspace(0, n-1, k) in the list of labeled slices, rounded,
    unique, sorted). More shots than labeled slices: all labeled slices, with a warning.
    """
    if int(shots) != shots or shots < 1:
        raise InputError(f"shots must be a whole number >= 1, got {shots}")
    present = labeled_slices(label_stack, value)
    if present.size == 0:
        raise InputError(f"structure {value} is absent from the support labels (no slice contains it)")
    if shots == 1:
        return [int(present[len(present) // 2])]
    if shots >= len(present):
        if shots > len(present):
            warnings.warn(
                f"{shots} shots requested but structure {value} is on {len(present)} slices only; using all of them",
                stacklevel=2,
            )
        return [int(i) for i in present]
    positions = np.unique(np.round(np.linspace(0, len(present) - 1, int(shots))).astype(int))
    return sorted(int(present[p]) for p in positions)

