"""`pipeline.segment` on a small synthetic pair with random-weight SAM2 at 64 px (the fast tier's end-to-end):
what the result reports (scores, matches, support slices used, slice plans) must agree with what the core did."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fewshotsam2.options import SegmentOptions
from fewshotsam2.run.pipeline import SupportCase, segment
from fewshotsam2.run.results import LpipsMatch
from fewshotsam2.slicing.slices import SlicePlan
from fewshotsam2.slicing.support import select_support_slices
from conftest import STRUCTURES, two_box_pair


@pytest.fixture(scope="module")
def pair():
    return two_box_pair()


def _run(method, pair, engine, shared_dir, **flat):
    query, _, support = pair
    options = SegmentOptions.from_flat(method=method, image_size=64, device="cpu", untrained=True, **flat,
                                       lpips_weights=str(shared_dir / "weights" / "lpips" / "alexnet_features.pth"))
    stages = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = segment(query, [support], STRUCTURES, options, lambda s, d, t: stages.append(s), engine=engine)
    return result, stages


@pytest.mark.parametrize("method", ["propagate", "reverse", "lpips"])
def test_segment_reports_what_it_did(method, pair, engine64, shared_dir):
    query, _, support = pair
    result, stages = _run(method, pair, engine64, shared_dir, shots=2, top_k=2, augmentations=1)
    assert result.labels.same_grid(query) and set(np.unique(result.labels.array)) <= {0, 2, 4}
    assert result.labels.array.dtype == np.uint8
    assert result.structures == STRUCTURES and stages

    # slice plans and support slices: exactly what support.select_support_slices picks in the canonical stack
    s_plan = result.support_plans[0]
    assert result.query_plan.array_axis == result.slice_axis == 0 and s_plan.array_axis == 0
    stack = s_plan.stack(support.labels.array)
    for s in STRUCTURES:
        used = result.support_slices_of(s.value)
        assert [u.stack_index for u in used] == select_support_slices(stack, s.value, 2)
        assert [u.array_index for u in used] == [6 - u.stack_index for u in used]  # the support's k is flipped
    n_support = len({u.stack_index for u in result.support_slices})
    if method == "lpips":
        # only support images some query slice matched are encoded: at least one, at most every candidate
        assert 7 + 1 <= result.encoder_calls <= 7 + 2 * n_support
    else:
        assert result.encoder_calls == 7 + n_support  # each slice encoded once

    if method == "propagate":
        assert result.scores == [] and result.forward_masks == {}
        return
    assert len(result.scores) == 7 * len(STRUCTURES)
    for s in STRUCTURES:
        mine = [x for x in result.scores if x.value == s.value]
        assert [x.slice_index for x in mine] == list(range(7)) and all(x.structure == s.name for x in mine)
        assert [x.stack_index for x in mine] == [result.query_plan.array_index_to_slice_index(k) for k in range(7)]
    if method == "reverse":
        assert all(x.higher_is_better and 0.0 <= x.score <= 1.0 and x.match is None for x in result.scores)
        for s in STRUCTURES:
            assert 1 <= sum(x.selected for x in result.scores if x.value == s.value) <= 2
            assert result.forward_masks[s.value].shape == query.array.shape
    else:
        used_slices = {(u.value, u.stack_index, u.array_index) for u in result.support_slices}
        for x in result.scores:
            assert not x.higher_is_better and x.score >= 0.0 and not x.selected
            assert isinstance(x.match, LpipsMatch) and x.match.support == 0 and x.match.augmentation in (0, 1)
            assert (x.value, x.match.stack_index, x.match.array_index) in used_slices
            assert str(x.match) == f"support0:slice{x.match.stack_index}:" + (
                "original" if x.match.augmentation == 0 else "aug1")


def test_first_structure_listed_keeps_shared_voxels(pair, engine64, shared_dir):
    result, _ = _run("propagate", pair, engine64, shared_dir)
    swapped = segment(pair[0], [pair[2]], STRUCTURES[::-1], SegmentOptions(method="propagate", image_size=64,
                                                                            device="cpu", untrained=True),
                      engine=engine64)
    a, b = result.labels.array, swapped.labels.array
    both = (a > 0) & (b > 0) & (a != b)  # voxels claimed by both structures
    assert both.any()  # random weights: the two masks overlap
    assert np.all(a[both] == 2) and np.all(b[both] == 4)


def test_supports_missing_a_structure_are_skipped_or_refused(pair, engine64, shared_dir):
    from fewshotsam2.errors import InputError

    query, _, support = pair
    only_box = SupportCase(support.image, support.labels.with_array(
        np.where(support.labels.array == 2, 2, 0).astype(np.uint8)), "box only")
    options = SegmentOptions(method="propagate", image_size=64, device="cpu", untrained=True)
    with pytest.raises(InputError, match="absent from box only"):
        segment(query, [only_box], STRUCTURES, options, engine=engine64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = segment(query, [only_box, support], STRUCTURES, options, engine=engine64)
    # several supports: each prompts only the structures it has
    assert {u.support for u in result.support_slices_of(2)} == {0, 1}
    assert {u.support for u in result.support_slices_of(4)} == {1}
    with pytest.raises(TypeError, match="SegmentOptions"):
        segment(query, [support], STRUCTURES, {"method": "propagate"}, engine=engine64)
    assert SlicePlan.for_volume(query).array_axis == 0
