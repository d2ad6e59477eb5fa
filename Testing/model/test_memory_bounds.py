"""Bounded memory (issue 11): slices windowed on read, the feature budget, the CPU batch caps.

What a bound drops must not change a result: the lazy slices equal the float32 stack they replace bit for bit,
and a run that keeps no features between passes (every slice encoded again) gives the same masks and scores as
one that keeps them all. Memory itself is measured by `scripts/bench_clinical.sh`, not here.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fewshotsam2.errors import InputError
from fewshotsam2.slicing.intensity import normalize
from fewshotsam2.options import SegmentOptions
from fewshotsam2.run.pipeline import segment
from fewshotsam2.model.resources import FEATURE_CACHE_ENV, cpu_feature_cache_bytes, estimate_resources
from fewshotsam2.slicing.slice_stack import SliceStack
from fewshotsam2.slicing.slices import SlicePlan
from fewshotsam2.io.volume import read_volume

from conftest import STRUCTURES, two_box_pair


@pytest.mark.parametrize("name,preset", [("abdomen-ct/ct-a", "ct-abdomen"), ("abdomen-mr", "percentile"),
                                         ("abdomen-mr", "minmax")])
@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_slice_stack_equals_the_float32_stack_bit_for_bit(shared_dir, name, preset, axis):
    volume = read_volume(shared_dir / "data" / name / "image.nii.gz")
    plan = SlicePlan(volume, axis)
    full = plan.stack(normalize(volume, preset))
    lazy = SliceStack.of(volume, plan, preset)
    assert lazy.shape == full.shape and len(lazy) == full.shape[0]
    for i in (0, full.shape[0] // 2, full.shape[0] - 1):
        one = lazy[i]
        assert one.dtype == np.float32 and one.flags.c_contiguous
        assert np.array_equal(one, full[i])
    part = lazy[2:7]
    assert part.shape == (5,) + full.shape[1:]
    assert np.array_equal(part[1], full[3]) and np.array_equal(np.asarray(part), full[2:7])
    assert np.array_equal(np.asarray(lazy), full)
    with pytest.raises(TypeError):
        lazy[[0, 1]]


def test_slice_stack_holds_a_view_of_the_volume_not_a_copy(shared_dir):
    volume = read_volume(shared_dir / "data" / "abdomen-ct" / "ct-a" / "image.nii.gz")
    lazy = SliceStack.of(volume, SlicePlan(volume, "axial"))
    assert np.shares_memory(lazy._source, volume.array)


def _reverse(pair, engine, monkeypatch, cache_mb):
    query, _, support = pair
    monkeypatch.setenv(FEATURE_CACHE_ENV, cache_mb)
    # float32 storage in both: bfloat16 (what "auto" picks past the budget) would round the features
    options = SegmentOptions.from_flat(method="reverse", image_size=64, device="cpu", untrained=True, top_k=2,
                                       min_score=0.0, slice_range="off", feature_storage="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return segment(query, [support], STRUCTURES, options, None, engine=engine)


def test_reverse_encoding_again_past_the_budget_changes_nothing(pair, engine64, monkeypatch):
    kept = _reverse(pair, engine64, monkeypatch, "1000")
    again = _reverse(pair, engine64, monkeypatch, "0")
    # 7 query slices + the support slices, once each; with no budget every slice is encoded again for the
    # reverse step's second structure and for self-propagation
    n_support = len({(u.support, u.stack_index) for u in kept.support_slices})  # shared by both structures if the same
    assert kept.encoder_calls == 7 + n_support
    assert again.encoder_calls > kept.encoder_calls
    assert [s.selected for s in kept.scores].count(True) > 0  # self-propagation ran
    assert np.array_equal(kept.labels.array, again.labels.array)
    assert [(s.value, s.slice_index, s.score, s.selected) for s in kept.scores] == \
        [(s.value, s.slice_index, s.score, s.selected) for s in again.scores]
    assert engine64.feature_budget is None and engine64.batch_size == 8  # restored after the run


@pytest.fixture(scope="module")
def pair():
    return two_box_pair()


def test_cpu_estimate_caps_the_batch_encodes_on_use_and_stores_bf16_past_the_budget(engine64, monkeypatch):
    monkeypatch.delenv(FEATURE_CACHE_ENV, raising=False)
    engine64.set_feature_storage("auto")  # as segment() sets it before estimating
    assert engine64.encode_batch_size == 1  # on a CPU the encoder runs one image at a time
    small = estimate_resources(engine64, "reverse", 20, 20, (512, 512))
    assert not small.upfront and small.batch_size == 8 and small.feature_storage is None
    assert small.encoder_calls == 20
    # 64 px features are 64 KiB in float32: 300 000 slices pass the 256 MiB budget in float32 and in bfloat16
    big = estimate_resources(engine64, "reverse", 300_000, 300_000, (8, 8))
    assert big.feature_storage == ("bfloat16", "cpu")
    kept = cpu_feature_cache_bytes() // engine64.feature_bytes_per_frame(torch.bfloat16)
    assert big.encoder_calls == 300_000 + (300_000 - kept)  # slices past the budget are encoded twice
    propagate = estimate_resources(engine64, "propagate", 300_000, 300_000, (8, 8))
    assert propagate.feature_storage is None and propagate.encoder_calls == 300_000  # read once, kept never
    assert estimate_resources(engine64, "reverse", 300_000, 300_000, (8, 8), storage="float32").feature_storage \
        is None  # an explicit storage is kept


def test_the_prediction_batch_is_capped_by_the_activation_budget_at_1024px(engine64, monkeypatch):
    monkeypatch.setattr(engine64, "image_size", 1024)
    estimate = estimate_resources(engine64, "propagate", 10, 10, (512, 512))
    assert 1 <= estimate.batch_size < engine64.batch_size


@pytest.mark.parametrize("value", ["lots", "-5"])
def test_a_bad_feature_cache_setting_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv(FEATURE_CACHE_ENV, value)
    with pytest.raises(InputError, match=FEATURE_CACHE_ENV):
        cpu_feature_cache_bytes()


def test_lpips_matching_a_chunk_of_query_slices_at_a_time_changes_nothing(pair, engine64, shared_dir, monkeypatch):
    from fewshotsam2.backends import lpips_matching

    query, _, support = pair
    options = SegmentOptions.from_flat(method="lpips", image_size=64, device="cpu", untrained=True, augmentations=2,
                                       slice_range="off",
                                       lpips_weights=str(shared_dir / "weights" / "lpips" / "alexnet_features.pth"))
    results = []
    for chunk in (1000, 3):  # every slice at once; chunks of 3 of the 7 slices (the last one short)
        monkeypatch.setattr(lpips_matching, "QUERY_CHUNK", chunk)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results.append(segment(query, [support], STRUCTURES, options, None, engine=engine64))
    whole, chunked = results
    assert len(whole.scores) == 2 * 7
    assert [(s.value, s.slice_index, s.match) for s in whole.scores] == \
        [(s.value, s.slice_index, s.match) for s in chunked.scores]
    np.testing.assert_allclose([s.score for s in whole.scores], [s.score for s in chunked.scores], atol=1e-6)
    assert np.array_equal(whole.labels.array, chunked.labels.array)
