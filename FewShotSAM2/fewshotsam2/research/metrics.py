"""Segmentation metrics on voxel masks with physical spacing.

Definitions (also in docs/evaluation.md):

* Dice = 2|P∩T| / (|P| + |T|). Both masks empty -> 1.0 (the structure is correctly absent); one empty -> 0.0.
* Global Dice over several cases = 2 ΣTP / (2 ΣTP + ΣFP + ΣFN), from the per-case counts (`Counts`).
* Surface of a mask = its voxels that have at least one face neighbour (6-connectivity) outside the mask;
  the array border counts as outside.
* HD95 = the 95th percentile (numpy's linear interpolation) of the symmetric surface distances: the distance in
  millimetres from every surface voxel centre of P to the nearest surface voxel centre of T, and from every surface
  voxel of T to the nearest of P, pooled into one set. Identical masks -> 0.
  Exactly one of P, T empty -> inf (the error is unbounded); both empty -> nan (nothing to measure).
* Volume error = (V_P - V_T) / V_T in percent (signed; nan when T is empty). Volumes are reported in millilitres.

Arrays are indexed [k, j, i] (the core's `Volume.array` order) and spacing is given in (i, j, k) order, as in
`Volume.spacing`; `spacing_kji` converts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from fewshotsam2.run.overlap import dice, dice_from_counts  # noqa: F401  (the package's one Dice, re-exported)

HD_PERCENTILE = 95.0


def spacing_kji(spacing_ijk: Sequence[float]) -> tuple[float, float, float]:
    """(i, j, k) spacing of a `Volume` -> per-array-axis sampling for an array indexed [k, j, i]."""
    s = tuple(float(v) for v in spacing_ijk)
    if len(s) != 3:
        raise ValueError(f"spacing needs 3 values, got {len(s)}")
    return (s[2], s[1], s[0])


def _as_bool(mask: np.ndarray) -> np.ndarray:
    return np.asarray(mask).astype(bool, copy=False)


def _check_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_bool(pred), _as_bool(truth)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    return p, t


@dataclass(frozen=True)
class Counts:
    """Voxel counts of one comparison; summing them over cases gives the global Dice."""

    tp: int
    fp: int
    fn: int

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def dice(self) -> float:
        return dice_from_counts(self.tp, self.fp, self.fn)


def counts(pred: np.ndarray, truth: np.ndarray) -> Counts:
    p, t = _check_pair(pred, truth)
    tp = int(np.count_nonzero(p & t))
    return Counts(tp=tp, fp=int(np.count_nonzero(p)) - tp, fn=int(np.count_nonzero(t)) - tp)


def global_dice(all_counts: Iterable[Counts]) -> float:
    """Dice of the summed TP/FP/FN (FS-MedSAM2's 'global' Dice); nan for no cases."""
    total: Optional[Counts] = None
    for c in all_counts:
        total = c if total is None else total + c
    return float("nan") if total is None else total.dice


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: in the mask with a face neighbour outside it (outside the array counts as outside)."""
    m = _as_bool(mask)
    if not m.any():
        return np.zeros_like(m)
    from scipy import ndimage  # imported on use: `fewshotsam2 evaluate --help` stays fast

    # border_value=0 makes voxels on the array border boundary voxels
    eroded = ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(m.ndim, 1), border_value=0)
    return m & ~eroded


def _bbox_crop(*masks: np.ndarray) -> tuple[slice, ...]:
    union = np.zeros_like(masks[0])
    for m in masks:
        union |= m
    idx = np.nonzero(union)
    return tuple(slice(int(a.min()), int(a.max()) + 1) for a in idx)


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(distances from pred's surface to truth's, from truth's surface to pred's), in mm.

    `spacing` is per array axis (use `spacing_kji` for a `Volume`). Both masks must be non-empty.
    """
    p, t = _check_pair(pred, truth)
    if not p.any() or not t.any():
        raise ValueError("surface distances need two non-empty masks")
    sampling = tuple(float(s) for s in spacing)
    if len(sampling) != p.ndim:
        raise ValueError(f"spacing has {len(sampling)} values for a {p.ndim}-D mask")
    # Crop to the union's bounding box and pad by one outside voxel: nearest surface points always lie inside
    # the box, and the padding reproduces the array border as "outside", so the result is exact and fast.
    box = _bbox_crop(p, t)
    p = np.pad(p[box], 1)
    t = np.pad(t[box], 1)
    sp, st = surface(p), surface(t)
    from scipy import ndimage

    dist_to_t = ndimage.distance_transform_edt(~st, sampling=sampling)
    dist_to_p = ndimage.distance_transform_edt(~sp, sampling=sampling)
    return dist_to_t[sp], dist_to_p[st]


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], percentile: float = HD_PERCENTILE) -> float:
    """Percentile of the pooled symmetric surface distances in mm; inf if one mask is empty, nan if both are."""
    p, t = _check_pair(pred, truth)
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return float("nan")
    if p_any != t_any:
        return float("inf")
    a, b = surface_distances(p, t, spacing)
    return float(np.percentile(np.concatenate([a, b]), percentile))


