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
    assert SegmentOptions.from_flat(overlap="allow").overlap == "allow"
    with pytest.raises(OptionError) as e:
        SegmentOptions(overlap="both")
    assert e.value.option == "overlap"


def test_command_line_overlap_flag():
    from fewshotsam2 import cli

    parser = cli.build_parser()
    base = ["segment", "--query", "q", "--support", "i", "l", "--labels", "1", "--out", "o.nii.gz"]
    assert cli.options_from_args(parser.parse_args(base)).overlap == "logits"
    assert cli.options_from_args(parser.parse_args(base + ["--overlap", "order"])).overlap == "order"
    assert cli.options_from_args(parser.parse_args(base + ["--overlap", "allow"])).overlap == "allow"
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--overlap", "bogus"])


# ------------------------------------------------------------------------------------------ --overlap allow


def test_allow_rule_keeps_every_structures_whole_mask():
    composer = LabelComposer((3, 6, 6), np.uint8, "allow")
    a = np.zeros((3, 6, 6), bool)
    a[:, :4] = True
    b = np.zeros((2, 6, 6), bool)
    b[:, 2:] = True
    composer.add(1, 0, a)  # no logits needed
    composer.add(2, 1, b)  # slices 1..2
    composer.extend(2, 0, np.concatenate([np.ones((1, 6, 6), bool), b]))  # continued below its range
    (v1, m1), (v2, m2) = composer.masks()
    assert (v1, v2) == (1, 2)
    np.testing.assert_array_equal(m1, a)
    np.testing.assert_array_equal(m2[0], np.ones((6, 6), bool))
    np.testing.assert_array_equal(m2[1:], b)


