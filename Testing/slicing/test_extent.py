"""Structure extent: the monotone alignment, range mapping, --slice-range, and the estimate on the shared pairs."""

import json
import math
import warnings

import numpy as np
import pytest

from fewshotsam2.slicing.extent import Alignment, align, map_extent, structure_extent_mm


def _synthetic_cost(n_q, dz_q, n_s, dz_s, f):
    """Cost = distance (mm) between the support slice and the true position f(query mm), plus noise."""
    rng = np.random.default_rng(0)
    x = np.arange(n_q) * dz_q
    y = np.arange(n_s) * dz_s
    return np.abs(y[None, :] - f(x)[:, None]) / 50.0 + 0.05 * rng.random((n_q, n_s))


def test_alignment_recovers_a_shift_and_scale_across_spacings():
    f = lambda x: 1.2 * x + 20.0  # support anatomy 1.2x longer and starting 20 mm later
    cost = _synthetic_cost(60, 2.0, 40, 5.0, f)
    a = align(cost, 2.0, 5.0)
    x = np.arange(60) * 2.0
    assert np.all(np.diff(a.positions) > 0)  # monotone
    assert np.median(np.abs(a.positions - f(x))) < 5.0
    assert a.inside.all()


def test_alignment_slope_is_bounded_even_when_the_cost_says_otherwise():
    # a cost that would map every query slice onto one support slice: the slope bound forbids it
    cost = np.ones((30, 30))
    cost[:, 10] = 0.0
    a = align(cost, 3.0, 3.0)
    steps = np.diff(a.positions) / 3.0
    assert steps.min() >= 0.6 - 1e-9 and steps.max() <= 1.6 + 1e-9


def test_query_beyond_the_support_aligns_outside_it():
    # query covers 0..150 mm, support only the anatomy at 60..120 mm of the query
    f = lambda x: x - 60.0
    n_q, dz = 51, 3.0
    x = np.arange(n_q) * dz
    y = np.arange(21) * dz
    cost = np.abs(y[None, :] - f(x)[:, None]) / 30.0
    cost[(f(x) < -dz) | (f(x) > y[-1] + dz)] = 1.0  # slices the support does not show match nothing well
    a = align(cost, dz, dz)
    inside = np.flatnonzero(a.inside)
    assert abs(x[inside[0]] - 60.0) <= 2 * dz and abs(x[inside[-1]] - 120.0) <= 2 * dz


def test_extent_open_where_the_support_cuts_the_structure():
    labels = np.zeros((10, 4, 4), np.uint8)
    labels[3:7, 1, 1] = 1
    labels[0:5, 2, 2] = 2
    labels[6:10, 3, 3] = 3
    assert structure_extent_mm(labels, 1, 2.0) == (5.0, 13.0)
    assert structure_extent_mm(labels, 2, 2.0) == (-math.inf, 9.0)
    assert structure_extent_mm(labels, 3, 2.0) == (11.0, math.inf)
    assert structure_extent_mm(labels, 4, 2.0) is None


def test_map_extent_margin_and_empty():
    a = Alignment(positions=np.arange(20) * 2.0 + 10.0, inside=np.ones(20, bool), mean_cost=0.0)
    # support extent 20..30 mm = query 5..10 (2 mm slices); margin 4 mm = 2 slices
    assert map_extent(a, (20.0, 30.0), 2.0, 20, margin_mm=4.0) == (3, 12)
    assert map_extent(a, (-math.inf, 30.0), 2.0, 20, margin_mm=0.0) == (0, 10)
    assert map_extent(a, (200.0, 300.0), 2.0, 20, margin_mm=4.0) is None


# ---------------------------------------------------------------- engine feature cache (64 px, fast)

@pytest.fixture(scope="module")
def engine64():
    from fewshotsam2.model.engine import SAM2Engine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SAM2Engine.with_random_weights("tiny", image_size=64, device="cpu", batch_size=2)


def _frames(n, seed=0):
    rng = np.random.default_rng(seed)
    base = np.zeros((48, 48), np.float32)
    base[12:36, 10:38] = 0.7
    return {("q", i): np.clip(base + 0.1 * rng.random((48, 48), dtype=np.float32), 0, 1) for i in range(n)}


def test_bfloat16_storage_halves_the_cache_and_changes_logits_little(engine64):
    import torch

    frames = _frames(3)
    mask = np.zeros((48, 48), bool)
    mask[12:36, 10:38] = True
    out = {}
    for storage in ("float32", "bfloat16"):
        engine64.set_feature_storage(storage)
        engine64.reset()
        engine64.add_frames(frames)
        engine64.encode(list(frames))
        out[storage] = engine64.cached_feature_bytes
        mem = engine64.memorize([("q", 0)], [mask])
        pred = engine64.predict([("q", 1), ("q", 2)], 1, {0: mem}, num_frames=2)
        out[storage + "_mem"] = pred.memory.maskmem_features.float().clone()
        out[storage + "_masks"] = np.stack(pred.masks)
    engine64.set_feature_storage("auto")
    assert engine64.feature_dtype == torch.float32  # CPU default keeps sam2's numerics
    assert out["bfloat16"] * 2 == out["float32"] == 3 * engine64.feature_bytes_per_frame(torch.float32)
    # not bit-exact, but close: the memory features move by a few per cent, the masks by a few pixels
    rel = ((out["float32_mem"] - out["bfloat16_mem"]).norm() / out["float32_mem"].norm()).item()
    agree = (out["float32_masks"] == out["bfloat16_masks"]).mean()
    print(f"bf16 storage: memory features relative change {rel:.4f}, mask agreement {agree:.4f}")
    assert 0 < rel < 0.05
    assert agree > 0.97


