"""A volume's SAM2-ready slices, made one slice at a time.

A 600-slice 512 x 512 CT is 630 MB as a float32 stack, and the pipeline needs one slice at a time (the encoder,
LPIPS, the field-of-view resampling): `SliceStack` keeps only a view of the volume's own array (no copy) and the
intensity window, and windows a slice when it is read. A slice is bit-identical to the same slice of
`SlicePlan.stack(normalize(volume))`.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from fewshotsam2.slicing.intensity import apply_window, intensity_window
from fewshotsam2.slicing.slices import SlicePlan
from fewshotsam2.io.volume import Volume


class SliceStack:
    """(n, h, w) float32 slices in [0, 1] of a volume in a plan's canonical orientation, computed on read.

    `stack[i]` is one slice (a new array); `stack[a:b]` is a lazy sub-stack; `np.asarray(stack)` builds the
    whole float32 array (for small stacks only).
    """

    ndim = 3
    dtype = np.dtype(np.float32)

    def __init__(self, oriented: np.ndarray, low: float, high: float, index: Optional[range] = None) -> None:
        self._source = oriented  # a view of the volume's array, canonical orientation, any dtype
        self._low, self._high = float(low), float(high)
        self._index = range(oriented.shape[0]) if index is None else index

    @classmethod
    def of(cls, volume: Volume, plan: SlicePlan, preset: str = "auto") -> "SliceStack":
        """The slices of `volume` cut by `plan`, windowed by `preset` (see `intensity.intensity_window`)."""
        return cls(plan.view(volume.array), *intensity_window(volume, preset))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self._index),) + tuple(self._source.shape[1:])

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return SliceStack(self._source, self._low, self._high, self._index[key])
        if isinstance(key, (int, np.integer)):
            # contiguous: the view may run backwards (a flipped axis), torch.from_numpy refuses negative strides
            return np.ascontiguousarray(apply_window(self._source[self._index[key]], self._low, self._high))
        raise TypeError(f"a SliceStack is indexed by a slice number or a range of them, not {key!r}")

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, dtype=np.float32)
        for i in range(len(self)):
            out[i] = self[i]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"SliceStack(shape={self.shape}, window=({self._low:g}, {self._high:g}))"