def voxel_volume_ml(spacing: Sequence[float]) -> float:
    return float(np.prod([float(s) for s in spacing])) / 1000.0


def volume_error_percent(pred: np.ndarray, truth: np.ndarray) -> float:
    """Signed relative volume error (V_pred - V_true) / V_true * 100; nan if the truth is empty."""
    p, t = _check_pair(pred, truth)
    vt = int(np.count_nonzero(t))
    if vt == 0:
        return float("nan")
    return 100.0 * (int(np.count_nonzero(p)) - vt) / vt


@dataclass
class MaskMetrics:
    dice: float
    hd95_mm: float
    volume_pred_ml: float
    volume_true_ml: float
    volume_error_pct: float
    counts: Counts


def compare(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> MaskMetrics:
    """All metrics of one prediction against one truth; `spacing` per array axis, in mm."""
    p, t = _check_pair(pred, truth)
    c = counts(p, t)
    vox = voxel_volume_ml(spacing)
    return MaskMetrics(
        dice=c.dice,
        hd95_mm=hd95(p, t, spacing),
        volume_pred_ml=(c.tp + c.fp) * vox,
        volume_true_ml=(c.tp + c.fn) * vox,
        volume_error_pct=volume_error_percent(p, t),
        counts=c,
    )


def per_slice_dice(pred: np.ndarray, truth: np.ndarray, axis: int) -> np.ndarray:
    """Dice of each slice along `axis` (1.0 where both slices are empty)."""
    p, t = _check_pair(pred, truth)
    p = np.moveaxis(p, axis, 0).reshape(p.shape[axis], -1)
    t = np.moveaxis(t, axis, 0).reshape(t.shape[axis], -1)
    tp = np.count_nonzero(p & t, axis=1)
    denom = np.count_nonzero(p, axis=1) + np.count_nonzero(t, axis=1)
    out = np.ones(len(tp), dtype=float)
    nz = denom > 0
    out[nz] = 2.0 * tp[nz] / denom[nz]
    return out


def labeled_extent(truth: np.ndarray, axis: int) -> np.ndarray:
    """Bool per slice along `axis`: True from the first to the last slice containing the structure (inclusive).

    This is the SSL-ALPNet protocol's evaluated range. All False for an empty truth.
    """
    t = _as_bool(truth)
    other = tuple(a for a in range(t.ndim) if a != axis)
    present = t.any(axis=other)
    out = np.zeros(t.shape[axis], dtype=bool)
    idx = np.flatnonzero(present)
    if idx.size:
        out[idx[0]: idx[-1] + 1] = True
    return out


def keep_slices(mask: np.ndarray, axis: int, keep: np.ndarray) -> np.ndarray:
    """Copy of `mask` with the slices along `axis` where `keep` is False set to background."""
    m = _as_bool(mask).copy()
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (m.shape[axis],):
        raise ValueError(f"keep has shape {keep.shape}, expected ({m.shape[axis]},)")
    view = np.moveaxis(m, axis, 0)  # a view: writing into it writes into m
    view[~keep] = False
    return m


def finite_mean_sd(values: Iterable[float]) -> tuple[float, float, int, int]:
    """(mean, sample sd, n finite, n non-finite) of the finite values; sd is nan for fewer than 2 values.

    HD95 is inf for an empty prediction; summaries report such cases as a count instead of averaging them in.
    """
    arr = np.asarray([float(v) for v in values], dtype=float)
    fin = arr[np.isfinite(arr)]
    n_bad = int(arr.size - fin.size)
    if fin.size == 0:
        return float("nan"), float("nan"), 0, n_bad
    sd = float(np.std(fin, ddof=1)) if fin.size > 1 else float("nan")
    return float(np.mean(fin)), sd, int(fin.size), n_bad


def format_mean_sd(mean: float, sd: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "n/a"
    if math.isnan(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"
