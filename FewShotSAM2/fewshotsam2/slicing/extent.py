"""Where along the slice axis each structure can be: the query's slice range, estimated from the supports.

A real CT has 300-600 slices and most organs span a fraction of them. Encoding and predicting only the slices
where the structure can be saves most of the time and stops prompt-based methods painting the structure far
outside it. The range comes from the supports:

1. Every query slice and every support slice (not only the labeled ones) are resampled to one field of view
   (same mm per pixel, centred on the body, as the LPIPS backend does) and compared with LPIPS (AlexNet):
   a cost matrix C[i, j].
2. A monotone alignment maps each query slice to a position (mm) along the support's slice axis by dynamic
   programming over C. The support axis is sampled on a fine grid in mm, so volumes with different slice
   spacings align; between two consecutive query slices the support position advances by `slope` x the query
   spacing, `slope` in [SLOPE_MIN, SLOPE_MAX] (bodies differ in height, not in the order of their organs). The
   support axis is extended on both sides with "outside" cells at a fixed cost, so a query that covers more (or
   less, or other) anatomy than the support aligns only where they overlap.
3. The structure's labeled extent in the support (mm) is mapped back through the alignment to query positions,
   widened by a margin in mm, and rounded outwards to slice indices.
4. Several supports: the union of their ranges (a slice missed here can never be segmented; an extra slice only
   costs time).

Slice stacks are in the canonical orientation of `slices.SlicePlan` (slice order = increasing RAS coordinate), so
"monotone" means the same anatomical direction in query and support whatever their arrays' layouts.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from fewshotsam2.matching.lpips_distance import QUERY_CHUNK, body_box, resample_to_fov, shared_lpips
from fewshotsam2.model.device import pick_device
from fewshotsam2.settings import LPIPS_WEIGHTS_ENV
from fewshotsam2.slicing.intensity import choose_preset
from fewshotsam2.slicing.slice_range import AUTO, parse_slice_ranges
from fewshotsam2.slicing.slice_stack import SliceStack
from fewshotsam2.slicing.slices import SlicePlan


# Local slope of the alignment (support mm per query mm). Adult trunks and heads differ in length by up to about
# 1.4x between people; a local bound a little wider lets organs shift within the body.
SLOPE_MIN = 0.6
SLOPE_MAX = 1.6
# Fine grid of the support axis, in query slice spacings (slope resolution 1/8).
GRID_DIVISIONS = 8
# Widening of each end of the estimated range. Measured (docs/benchmarks.md): alignment errors at the ends of
# organs are mostly under one centimetre on the shared pairs.
MARGIN_MM = 15.0
# Cost of aligning a query slice outside the support's coverage, as a quantile of that slice's LPIPS row:
# a slice the support covers finds a match clearly below it; one outside does not. Measured on the shared
# pairs (docs/benchmarks.md): 0.25 lets crops slide off each other (CT pairs mean recall 0.90), 0.5 and 0.75
# give 0.98; IBSR is the same for all three.
OUTSIDE_QUANTILE = 0.5
LPIPS_SIZE = 224
# Oblique slices (issue 21): a query slice tilted by t from the anatomical plane cuts through levels spread over
# its in-plane extent x sin t, so a structure appears on more slices than its height says. Up to this tilt the
# range is widened by that spread (half the body's in-plane extent x tan t at each end); beyond it the estimate
# is not trusted at all (LPIPS compares slices tilted that much with upright support slices; ct-a resampled at
# 25 degrees gave recall 0.29) and every slice is segmented, with a warning. Scanner gantry tilts stay under it.
OBLIQUE_RANGE_DEGREES = 15.0


@dataclass
class StackInfo:
    """One volume's canonical slice stack and its geometry."""

    images: np.ndarray  # float [0, 1] (n, h, w)
    spacing: tuple[float, float]  # in-plane (row, column) mm
    slice_spacing: float  # mm between consecutive slices
    labels: Optional[np.ndarray] = None  # integer (n, h, w) on the same stack (supports)
    # supports, instead of `labels`: label value -> bool (n,) which slices hold it (all the estimate reads)
    present: Optional[dict] = None
    box: Optional[tuple] = None  # lpips_distance.body_box of the stack, if already known (computed once otherwise)
    tilt: float = 0.0  # degrees between the slice normal and the nearest anatomical axis (`slice_tilt_degrees`)

    def body_box(self) -> tuple:
        """(centre row, centre column, extent mm) of the body, computed on first use and kept: a query is
        compared with every support."""
        if self.box is None:
            self.box = body_box(self.images, self.spacing)
        return self.box

    def slices_with(self, value: int) -> np.ndarray:
        if self.present is not None:
            return np.asarray(self.present.get(value, np.zeros(self.images.shape[0], bool)), bool)
        if self.labels is None:
            raise ValueError("a support stack needs its labels")
        return (self.labels == value).reshape(self.labels.shape[0], -1).any(axis=1)