def test_use_once_and_release(engine64):
    engine64.reset()
    frames = _frames(4, seed=1)
    engine64.add_frames(frames)
    keys = list(frames)
    engine64.encode(keys)
    engine64.use_once(keys[:2])
    engine64._vision(keys[:3])
    assert set(engine64._features) == set(keys[2:])  # read once: dropped; the others stay cached
    engine64.release([keys[2]])
    assert list(engine64._features) == [keys[3]]
    engine64._vision([keys[0]])  # a dropped frame is encoded again when asked for
    assert engine64.encoder_calls == 5


def test_released_support_features_are_still_kept_across_runs(engine64):
    """batch's keep_features hook: a released frame it keeps is found again without an encoder call."""
    frames = _frames(2, seed=2)
    engine64.keep_features(lambda key: key[1] == 0)
    try:
        engine64.reset()
        engine64.add_frames(frames)
        engine64.use_once(list(frames))
        engine64._vision(list(frames))
        assert not engine64._features
        engine64.reset()
        engine64.add_frames(frames)
        engine64.encode(list(frames))
        assert engine64.encoder_calls == 1  # only the frame not kept
    finally:
        engine64.keep_features(None)


# ---------------------------------------------------------------- pipeline with a user range (64 px)

def test_segment_with_a_user_range_encodes_only_inside(engine64, ct_a):
    from fewshotsam2.run.pipeline import SegmentOptions, SupportCase, segment, write_scores
    from fewshotsam2.slicing.slices import SlicePlan

    image, labels, structures = ct_a
    spleen = [s for s in structures if s.value == 1]
    options = SegmentOptions(method="propagate", image_size=64, device="cpu", untrained=True,
                             slice_range="10:14")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = segment(image, [SupportCase(image, labels)], spleen, options, engine=engine64)
    axis = SlicePlan.for_volume(image).array_axis
    assert result.slice_ranges == {1: (10, 14)}
    assert result.encoder_calls == 5 + 1  # 5 query slices + 1 support slice
    outside = np.delete(np.moveaxis(result.labels.array, axis, 0), range(10, 15), axis=0)
    assert not outside.any()
    assert not engine64._features or all(k[0] != "query" for k in engine64._features)  # dropped after use


def test_cli_refuses_bad_ranges_and_writes_nothing(tmp_path, shared_dir, capsys):
    from fewshotsam2.cli import main

    d = shared_dir / "data" / "abdomen-mr"
    out = tmp_path / "out.nii.gz"
    for bad in ("5:40", "9:3", "x"):
        rc = main(["segment", "--query", str(d / "image.nii.gz"), "--support", str(d / "image.nii.gz"),
                   str(d / "labels.nii.gz"), "--labels", "1", "--out", str(out), "--untrained",
                   "--image-size", "64", "--device", "cpu", f"--slice-range={bad}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "--slice-range" in err[0]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the shared pairs (real LPIPS weights)

@pytest.fixture(scope="module")
def estimator(shared_dir):
    from fewshotsam2.slicing.extent import ExtentEstimator

    return ExtentEstimator(weights=str(shared_dir / "weights" / "lpips" / "alexnet_features.pth"))


@pytest.mark.slow
def test_ibsr_pairs_recall_and_length(shared_dir, estimator):
    """Every ordered IBSR pair among 01/03/04/05, CSF/GM/WM, in-plane downsampled 4x to keep it fast."""
    from fewshotsam2.research.extent_eval import PAIRS_IBSR, evaluate_pairs, summary

    rows = evaluate_pairs(shared_dir / "data", PAIRS_IBSR, estimator, downsample=4)
    s = summary(rows)
    assert s["n"] == 36
    assert s["mean_recall"] >= 0.98, s
    assert s["mean_length_ratio"] <= 1.4, s


@pytest.mark.slow
def test_ct_pairs_recall(shared_dir, estimator):
    from fewshotsam2.research.extent_eval import PAIRS_CT, evaluate_pairs, summary

    s = summary(evaluate_pairs(shared_dir / "data", PAIRS_CT, estimator))
    assert s["mean_recall"] >= 0.9, s


@pytest.mark.slow
def test_extent_command_json(shared_dir, capsys):
    from fewshotsam2.cli import main

    d = shared_dir / "data"
    rc = main(["extent", "--query", str(d / "abdomen-ct" / "ct-b" / "dicom"), "--support",
               str(d / "abdomen-ct" / "ct-a" / "image.nii.gz"), str(d / "abdomen-ct" / "ct-a" / "labels.nii.gz"),
               "--labels", "1,5", "--json",
               "--lpips-weights", str(shared_dir / "weights" / "lpips" / "alexnet_features.pth")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"axis", "structures"} and out["axis"] == 0  # DICOM series: slices along numpy axis 0
    assert [set(s) for s in out["structures"]] == [{"value", "name", "first", "last"}] * 2
    assert [s["value"] for s in out["structures"]] == [1, 5]
    for s in out["structures"]:
        assert 0 <= s["first"] <= s["last"] <= 19
