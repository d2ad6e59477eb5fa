"""Reverse propagation (RevSAM2) end to end with the real sam2 (tiny, random weights, CPU) on cross-subject pairs:
abdomen ct-a -> ct-b (DICOM, labels on a y-flipped grid) for liver (5) and spleen (1), and brain ibsr-01 ->
ibsr-03 (coronal acquisition: slices along the array's j axis; a 24-slice slab) for CSF (1)."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest

from fewshotsam2.model.engine import SAM2Engine
from fewshotsam2.run.pipeline import SegmentOptions, SupportCase, segment, write_scores
from fewshotsam2.slicing.slices import SlicePlan
from fewshotsam2.io.volume import Volume, read_labels, read_volume

pytestmark = pytest.mark.slow  # real-data pipelines


def _support_slices(case: SupportCase, values) -> set:
    """ct-a / ibsr middle labeled slice per structure (1 shot), computed here from the labels."""
    plan = SlicePlan.for_volume(case.image)
    stack = plan.stack(case.labels.array)
    out = set()
    for v in values:
        present = np.flatnonzero((stack == v).any(axis=(1, 2)))
        out.add(int(present[len(present) // 2]))
    return out


def _check(result, query, values, top_k):
    out = result.labels
    assert out.shape == query.shape and out.same_grid(query)
    assert out.spacing == query.spacing and out.origin == query.origin
    np.testing.assert_array_equal(out.direction, query.direction)
    assert set(np.unique(out.array).tolist()) <= {0, *values}
    n = query.shape[result.slice_axis]
    assert len(result.scores) == n * len(values)  # every slice x structure
    for v in values:
        rows = [s for s in result.scores if s.value == v]
        assert sorted(s.slice_index for s in rows) == list(range(n))  # the slice axis, each slice once
        assert all(0.0 <= s.score <= 1.0 for s in rows)
        selected = [s for s in rows if s.selected]
        assert 1 <= len(selected) <= top_k
        assert min(s.score for s in selected) >= max([s.score for s in rows if not s.selected] or [0.0])
        assert all(s.score > 0 for s in selected)
        assert result.forward_masks[v].shape == out.shape and result.forward_masks[v].dtype == bool
    return out


def test_reverse_ct_a_to_ct_b_liver_and_spleen(engine256, ct_a, shared_dir, tmp_path):
    image, labels, structures = ct_a
    folder = shared_dir / "data" / "abdomen-ct" / "ct-b"
    query = read_volume(folder / "dicom")
    chosen = [next(s for s in structures if s.value == v) for v in (5, 1)]  # liver first: it wins overlaps
    # the listing order settles overlaps here: the check below reads liver's conditional slices unchanged
    options = SegmentOptions.from_flat(method="reverse", image_size=256, device="cpu", untrained=True, top_k=3,
                                       overlap="order")
    support = SupportCase(image, labels, "ct-a")
    stages = []
    result = segment(query, [support], chosen, options, engine=engine256,
                     progress=lambda stage, d, t: stages.append(stage))
    out = _check(result, query, (5, 1), top_k=3)
    assert out.shape == (20, 512, 512) and result.slice_axis == 0
    assert result.encoder_calls == 20 + len(_support_slices(support, (5, 1)))
    for stage in ("Forward and reverse prediction", "Propagating slice"):
        assert any(stage in s for s in stages), stage
    assert {"forward", "reverse", "self_propagation", "encode"} <= set(result.timings)
    # a conditional slice keeps its forward prediction (liver is listed first, so nothing overrides it)
    for s in result.scores:
        if s.value == 5 and s.selected:
            np.testing.assert_array_equal(out.array[s.slice_index] == 5, result.forward_masks[5][s.slice_index])

    path = tmp_path / "scores.csv"
    write_scores(str(path), result.scores)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["structure", "value", "slice_index", "score", "higher_is_better", "selected",
                       "matched_support", "matched_slice"]
    assert len(rows) == 1 + 40
    for row, s in zip(rows[1:], result.scores):
        assert row[0] == s.structure and int(row[1]) == s.value and int(row[2]) == s.slice_index
        assert abs(float(row[3]) - s.score) < 1e-6 and row[4] == "1" and row[5] == str(int(s.selected))
        assert row[6] == "" and row[7] == ""
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]  # atomic: no temporary file left


def test_reverse_brain_ibsr01_to_ibsr03_csf(shared_dir):
    # A coronal acquisition (slices along the array's j axis, not k). The 128 coronal slices are cropped to a
    # 24-slice slab (physical geometry kept) and SAM2 runs at 64 px: the plumbing under test does not depend on
    # the number of slices or the input size.
    brain = shared_dir / "data" / "brain-mr"

    def slab(volume):
        return Volume.from_sitk(volume.to_sitk()[:, 52:76, :])  # SimpleITK order (i, j, k): j = 52..75

    s_image = slab(read_volume(brain / "ibsr-01" / "image.nii.gz"))
    s_labels, structures = read_labels(brain / "ibsr-01" / "labels.nii.gz", s_image)
    query = slab(read_volume(brain / "ibsr-03" / "image.nii.gz"))
    csf = [s for s in structures if s.value == 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = SAM2Engine.with_random_weights("tiny", image_size=64, device="cpu", batch_size=16)
    options = SegmentOptions.from_flat(method="reverse", image_size=64, device="cpu", untrained=True, top_k=5,
                                       batch_size=16)
    support = SupportCase(s_image, s_labels, "ibsr-01")
    result = segment(query, [support], csf, options, engine=engine)
    assert result.slice_axis == 1  # coronal: the array's j axis
    out = _check(result, query, (1,), top_k=5)
    assert out.shape == (256, 24, 256)
    assert result.encoder_calls == 24 + 1