@dataclass
class Alignment:
    """Support position (mm along the support's slice axis, slice 0 at 0 mm) of every query slice."""

    positions: np.ndarray  # float (n_query,)
    inside: np.ndarray  # bool (n_query,): aligned within the support's coverage
    mean_cost: float  # mean LPIPS along the path over inside slices (lower = better match)


@dataclass
class SliceRange:
    """Inclusive range of slices of the query's canonical stack where a structure can be (empty: first > last)."""

    value: int
    name: str
    first: int
    last: int
    per_support: list[Optional[tuple[int, int]]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.first > self.last

    def __len__(self) -> int:
        return max(0, self.last - self.first + 1)


def _fine_cost(cost_row: np.ndarray, support_mm: np.ndarray, grid: np.ndarray, outside: float,
               half_slice: float) -> np.ndarray:
    """Cost of the query slice at every support grid position: linear between support slices, `outside` beyond."""
    c = np.interp(grid, support_mm, cost_row)
    beyond = (grid < support_mm[0] - half_slice) | (grid > support_mm[-1] + half_slice)
    c[beyond] = outside
    return c


def align(cost: np.ndarray, query_spacing: float, support_spacing: float,
          slope: tuple[float, float] = (SLOPE_MIN, SLOPE_MAX),
          outside_quantile: float = OUTSIDE_QUANTILE) -> Alignment:
    """Monotone alignment of query slices (rows of `cost`) to support positions (columns), in millimetres.

    Dynamic programming over (query slice, support grid cell): D[i, k] = c(i, k) + min over allowed steps d of
    D[i - 1, k - d]; the path may start and end anywhere (open ends), every query slice gets one position.
    """
    cost = np.asarray(cost, dtype=np.float64)
    n_q, n_s = cost.shape
    if n_q == 0 or n_s == 0:
        raise ValueError("empty cost matrix")
    h = query_spacing / GRID_DIVISIONS
    d_min = max(1, math.ceil(slope[0] * query_spacing / h - 1e-9))
    d_max = max(d_min, math.floor(slope[1] * query_spacing / h + 1e-9))
    support_mm = np.arange(n_s) * support_spacing
    # room outside the support for every query slice at the steepest slope
    pad = slope[1] * query_spacing * n_q
    grid = np.arange(-pad, support_mm[-1] + pad + h / 2, h)
    n_cells = grid.size
    outside = np.quantile(cost, outside_quantile, axis=1)
    half = support_spacing / 2.0

    back = np.zeros((n_q, n_cells), dtype=np.int16)  # step taken into (i, k)
    d_prev = _fine_cost(cost[0], support_mm, grid, outside[0], half)
    for i in range(1, n_q):
        best = np.full(n_cells, np.inf)
        arg = np.zeros(n_cells, dtype=np.int16)
        for d in range(d_min, d_max + 1):
            cand = np.full(n_cells, np.inf)
            cand[d:] = d_prev[:-d]
            better = cand < best
            best[better] = cand[better]
            arg[better] = d
        d_prev = best + _fine_cost(cost[i], support_mm, grid, outside[i], half)
        back[i] = arg
    k = int(np.argmin(d_prev))
    cells = np.empty(n_q, dtype=np.int64)
    for i in range(n_q - 1, -1, -1):
        cells[i] = k
        k -= int(back[i, k])
    positions = grid[cells]
    inside = (positions >= support_mm[0] - half) & (positions <= support_mm[-1] + half)
    on_path = [np.interp(positions[i], support_mm, cost[i]) for i in range(n_q) if inside[i]]
    return Alignment(positions, inside, float(np.mean(on_path)) if on_path else float("inf"))


def structure_extent_mm(labels: np.ndarray, value: int, slice_spacing: float) -> Optional[tuple[float, float]]:
    """See `extent_mm_of_slices`; `labels` is an integer (n, h, w) stack."""
    return extent_mm_of_slices((labels == value).reshape(labels.shape[0], -1).any(axis=1), slice_spacing)


def extent_mm_of_slices(has: np.ndarray, slice_spacing: float) -> Optional[tuple[float, float]]:
    """(start, end) mm of a structure's labeled slices along the stack axis, each slice counted +-half a slice.

    An end on the support's first or last slice is infinite: the scan was cut through the structure there.
    """
    present = np.flatnonzero(has)
    if present.size == 0:
        return None
    # a structure cut by the support's first or last slice goes on beyond it: open on that side
    lo = -math.inf if present[0] == 0 else (present[0] - 0.5) * slice_spacing
    hi = math.inf if present[-1] == len(has) - 1 else (present[-1] + 0.5) * slice_spacing
    return lo, hi


def map_extent(alignment: Alignment, extent_mm: tuple[float, float], query_spacing: float, n_query: int,
               margin_mm: float = MARGIN_MM) -> Optional[tuple[int, int]]:
    """Query slices whose aligned position falls in the support extent, widened by `margin_mm`; None if none."""
    pos = alignment.positions
    x = np.arange(n_query) * query_spacing
    lo, hi = extent_mm
    # pos increases strictly along the query, so the inverse map is linear interpolation; beyond the aligned
    # positions extrapolate at slope 1 (the extent then lies outside the query and the range comes out empty)
    def inverse(y: float) -> float:
        if y <= pos[0]:
            return x[0] - (pos[0] - y)
        if y >= pos[-1]:
            return x[-1] + (y - pos[-1])
        return float(np.interp(y, pos, x))

    x0 = inverse(lo) - margin_mm
    x1 = inverse(hi) + margin_mm
    first = 0 if x0 == -math.inf else max(0, math.ceil(x0 / query_spacing - 1e-6)) if x0 != math.inf else n_query
    last = n_query - 1 if x1 == math.inf else min(n_query - 1, math.floor(x1 / query_spacing + 1e-6)) \
        if x1 != -math.inf else -1
    if first > last:
        return None
    return first, last


class ExtentEstimator:
    """LPIPS features of slice stacks at one field of view, and the ranges they imply."""

    def __init__(self, net: str = "alex", weights: Optional[str] = None, device: str = "cpu",
                 size: int = LPIPS_SIZE, margin_mm: float = MARGIN_MM,
                 outside_quantile: float = OUTSIDE_QUANTILE) -> None:
        self.matcher = shared_lpips(net, weights, device, size)
        self.margin_mm = float(margin_mm)
        self.outside_quantile = float(outside_quantile)

    def cost_matrix(self, query: StackInfo, support: StackInfo) -> np.ndarray:
        """LPIPS between every query slice and every support slice at one field of view."""
        qbox, sbox = query.body_box(), support.body_box()
        fov = 1.1 * max(qbox[2], sbox[2])
        size = self.matcher.size
        sf = self.matcher.features(resample_to_fov(support.images, support.spacing, fov, size, center=sbox[:2]))
        # query slices a chunk at a time: LPIPS features are 1.3 MB per slice at 224 px, so a 300-slice query
        # would otherwise hold 400 MB of them next to the support's
        rows = []
        for start in range(0, query.images.shape[0], QUERY_CHUNK):
            chunk = resample_to_fov(query.images[start : start + QUERY_CHUNK], query.spacing, fov, size,
                                    center=qbox[:2])
            rows.append(self.matcher.distance_matrix(self.matcher.features(chunk), sf).cpu().numpy())
        return np.concatenate(rows)

    def estimate(self, query: StackInfo, supports: Sequence[StackInfo], structures: Sequence[tuple[int, str]],
                 ) -> list[SliceRange]:
        """One `SliceRange` per (value, name) in `structures`, in the query's stack indices.

        An oblique query gets each end widened by the levels its slices spread over; past OBLIQUE_RANGE_DEGREES
        (query or support) every slice is returned, with a warning."""
        n_q = query.images.shape[0]
        tilt = max([query.tilt] + [s.tilt for s in supports])
        if tilt > OBLIQUE_RANGE_DEGREES:
            which = "the query" if query.tilt > OBLIQUE_RANGE_DEGREES else "a support"
            warnings.warn(f"{which} is cut {tilt:.0f} degrees oblique to the anatomical axes (over "
                          f"{OBLIQUE_RANGE_DEGREES:.0f}): the slice range cannot be estimated reliably; every slice is "
                          "segmented (give --slice-range FIRST:LAST to narrow it)", stacklevel=2)
            return [SliceRange(int(value), name, 0, n_q - 1) for value, name in structures]
        margin = self.margin_mm + oblique_spread_mm(query)
        per_support: list[list[Optional[tuple[int, int]]]] = [[] for _ in structures]
        for support in supports:
            alignment = align(self.cost_matrix(query, support), query.slice_spacing, support.slice_spacing,
                              outside_quantile=self.outside_quantile)
            for s, (value, _) in enumerate(structures):
                extent = extent_mm_of_slices(support.slices_with(value), support.slice_spacing)
                per_support[s].append(None if extent is None else
                                      map_extent(alignment, extent, query.slice_spacing, n_q, margin))
        ranges = []
        for (value, name), found in zip(structures, per_support):
            got = [r for r in found if r is not None]
            first, last = (min(r[0] for r in got), max(r[1] for r in got)) if got else (0, -1)
            ranges.append(SliceRange(int(value), name, first, last, found))
        return ranges


def oblique_spread_mm(info: StackInfo) -> float:
    """How far (mm along the slice normal) a structure reaches beyond its level band in a stack tilted by
    `info.tilt`: half the body's in-plane extent x tan(tilt); 0 for upright slices (up to 1 degree, as the
    oblique warning of slices.py)."""
    if info.tilt <= 1.0:
        return 0.0
    return 0.5 * info.body_box()[2] * math.tan(math.radians(info.tilt))


def slice_tilt_degrees(volume, plan) -> float:
    """Degrees between the normal of `plan`'s slices (the volume's array axis it cuts along) and the nearest
    anatomical axis. In-plane rotation does not count: it moves no slice to other levels."""
    ijk = 2 - plan.array_axis  # array is [k, j, i]
    normal = np.asarray(volume.direction, float)[:, ijk]
    cos = float(np.max(np.abs(normal)) / np.linalg.norm(normal))
    return math.degrees(math.acos(min(1.0, cos)))


# ---------------------------------------------------------------- volumes -> stacks

def stack_info(image, labels=None, axis: str = "auto", preset: str = "auto") -> tuple[StackInfo, "object"]:
    """(StackInfo, SlicePlan) of a Volume (and its label Volume on the same grid) in canonical orientation."""
    plan = SlicePlan.for_volume(image, axis)
    kind = choose_preset(image) if preset == "auto" else preset
    info = StackInfo(SliceStack.of(image, plan, kind), plan.in_plane_spacing, plan.slice_spacing,
                     None if labels is None else plan.stack(labels.array), tilt=slice_tilt_degrees(image, plan))
    return info, plan


def check_named_weights(options) -> None:
    """Before any work: with an automatic slice range, AlexNet weights the user named (--lpips-weights,
    --extent-weights, $FEWSHOTSAM2_LPIPS_WEIGHTS) must load; a bad file is an error (exit 2), never a silent
    fall-back to every slice. Weights nobody named (torchvision's download) may still be missing: the range is
    then off with a warning. Loaded once: the run reuses them."""
    if AUTO not in parse_slice_ranges(options.slice_range).values():
        return
    weights = (options.extent_weights or getattr(options.method_options, "weights", None)
               or os.environ.get(LPIPS_WEIGHTS_ENV))
    if weights:
        ExtentEstimator("alex", weights, str(pick_device(options.device)))