def _segment_pair(rule, engine):
    import warnings

    from conftest import STRUCTURES, two_box_pair
    from fewshotsam2.run.pipeline import segment

    query, _, support = two_box_pair()
    options = SegmentOptions.from_flat(method="propagate", image_size=64, device="cpu", untrained=True,
                                       slice_range="off", overlap=rule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return segment(query, [support], STRUCTURES, options, None, engine=engine)


def test_allow_keeps_overlapping_structures_in_layers_of_a_seg_nrrd(engine64, tmp_path):
    from fewshotsam2.io.volume import read_labels, structure_mask, write_labels

    allow = _segment_pair("allow", engine64)
    order = _segment_pair("order", engine64)
    logits = _segment_pair("logits", engine64)
    first, second = order.structures
    masks = {s.value: structure_mask(allow.labels, s) for s in allow.structures}
    # random weights: the two structures overlap, and both keep the overlap
    assert allow.labels.layers is not None and allow.labels.layers.shape[0] == 2
    assert [s.layer for s in allow.structures] == [0, 1] and [s.name for s in allow.structures] == [
        first.name, second.name]
    both = masks[first.value] & masks[second.value]
    assert both.any()
    # the same one pass as the other rules: each structure's whole mask; the others decide only the overlap
    np.testing.assert_array_equal(masks[first.value], order.labels.array == first.value)
    np.testing.assert_array_equal(masks[second.value], (order.labels.array == second.value) | both)
    for s in logits.structures:
        assert not ((logits.labels.array == s.value) & ~masks[s.value]).any()
    np.testing.assert_array_equal(masks[first.value] | masks[second.value], order.labels.array > 0)

    # the .seg.nrrd keeps the layers: read back, each segment has its whole mask
    out = tmp_path / "allow.seg.nrrd"
    write_labels(out, allow.labels, allow.structures)
    back = read_labels(out, allow.labels)
    assert back.volume.layers is not None and [s.name for s in back.structures] == [first.name, second.name]
    for s in back.structures:
        np.testing.assert_array_equal(back.mask(s), masks[s.value])
    # a flat format cannot hold them: one error, nothing written
    from fewshotsam2.errors import InputError

    with pytest.raises(InputError, match="seg.nrrd"):
        write_labels(tmp_path / "allow.nii.gz", allow.labels, allow.structures)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["allow.seg.nrrd"]


@pytest.mark.parametrize("out", ["o.nii.gz", "o.nrrd", "o.nii", "o.dcm"])
def test_allow_with_a_flat_output_is_one_error_before_any_work(out, tmp_path, capsys, monkeypatch):
    import warnings

    from fewshotsam2 import cli
    from fewshotsam2.run.segmenter import Segmenter

    with pytest.raises(OptionError) as e:
        Segmenter(SegmentOptions(overlap="allow")).check_ready(out=str(tmp_path / out))
    assert e.value.option == "overlap"
    Segmenter(SegmentOptions(overlap="order")).check_ready  # noqa: B018  (the other rules take any format)
    q = tmp_path / "q.nii.gz"
    q.write_bytes(b"not read: the output is refused first")
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() replaces it
    rc = cli.main(["segment", "--query", str(q), "--support", str(q), str(q), "--labels", "1", "--untrained",
                   "--out", str(tmp_path / out), "--overlap", "allow", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fewshotsam2: error: --overlap allow"), err
    assert ".seg.nrrd" in lines[0] and out in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.nii.gz"]


def test_refine_refuses_allow(tmp_path, capsys, monkeypatch):
    import warnings

    from fewshotsam2 import cli

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() replaces it
    q = tmp_path / "q.nii.gz"
    q.write_bytes(b"never read")
    rc = cli.main(["refine", "--query", str(q), "--support", str(q), str(q), "--previous", str(q), "--corrected",
                   str(q), "--out", str(tmp_path / "o.seg.nrrd"), "--overlap", "allow", "--untrained", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("fewshotsam2: error: --overlap allow is not available for refine"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.nii.gz"]


def test_command_line_allow_writes_layers_and_counts_each_structure(engine64, tmp_path, capsys, monkeypatch):
    import warnings

    import SimpleITK as sitk

    from conftest import two_box_pair
    from fewshotsam2 import cli
    from fewshotsam2.io.volume import read_labels, structure_mask

    query, _, support = two_box_pair()
    paths = {}
    for name, volume in (("q", query), ("s", support.image), ("l", support.labels)):
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        sitk.WriteImage(volume.to_sitk(), paths[name])
    out = tmp_path / "o.seg.nrrd"
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() replaces it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli.main(["segment", "--query", paths["q"], "--support", paths["s"], paths["l"], "--labels", "2,4",
                       "--out", str(out), "--overlap", "allow", "--method", "propagate", "--untrained",
                       "--image-size", "64", "--device", "cpu", "--slice-range", "off", "--quiet"],
                      engine_factory=lambda options: engine64)
    stdout = capsys.readouterr().out
    assert rc == 0
    back = read_labels(out, query)
    assert back.volume.layers is not None  # random weights: the two boxes' predictions overlap
    for s in back.structures:  # the summary counts each structure's whole mask, overlap included
        assert f"{s.name}: {int(structure_mask(back.volume, s).sum())} voxels" in stdout


def test_a_later_structure_meets_an_earlier_ones_continued_slices():
    """A structure continued past its range end (`extend`, range_ends.py) has no logits on the continued slices:
    a structure added later keeps off the voxels it holds there and takes the free ones (found on the 300-slice CT
    with five structures in one pass: an IndexError before)."""
    rng = np.random.default_rng(3)
    comp = LabelComposer((4, 8, 8), np.uint8, "logits")
    a = np.zeros((2, 8, 8), bool)
    a[:, :4] = True
    comp.add(1, 0, a, rng.normal(size=(2, 2, 2)).astype(np.float32) - 5.0)  # slices 0-1, low logits
    comp.extend(1, 0, np.concatenate([a, a]))  # continued onto slices 2-3
    b = np.ones((2, 8, 8), bool)
    comp.add(2, 2, b, np.full((2, 2, 2), 9.0, np.float32))  # slices 2-3, higher logits than anything
    assert (comp.labels[2:, :4] == 1).all() and (comp.labels[2:, 4:] == 2).all()  # continued slices: 1 keeps
    b2 = np.ones((2, 8, 8), bool)
    comp.add(3, 0, b2, np.full((2, 2, 2), 9.0, np.float32))  # on 1's own range its logits decide: 3 takes all
    assert (comp.labels[:2] == 3).all()
