"""Metrics against independent computations: hand-counted overlaps, analytic distances, brute-force HD95."""

import itertools
import math

import numpy as np
import pytest

from fewshotsam2.research import metrics as M


# ------------------------------------------------------------------ independent reference implementations


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Surface by looping over voxels: a voxel of the mask with a face neighbour outside it or outside the array."""
    out = np.zeros_like(mask, dtype=bool)
    for idx in zip(*np.nonzero(mask)):
        for axis in range(mask.ndim):
            for step in (-1, 1):
                n = list(idx)
                n[axis] += step
                if not (0 <= n[axis] < mask.shape[axis]) or not mask[tuple(n)]:
                    out[idx] = True
    return out


def brute_hd95(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    """All pairwise distances between surface points in mm; pooled directed minima; 95th percentile."""
    a = np.argwhere(brute_surface(pred)) * np.asarray(spacing, dtype=float)
    b = np.argwhere(brute_surface(truth)) * np.asarray(spacing, dtype=float)
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    pooled = np.concatenate([d.min(axis=1), d.min(axis=0)])
    return float(np.percentile(pooled, 95))


def box(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


# ------------------------------------------------------------------ Dice and counts


def test_dice_known_overlap():
    a = box((10, 10, 10), (0, 0, 0), (4, 4, 4))  # 64 voxels
    b = box((10, 10, 10), (2, 0, 0), (6, 4, 4))  # 64 voxels, 32 shared
    c = M.counts(a, b)
    assert (c.tp, c.fp, c.fn) == (32, 32, 32)
    assert M.dice(a, b) == pytest.approx(2 * 32 / (64 + 64))
    assert M.dice(a, a) == 1.0


def test_dice_matches_set_computation_on_random_masks():
    rng = np.random.default_rng(1)
    for _ in range(5):
        p = rng.random((6, 7, 8)) < 0.3
        t = rng.random((6, 7, 8)) < 0.4
        sp = {tuple(x) for x in np.argwhere(p)}
        st = {tuple(x) for x in np.argwhere(t)}
        expected = 2 * len(sp & st) / (len(sp) + len(st))
        assert M.dice(p, t) == pytest.approx(expected)


def test_dice_empty_cases():
    z = np.zeros((3, 3, 3), bool)
    one = z.copy()
    one[1, 1, 1] = True
    assert M.dice(z, z) == 1.0  # correctly absent
    assert M.dice(z, one) == 0.0  # empty prediction
    assert M.dice(one, z) == 0.0  # empty truth, something predicted


def test_global_dice_sums_counts_over_cases():
    a1, t1 = box((8, 8, 8), (0, 0, 0), (2, 2, 2)), box((8, 8, 8), (0, 0, 0), (2, 2, 4))  # tp 8, fp 0, fn 8
    a2, t2 = box((8, 8, 8), (0, 0, 0), (4, 4, 4)), box((8, 8, 8), (0, 0, 0), (4, 4, 2))  # tp 32, fp 32, fn 0
    g = M.global_dice([M.counts(a1, t1), M.counts(a2, t2)])
    assert g == pytest.approx(2 * 40 / (2 * 40 + 32 + 8))
    per_case_mean = (M.dice(a1, t1) + M.dice(a2, t2)) / 2
    assert per_case_mean == pytest.approx((16 / 24 + 64 / 96) / 2)
    assert math.isnan(M.global_dice([]))


# ------------------------------------------------------------------ surfaces and HD95


def test_surface_matches_brute_force_including_array_border():
    rng = np.random.default_rng(2)
    m = rng.random((5, 6, 7)) < 0.6  # dense: many voxels touch the array border
    assert np.array_equal(M.surface(m), brute_surface(m))
    full = np.ones((3, 4, 5), bool)
    assert np.array_equal(M.surface(full), brute_surface(full))
    assert M.surface(full)[1, 1:3, 1:4].sum() == 0  # the interior voxels are not surface


def test_hd95_identical_is_zero():
    m = box((6, 6, 6), (1, 1, 1), (4, 5, 3))
    assert M.hd95(m, m, (1.0, 2.0, 3.0)) == 0.0


def test_hd95_single_voxels_anisotropic_spacing_in_volume_order():
    # Volume spacing is (i, j, k) = (0.5, 1, 3); arrays are [k, j, i]
    spacing = M.spacing_kji((0.5, 1.0, 3.0))
    assert spacing == (3.0, 1.0, 0.5)
    a = np.zeros((5, 5, 5), bool)
    b = a.copy()
    a[0, 0, 0] = True
    b[2, 0, 0] = True  # two steps along k: 6 mm
    assert M.hd95(a, b, spacing) == pytest.approx(6.0)
    b2 = np.zeros_like(a)
    b2[0, 0, 2] = True  # two steps along i: 1 mm
    assert M.hd95(a, b2, spacing) == pytest.approx(1.0)
    b3 = np.zeros_like(a)
    b3[1, 2, 4] = True
    assert M.hd95(a, b3, spacing) == pytest.approx(math.sqrt(3.0**2 + 2.0**2 + 2.0**2))


def test_hd95_parallel_slabs_known_distance():
    # Two one-voxel-thick full planes n slices apart: every surface point is exactly n * s from the other plane.
    for axis, spacing in itertools.product(range(3), [(1.0, 1.0, 1.0), (2.5, 0.7, 1.3)]):
        shape = (7, 8, 9)
        a = np.zeros(shape, bool)
        b = np.zeros(shape, bool)
        np.moveaxis(a, axis, 0)[1] = True
        np.moveaxis(b, axis, 0)[5] = True
        assert M.hd95(a, b, spacing) == pytest.approx(4 * spacing[axis])


def test_hd95_is_95th_percentile_of_pooled_distances():
    # pred = {p0}; truth = {p0, p1}; directed distances: pred->truth [0], truth->pred [0, d]; pooled [0, 0, d]
    # 95th percentile with linear interpolation: position 0.95 * 2 = 1.9 -> 0.9 d
    a = np.zeros((3, 3, 12), bool)
    b = a.copy()
    a[1, 1, 0] = True
    b[1, 1, 0] = True
    b[1, 1, 10] = True
    spacing = (1.0, 1.0, 0.8)
    assert M.hd95(a, b, spacing) == pytest.approx(0.9 * 10 * 0.8)
    assert M.hd95(b, a, spacing) == pytest.approx(0.9 * 10 * 0.8)  # symmetric


@pytest.mark.parametrize("seed", range(6))
def test_hd95_matches_brute_force_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(4, 9, size=3))
    p = rng.random(shape) < rng.uniform(0.05, 0.5)
    t = rng.random(shape) < rng.uniform(0.05, 0.5)
    p[tuple(rng.integers(0, s) for s in shape)] = True  # never empty
    t[tuple(rng.integers(0, s) for s in shape)] = True
    spacing = tuple(rng.uniform(0.3, 4.0, size=3))
    assert M.hd95(p, t, spacing) == pytest.approx(brute_hd95(p, t, spacing), rel=1e-9, abs=1e-9)


def test_hd95_crop_is_exact_for_small_objects_in_large_arrays():
    rng = np.random.default_rng(7)
    small_p = rng.random((4, 5, 3)) < 0.5
    small_t = rng.random((4, 5, 3)) < 0.5
    small_p[0, 0, 0] = small_t[3, 4, 2] = True
    big_p = np.zeros((30, 40, 20), bool)
    big_t = big_p.copy()
    big_p[10:14, 20:25, 5:8] = small_p
    big_t[10:14, 20:25, 5:8] = small_t
    spacing = (2.0, 0.5, 1.5)
    assert M.hd95(big_p, big_t, spacing) == pytest.approx(brute_hd95(small_p, small_t, spacing))


def test_hd95_empty_prediction_or_truth():
    z = np.zeros((4, 4, 4), bool)
    one = z.copy()
    one[2, 2, 2] = True
    assert math.isinf(M.hd95(z, one, (1, 1, 1)))
    assert math.isinf(M.hd95(one, z, (1, 1, 1)))
    assert math.isnan(M.hd95(z, z, (1, 1, 1)))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        M.dice(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool))


# ------------------------------------------------------------------ volumes


def test_volumes_and_volume_error_with_anisotropic_spacing():
    spacing = M.spacing_kji((0.5, 1.0, 3.0))  # voxel = 1.5 mm^3
    t = box((6, 6, 6), (0, 0, 0), (2, 3, 4))  # 24 voxels = 36 mm^3
    p = box((6, 6, 6), (0, 0, 0), (3, 3, 4))  # 36 voxels = 54 mm^3
    m = M.compare(p, t, spacing)
    assert m.volume_true_ml == pytest.approx(0.036)
    assert m.volume_pred_ml == pytest.approx(0.054)
    assert m.volume_error_pct == pytest.approx(50.0)
    assert m.dice == pytest.approx(2 * 24 / 60)
    z = np.zeros_like(t)
    assert M.volume_error_percent(z, t) == pytest.approx(-100.0)
    assert math.isnan(M.volume_error_percent(p, z))
    e = M.compare(z, t, spacing)
    assert e.dice == 0.0 and math.isinf(e.hd95_mm) and e.volume_pred_ml == 0.0


# ------------------------------------------------------------------ slices, extent, summaries


def test_per_slice_dice_matches_loop():
    rng = np.random.default_rng(3)
    p = rng.random((5, 6, 7)) < 0.3
    t = rng.random((5, 6, 7)) < 0.3
    t[:, 2] = False
    p[:, 2] = False  # a slice empty in both -> 1.0
    for axis in range(3):
        got = M.per_slice_dice(p, t, axis)
        for s in range(p.shape[axis]):
            ps, ts = np.take(p, s, axis=axis), np.take(t, s, axis=axis)
            denom = ps.sum() + ts.sum()
            want = 1.0 if denom == 0 else 2 * (ps & ts).sum() / denom
            assert got[s] == pytest.approx(want)
    assert M.per_slice_dice(p, t, 1)[2] == 1.0


def test_labeled_extent_and_keep_slices():
    t = np.zeros((4, 10, 5), bool)
    t[1, 3, 2] = True
    t[2, 7, 1] = True
    ext = M.labeled_extent(t, axis=1)
    assert ext.tolist() == [False] * 3 + [True] * 5 + [False] * 2
    assert M.labeled_extent(np.zeros_like(t), axis=1).sum() == 0
    p = np.ones_like(t)
    kept = M.keep_slices(p, 1, ext)
    assert kept.sum() == 4 * 5 * 5
    assert not kept[:, :3].any() and kept[:, 3:8].all()
    assert p.all()  # the input is not modified


def test_finite_mean_sd_ignores_inf_and_counts_it():
    mean, sd, n, n_bad = M.finite_mean_sd([1.0, 3.0, float("inf"), float("nan")])
    assert (mean, n, n_bad) == (2.0, 2, 2)
    assert sd == pytest.approx(math.sqrt(2.0))
    mean, sd, n, n_bad = M.finite_mean_sd([float("inf")])
    assert math.isnan(mean) and n == 0 and n_bad == 1
    assert M.format_mean_sd(0.5, 0.25) == "0.500 ± 0.250"
    assert M.format_mean_sd(float("nan"), float("nan")) == "n/a"
