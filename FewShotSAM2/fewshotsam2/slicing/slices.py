"""Volume <-> stack of 2D slices in a canonical anatomical orientation.

SAM2 sees 2D slices. Support and query volumes may store their arrays in different orientations (the
ct-b labels run along y the other way from the DICOM), so every stack is shown in one canonical
orientation, built by an exact axis permutation and flips of the array (no resampling), and mapped back
exactly. Canonical orientations (LPS = ITK physical space):

| plane    | slice order (stack axis 0) | rows (top -> bottom)   | columns (left -> right)            |
| -------- | -------------------------- | ---------------------- | ---------------------------------- |
| axial    | inferior -> superior       | anterior -> posterior  | patient right -> left (radiological) |
| coronal  | posterior -> anterior      | superior -> inferior   | patient right -> left (radiological) |
| sagittal | left -> right              | superior -> inferior   | anterior -> posterior              |

Slice order follows increasing RAS coordinates, as 3D Slicer's slice offset sliders do.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np

from fewshotsam2 import constants
from fewshotsam2.errors import InputError
from fewshotsam2.io.volume import Volume

AXES = constants.AXES

# LPS component of each plane's normal: x = L, y = P, z = S.
_PLANE_NORMAL = {"sagittal": 0, "coronal": 1, "axial": 2}

# plane -> ((LPS component, sign) for slice, row, column): sign +1 means the index increases along +LPS.
_CANONICAL = {
    "axial": ((2, +1), (1, +1), (0, +1)),  # I->S, A->P, R->L
    "coronal": ((1, -1), (2, -1), (0, +1)),  # P->A, S->I, R->L
    "sagittal": ((0, -1), (2, -1), (1, +1)),  # L->R, S->I, A->P
}

_OBLIQUE_WARN_DEGREES = 1.0


def _axis_assignment(direction: np.ndarray) -> tuple[tuple[int, int, int], float]:
    """For each ijk axis, the LPS component it is closest to (a permutation), and the worst angle in degrees.

    Chooses the permutation that maximises the summed |cosines|, so even strongly oblique grids get
    three distinct anatomical axes.
    """
    absd = np.abs(direction)
    best = max(itertools.permutations(range(3)), key=lambda p: sum(absd[p[a], a] for a in range(3)))
    worst_cos = min(absd[best[a], a] for a in range(3))
    angle = math.degrees(math.acos(min(1.0, float(worst_cos))))
    return tuple(best), angle  # type: ignore[return-value]


class SlicePlan:
    """How to cut one volume into canonical 2D slices and put them back.

    Attributes: `array_axis` (axis of volume.array the slices are taken along), `plane`
    ("axial" / "coronal" / "sagittal"), `n_slices`, `shape` (the volume's array shape).
    """

    def __init__(self, volume: Volume, plane: str, warn_oblique: bool = True) -> None:
        if plane not in _CANONICAL:
            raise InputError(f"unknown slice plane '{plane}'; valid: {', '.join(AXES)}")
        component_of_ijk, angle = _axis_assignment(volume.direction)
        if warn_oblique and angle > _OBLIQUE_WARN_DEGREES:
            warnings.warn(
                f"volume is oblique ({angle:.1f} degrees from the anatomical axes); slicing along the nearest "
                "array axes (results stay on the volume's own grid)",
                stacklevel=3,
            )
        ijk_of_component = {c: ijk for ijk, c in enumerate(component_of_ijk)}
        perm, flips = [], []
        for component, sign in _CANONICAL[plane]:
            ijk = ijk_of_component[component]
            perm.append(2 - ijk)  # array is [k, j, i]
            flips.append(bool(np.sign(volume.direction[component, ijk]) != sign))
        self.plane = plane
        self.shape: tuple[int, int, int] = tuple(volume.shape)  # type: ignore[assignment]
        self._perm = tuple(perm)
        self._inverse = tuple(int(a) for a in np.argsort(perm))
        self._flips = tuple(flips)
        self.array_axis: int = perm[0]
        self.n_slices: int = int(self.shape[self.array_axis])
        self._spacing_by_array_axis = tuple(volume.spacing[::-1])  # spacing is (i, j, k)

    @classmethod
    def for_volume(cls, volume: Volume, axis: str = "auto") -> "SlicePlan":
        """`axis`: "auto" = acquisition axis (coarsest spacing; ties prefer axial, then coronal, then
        sagittal), or a plane name."""
        if axis not in AXES:
            raise InputError(f"unknown slice axis '{axis}'; valid: {', '.join(AXES)}")
        if axis != "auto":
            return cls(volume, axis)
        component_of_ijk, _ = _axis_assignment(volume.direction)
        spacing = np.asarray(volume.spacing, dtype=float)
        coarsest = spacing.max()
        # Relative tolerance: 3.0 vs 3.0000001 from float32 headers is a tie (isotropic), not an acquisition axis.
        tied = [ijk for ijk in range(3) if spacing[ijk] >= coarsest * (1 - 1e-3)]
        tied_components = {component_of_ijk[ijk] for ijk in tied}
        for name in ("axial", "coronal", "sagittal"):
            if _PLANE_NORMAL[name] in tied_components:
                return cls(volume, name)
        raise AssertionError("unreachable: one axis is always the coarsest")

    def _check(self, array3d: np.ndarray) -> None:
        if tuple(array3d.shape) != self.shape:
            raise ValueError(f"array shape {array3d.shape} does not match the planned volume {self.shape}")

    def view(self, array3d: np.ndarray) -> np.ndarray:
        """(n_slices, rows, cols) view of `array3d` (shaped like the volume) in canonical orientation, no copy."""
        self._check(array3d)
        out = np.transpose(array3d, self._perm)
        flip_axes = tuple(a for a in range(3) if self._flips[a])
        return np.flip(out, axis=flip_axes) if flip_axes else out

    def stack(self, array3d: np.ndarray) -> np.ndarray:
        """(n_slices, rows, cols) contiguous copy of `array3d` (shaped like the volume) in canonical orientation
        (no copy when it already is)."""
        return np.ascontiguousarray(self.view(array3d))  # contiguous: torch.from_numpy refuses negative strides

    def unstack(self, stack: np.ndarray) -> np.ndarray:
        """The exact inverse of `stack`: back to the volume's own array layout."""
        expected = tuple(self.shape[a] for a in self._perm)
        if tuple(stack.shape[:3]) != expected:
            raise ValueError(f"stack shape {stack.shape} does not match {expected}")
        flip_axes = tuple(a for a in range(3) if self._flips[a])
        out = np.flip(stack, axis=flip_axes) if flip_axes else stack
        return np.ascontiguousarray(np.transpose(out, self._inverse))

    def slice_index_to_array_index(self, i: int) -> int:
        """Stack slice index -> index along `array_axis` of the volume's array."""
        if not 0 <= i < self.n_slices:
            raise IndexError(f"slice index {i} out of range 0..{self.n_slices - 1}")
        return self.n_slices - 1 - int(i) if self._flips[0] else int(i)

    def array_index_to_slice_index(self, k: int) -> int:
        """Index along `array_axis` of the volume's array -> stack slice index."""
        return self.slice_index_to_array_index(k)  # a flip is its own inverse

    @property
    def in_plane_spacing(self) -> tuple[float, float]:
        """(row spacing, column spacing) in mm of the stacked slices."""
        return (self._spacing_by_array_axis[self._perm[1]], self._spacing_by_array_axis[self._perm[2]])

    @property
    def slice_spacing(self) -> float:
        """Distance in mm between consecutive slices."""
        return self._spacing_by_array_axis[self.array_axis]

    def __repr__(self) -> str:
        return f"SlicePlan(plane={self.plane!r}, array_axis={self.array_axis}, n_slices={self.n_slices})"
