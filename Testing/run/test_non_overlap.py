"""The overlap rule (non_overlap.py) on small arrays: sam2's `_apply_non_overlapping_constraints` is the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewshotsam2.run.non_overlap import LabelComposer, upsample_logits
from fewshotsam2.options import OptionError, SegmentOptions


def _sam2_winners(low_res: list[np.ndarray], shape, values) -> np.ndarray:
    """sam2's answer: upsample each object's logits, constrain as SAM2Base does, a voxel is the positive one's."""
    from sam2.modeling.sam2_base import SAM2Base

    up = F.interpolate(torch.from_numpy(np.stack(low_res))[:, None], size=shape, mode="bilinear",
                       align_corners=False)
    kept = SAM2Base._apply_non_overlapping_constraints(None, up)[:, 0].numpy()
    return np.where((kept > 0).any(axis=0), np.asarray(values)[kept.argmax(axis=0)], 0)


def test_logits_rule_equals_sam2s_constraint_on_random_logits():
    rng = np.random.default_rng(0)
    shape, values = (20, 24), [3, 1, 7]
    for trial in range(20):
        low = [rng.normal(size=(8, 8)).astype(np.float32) for _ in values]
        composer = LabelComposer((1,) + shape, np.uint8, "logits")
        for v, lr in zip(values, low):
            composer.add(v, 0, (upsample_logits(lr, shape) > 0)[None], lr[None])
        np.testing.assert_array_equal(composer.labels[0], _sam2_winners(low, shape, values))
    assert composer.contested > 0 and composer.moved > 0


def test_equal_logits_go_to_the_structure_listed_first_as_torch_argmax():
    low = np.full((1, 4, 4), 2.0, np.float32)
    masks = np.ones((1, 8, 8), bool)
    composer = LabelComposer((1, 8, 8), np.uint8, "logits")
    composer.add(9, 0, masks, low)
    composer.add(4, 0, masks, low.copy())
    assert (composer.labels == 9).all() and composer.moved == 0
    np.testing.assert_array_equal(composer.labels[0], _sam2_winners([low[0], low[0]], (8, 8), [9, 4]))


def test_order_rule_keeps_the_first_and_ranges_are_respected():
    shape = (3, 6, 6)
    strong = np.full((2, 4, 4), 5.0, np.float32)
    weak = np.full((3, 4, 4), 1.0, np.float32)
    for rule, want in (("order", 1), ("logits", 2)):
        composer = LabelComposer(shape, np.uint8, rule)
        composer.add(1, 0, np.ones((3, 6, 6), bool), weak)  # slices 0..2
        composer.add(2, 1, np.ones((2, 6, 6), bool), strong)  # slices 1..2 only
        assert (composer.labels[0] == 1).all()  # outside structure 2's range
        assert (composer.labels[1:] == want).all()


def test_logits_rule_needs_the_logits():
    composer = LabelComposer((1, 4, 4), np.uint8, "logits")
    with pytest.raises(ValueError, match="logits"):
        composer.add(1, 0, np.ones((1, 4, 4), bool))


def test_overlap_option():
    assert SegmentOptions().overlap == "logits"
    assert SegmentOptions.from_flat(overlap="order").overlap == "order"
    with pytest.raises(OptionError) as e:
        SegmentOptions(overlap="allow")
    assert e.value.option == "overlap"


def test_command_line_overlap_flag():
    from fewshotsam2 import cli

    parser = cli.build_parser()
    base = ["segment", "--query", "q", "--support", "i", "l", "--labels", "1", "--out", "o.nii.gz"]
    assert cli.options_from_args(parser.parse_args(base)).overlap == "logits"
    assert cli.options_from_args(parser.parse_args(base + ["--overlap", "order"])).overlap == "order"
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--overlap", "bogus"])
