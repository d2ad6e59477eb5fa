"""The LPIPS-matching backend (Zu et al.) end to end with real LPIPS weights (AlexNet backbone from shared/) and
the real sam2 (tiny, random weights, 256 px, CPU): ct-a supports spleen (1) and liver (5) in the abdomen MR."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from fewshotsam2.matching.augment import augment_support
from fewshotsam2.slicing.intensity import normalize
from fewshotsam2.run.pipeline import SegmentOptions, SupportCase, segment
from fewshotsam2.slicing.slices import SlicePlan

pytestmark = pytest.mark.slow  # a real-data pipeline at 256 px


def test_lpips_backend_ct_a_to_abdomen_mr(engine256, ct_a, abdomen_mr, shared_dir):
    weights = shared_dir / "weights" / "lpips" / "alexnet_features.pth"
    assert weights.is_file()
    image, labels, structures = ct_a
    query, _, _ = abdomen_mr
    chosen = [s for s in structures if s.value in (1, 5)]
    options = SegmentOptions.from_flat(method="lpips", image_size=256, device="cpu", untrained=True, augmentations=3,
                                       lpips_weights=str(weights), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = segment(query, [SupportCase(image, labels, "ct-a")], chosen, options, engine=engine256)

    out = result.labels
    assert out.shape == query.shape and out.same_grid(query)
    assert out.spacing == query.spacing and out.origin == query.origin
    np.testing.assert_array_equal(out.direction, query.direction)
    assert set(np.unique(out.array).tolist()) <= {0, 1, 5}

    # scores: every query slice x structure, with the matched augmented support named
    assert len(result.scores) == 2 * 20
    plan = SlicePlan.for_volume(image)
    support_stack = plan.stack(labels.array)
    support_images = plan.stack(normalize(image))
    matched = set()  # distinct matched support images (name, pixels)
    for v in (1, 5):
        rows = [s for s in result.scores if s.value == v]
        assert sorted(s.slice_index for s in rows) == list(range(20))
        present = np.flatnonzero((support_stack == v).any(axis=(1, 2)))
        mid = int(present[len(present) // 2])  # the 1-shot support slice
        for s in rows:
            assert (s.match.support, s.match.stack_index) == (0, mid) and 0 <= s.match.augmentation <= 3, s.match
            assert s.match.array_index == plan.slice_index_to_array_index(mid)
            assert re.fullmatch(r"support0:slice(\d+):(original|aug[123])", str(s.match))
            assert s.score >= 0.0 and not s.selected and not s.higher_is_better
        # the matched images: the augmented set is seeded, so it can be rebuilt here to tell images apart
        pairs = augment_support(support_images[mid], support_stack[mid] == v, 3, seed=0 + mid)
        for s in rows:
            matched.add((s.match, pairs[s.match.augmentation][0].tobytes()))
    assert [(u.value, u.support, u.stack_index) for u in result.support_slices] == [
        (v, 0, int(np.flatnonzero((support_stack == v).any(axis=(1, 2)))[len(np.flatnonzero(
            (support_stack == v).any(axis=(1, 2)))) // 2])) for v in (1, 5)]
    # each support image is encoded at most once (spleen and liver share the support slice, so mostly the same
    # augmented images), and only if some query slice matched it
    assert result.encoder_calls == 20 + len(matched)
    assert 1 <= len(matched) <= 8
