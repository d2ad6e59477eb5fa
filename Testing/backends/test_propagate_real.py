"""The propagate backend (plain SAM2 propagation, the baseline) end to end on real scans with the real sam2
(tiny, random weights, 256 px, CPU): ct-a supports spleen (1) and liver (5) in the abdomen MR query at once."""

from __future__ import annotations

import numpy as np
import pytest

from fewshotsam2.run.pipeline import SegmentOptions, SupportCase, segment
from fewshotsam2.slicing.slices import SlicePlan

pytestmark = pytest.mark.slow  # real-data pipelines at 256 px


def test_propagate_two_structures_ct_to_mr(engine256, ct_a, abdomen_mr):
    image, labels, structures = ct_a
    query, _, _ = abdomen_mr
    chosen = [s for s in structures if s.value in (5, 1)]
    assert [s.value for s in chosen] == [1, 5]
    options = SegmentOptions(method="propagate", image_size=256, device="cpu", untrained=True)
    stages = []
    with pytest.warns(UserWarning, match="modalit"):  # CT support, MR query: allowed, with a warning
        result = segment(query, [SupportCase(image, labels, "ct-a")], chosen, options,
                         progress=lambda stage, done, total: stages.append((stage, done, total)), engine=engine256)

    out = result.labels
    # on the query's grid, exactly
    assert out.shape == query.shape == (20, 91, 117)
    assert out.spacing == query.spacing and out.origin == query.origin
    np.testing.assert_array_equal(out.direction, query.direction)
    assert out.same_grid(query)
    # only the labels asked for
    assert set(np.unique(out.array).tolist()) <= {0, 1, 5}
    assert out.array.dtype == np.uint8
    assert [s.value for s in result.structures] == [1, 5]
    # each slice encoded once: the 20 query slices + the support slices used (ct-a's middle labeled slice is the
    # same for spleen and liver, so one support frame serves both)
    plan = SlicePlan.for_volume(image)
    stack = plan.stack(labels.array)
    support_slices = set()
    for v in (1, 5):
        present = np.flatnonzero((stack == v).any(axis=(1, 2)))
        support_slices.add(int(present[len(present) // 2]))
    assert result.encoder_calls == 20 + len(support_slices)
    # both structures in one pass over the query (batched over structures), with progress reported per slice
    done = [d for stage, d, t in stages if stage.startswith("Label 1, Label 5: Propagating slice")]
    assert done == list(range(0, 21))  # the bar starts at 0, before the first slice
    assert result.scores == []  # the baseline has no per-slice score
    assert result.slice_axis == 0
    assert {"encode", "propagate", "total"} <= set(result.timings)
