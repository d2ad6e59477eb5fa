"""Continuing past a range end (range_ends.py, backends/continuation.py) against sam2's own SAM2VideoPredictor.

Continuing is more propagation steps: a backend segments the query on a range, the structure is still present on
a range end, and prediction goes on past it a slice at a time. The predictor gets the video extended by the
slices beyond the end (same random weights, same frames, same mask prompts, as in test_oracle_sam2.py) and must
give the same logits (1e-5) on every frame we predicted, in the range and beyond it.

Ranges hold 16 query slices: SAM2 bounds its object-pointer window by the video length (min(num_frames, 16)), so
a range and its extension see the same window only from 16 frames on (the pipeline's ranges are longer than that
wherever a range is narrower than a real scan).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from conftest import crop_slices
from fewshotsam2.backends.base import QueryContext, StageClock, SupportSlice
from fewshotsam2.backends.propagate import PropagateBackend
from fewshotsam2.backends.reverse import ReverseBackend, select_conditional
from fewshotsam2.backends.lpips_matching import LpipsBackend
from fewshotsam2.slicing.intensity import choose_preset
from fewshotsam2.options import LpipsOptions, PropagateOptions, ReverseOptions
from fewshotsam2.run.range_ends import extend_past_range_ends
from fewshotsam2.slicing.slice_stack import SliceStack
from fewshotsam2.slicing.slices import SlicePlan
from fewshotsam2.slicing.support import select_support_slices
from sam2_oracle import LIVER, Comparison, Recorder, ct_b, engine, sam2_video  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def stacks(ct_a, ct_b):  # noqa: F811
    """The query ct-b (20 slices) and ct-a's liver (cropped to slices 8-22) as canonical stacks."""
    image, labels, _ = ct_a
    image, labels = crop_slices(image, 8, 22), crop_slices(labels, 8, 22)
    qplan = SlicePlan.for_volume(ct_b)
    qstack = np.asarray(SliceStack.of(ct_b, qplan, choose_preset(ct_b))[0 : qplan.n_slices])
    splan = SlicePlan(image, qplan.plane)
    sstack = np.asarray(SliceStack.of(image, splan, choose_preset(image))[0 : splan.n_slices])
    mask = splan.stack(labels.array == LIVER)
    return qstack, sstack, mask


def _segment_range(engine, stacks, backend, options, first, last, shots=1):  # noqa: F811
    """The backend on the range first..last, then `extend_past_range_ends` as the pipeline calls it (estimated)."""
    qstack, sstack, mask = stacks
    engine.reset()
    keys = [("query", i) for i in range(len(qstack))]
    engine.add_stack(keys, qstack)
    supports = []
    for idx in select_support_slices(mask.astype(np.uint8) * LIVER, LIVER, shots):
        key = ("support", 0, idx)
        engine.add_frames({key: sstack[idx]})
        supports.append(SupportSlice(key, mask[idx].copy(), 0, idx, sstack[idx], idx, (3.0, 3.0)))
    context = QueryContext(keys[first : last + 1], qstack[first : last + 1], (0.78, 0.78))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = backend.run(engine, context, supports, options, lambda *a: None, StageClock(engine, {}))
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            seg_first, seg_last, masks, ends = extend_past_range_ends(engine, result, keys, qstack, first, last, True,
                                                                      "liver", lambda i: i, lambda *a: None)
    return keys, supports, result, (seg_first, seg_last, masks, ends), [str(w.message) for w in said]


def _check_extension(first, last, n, got, said):
    seg_first, seg_last, masks, ends = got
    assert masks.shape[0] == seg_last - seg_first + 1
    for e in ends:
        assert e.continued and any(f"slice {e.end}" in s and s.startswith("liver: ") for s in said)
    assert len(said) == len(ends)
    return seg_first, seg_last, masks


def test_propagate_continued_above_equals_sam2_video_predictor(engine, stacks, monkeypatch):  # noqa: F811
    first, last = 0, 15
    recorder = Recorder(engine, monkeypatch)
    keys, supports, result, got, said = _segment_range(engine, stacks, PropagateBackend(), PropagateOptions(),
                                                       first, last)
    seg_first, seg_last, masks = _check_extension(first, last, len(keys), got, said)
    assert seg_first == 0 and seg_last > last, "the structure touched the upper end: prediction must go on"
    sam = sam2_video(engine, [s.key for s in supports] + keys, {0: supports[0].mask})
    cmp = Comparison("propagate, continued above the range", engine.seed)
    beyond = 0
    for p in recorder.predictions:
        i = p["key"][1]
        cmp.add(p["raw"], p["logits"], masks[i - seg_first], sam[1 + i])
        beyond += i > last
    assert beyond == seg_last - last
    cmp.check()


def test_propagate_continued_below_equals_sam2_video_predictor(engine, stacks, monkeypatch):  # noqa: F811
    first, last = 4, 19
    recorder = Recorder(engine, monkeypatch)
    keys, supports, result, got, said = _segment_range(engine, stacks, PropagateBackend(), PropagateOptions(),
                                                       first, last)
    seg_first, seg_last, masks = _check_extension(first, last, len(keys), got, said)
    assert seg_first < first and seg_last == last
    # below the range: plain propagation from the supports into the slices below, outward
    outward = keys[first - 1 :: -1]
    sam = sam2_video(engine, [s.key for s in supports] + outward, {0: supports[0].mask})
    cmp = Comparison("propagate, continued below the range", engine.seed)
    for p in recorder.predictions:
        i = p["key"][1]
        if i < first:
            cmp.add(p["raw"], p["logits"], masks[i - seg_first], sam[1 + outward.index(p["key"])])
    cmp.check()
    assert cmp.frames == first - seg_first


def test_propagate_one_pass_of_two_structures_continues_past_both_ends(engine, stacks, monkeypatch):  # noqa: F811
    """Two structures in propagate's one pass (`run_many`, batched over structures) on the same range: each result
    leaves both range-end edges as `run` does, and continuing each past an end the structure touches equals sam2's
    predictor on that structure's video extended by the slices beyond (one video per object: its own support)."""
    import torch

    from fewshotsam2.backends.base import StructureJob

    qstack, sstack, mask = stacks
    first, last = 2, 17  # 16 slices (see the module's docstring), both ends inside the 20-slice volume
    engine.reset()
    keys = [("query", i) for i in range(len(qstack))]
    engine.add_stack(keys, qstack)
    picks = select_support_slices(mask.astype(np.uint8) * LIVER, LIVER, 3)
    jobs, supports = [], []
    for value, idx in ((LIVER, picks[0]), (LIVER + 100, picks[2])):  # two support slices: two different objects
        key = ("support", 0, idx)
        engine.add_frames({key: sstack[idx]})
        support = SupportSlice(key, mask[idx].copy(), 0, idx, sstack[idx], idx, (3.0, 3.0))
        supports.append(support)
        context = QueryContext(keys[first : last + 1], qstack[first : last + 1], (0.78, 0.78))
        jobs.append(StructureJob(value, f"s{value}", [support], context, first))
    memorized, calls = [], []
    memorize, predict = engine.memorize, engine.predict

    def recorded_memorize(keys_, masks):
        memory = memorize(keys_, masks)
        memorized.append(memory)
        return memory

    def recorded_predict(keys_, frame_idx, cond, recent=None, num_frames=None, reverse=False):
        pred = predict(keys_, frame_idx, cond, recent=recent, num_frames=num_frames, reverse=reverse)
        for b, key in enumerate(keys_):
            (owner,) = [n for n, m in enumerate(memorized)
                        if torch.equal(cond[min(cond)].maskmem_features[b], m.maskmem_features[0])]
            calls.append((owner, key, pred.memory.pred_masks[b : b + 1].clone()))
        return pred

    monkeypatch.setattr(engine, "memorize", recorded_memorize)
    monkeypatch.setattr(engine, "predict", recorded_predict)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        done = list(PropagateBackend().run_many(engine, jobs, PropagateOptions(), lambda *a: None,
                                                StageClock(engine, {})))
    assert all(sum(c[1] == k for c in calls) == 2 for k in keys[first : last + 1])  # each slice: both structures
    continued = 0
    for n, (job, result) in enumerate(done):
        assert set(result.edges) == {"above", "below"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seg_first, seg_last, masks, ends = extend_past_range_ends(engine, result, keys, qstack, first, last, True,
                                                                      job.name, lambda i: i, lambda *a: None)
        continued += sum(e.continued for e in ends)
        support = supports[n]
        mine = [(key, logits) for owner, key, logits in calls if owner == n]
        assert len(mine) == seg_last - seg_first + 1  # every slice of the range, and those continued
        above = sam2_video(engine, [support.key] + keys[first:], {0: support.mask})
        outward = keys[first - 1 :: -1]
        below = sam2_video(engine, [support.key] + outward, {0: support.mask}) if seg_first < first else {}
        worst = 0.0
        for key, logits in mine:
            i = key[1]
            frame = above[1 + i - first] if i >= first else below[1 + outward.index(key)]
            worst = max(worst, float((logits - frame.filled).abs().max()))
            assert np.array_equal(masks[i - seg_first], frame.mask) or np.all(
                np.abs(frame.mask_logits[masks[i - seg_first] != frame.mask]) <= 1e-5)
        print(f"CONTINUED seed={engine.seed} {job.name}: segmented {seg_first}-{seg_last} max|dlogit|={worst:.3g}")
        assert worst <= 1e-5
    assert continued > 0, "no structure touched a range end: the continuation was not exercised"


def test_reverse_continued_both_ways_equals_sam2_video_predictor(engine, stacks, monkeypatch):  # noqa: F811
    first, last, top_k = 2, 17, 2
    recorder = Recorder(engine, monkeypatch)
    keys, supports, result, got, said = _segment_range(engine, stacks, ReverseBackend(), ReverseOptions(top_k=top_k),
                                                       first, last)
    seg_first, seg_last, masks = _check_extension(first, last, len(keys), got, said)
    n = last - first + 1
    assert seg_first < first or seg_last > last, "the prediction touched no range end: the case tests nothing"
    selected = select_conditional(result.scores, top_k, 0.0).selected
    assert sorted(selected) == sorted(result.selected)
    prompts = {first + c: result.forward_masks[c] for c in selected}
    start = min(prompts)
    ours = [p for p in recorder.predictions if p["key"][0] == "query" and p["num_frames"] != 2]  # not the pi steps
    # Two videos, because the range was segmented before anything beyond it was known: sam2 given the video
    # extended both ways would run its forward pass past the upper end first, and its backward pass (slices below
    # the first conditional one) would then read those slices' object pointers. So: the video extended below
    # (forward pass, backward pass, continuation below) and the video extended above (forward pass, continuation
    # above); every slice we predicted is compared in one of them.
    cmp = Comparison("reverse, self-propagation continued past the range", engine.seed)
    for lo, hi, compare in ((seg_first, last, lambda i, p: i >= first or p["reverse"]),
                            (first, seg_last, lambda i, p: i > last)):
        video = keys[lo : hi + 1]
        sam = sam2_video(engine, video, {f - lo: m for f, m in prompts.items()}, start=start - lo, both_ways=True)
        for p in ours:
            i = p["key"][1]
            if lo <= i <= hi and compare(i, p):
                cmp.add(p["raw"], p["logits"], masks[i - seg_first], sam[i - lo])
    print(f"ORACLE reverse continuation: range {first}-{last} of {len(keys)}, segmented {seg_first}-{seg_last}, "
          f"conditional slices {sorted(prompts)}")
    cmp.check()
    assert cmp.frames == len(ours)
    continued = [p for p in recorder.predictions if p["key"][0] == "query" and not first <= p["key"][1] <= last]
    assert len(continued) == (first - seg_first) + (seg_last - last) and n == 16


def test_lpips_continued_equals_the_two_frame_step(engine, stacks, monkeypatch, shared_dir):  # noqa: F811
    weights = str(shared_dir / "weights" / "lpips" / "alexnet_features.pth")
    first, last = 3, 16
    recorder = Recorder(engine, monkeypatch)
    keys, supports, result, got, said = _segment_range(engine, stacks, LpipsBackend(),
                                                       LpipsOptions(augmentations=1, weights=weights), first, last)
    seg_first, seg_last, masks = _check_extension(first, last, len(keys), got, said)
    assert seg_first < first or seg_last > last
    cmp = Comparison("lpips, slices past the range", engine.seed)
    for p in recorder.predictions:
        i = p["key"][1]
        if first <= i <= last:
            continue
        (support_key, support_mask), = p["prompts"].values()
        sam = sam2_video(engine, [support_key, p["key"]], {0: support_mask})
        cmp.add(p["raw"], p["logits"], masks[i - seg_first], sam[1])
    assert cmp.frames == (first - seg_first) + (seg_last - last)
    cmp.check()


def test_user_range_end_touched_is_reported_in_the_done_line(shared_dir, tmp_path, capsys):
    """`segment --slice-range FIRST:LAST --progress json`: a structure still present on an end of the user's range
    is kept to it, and the warning and the done line's `range_reports` say which slice."""
    import json

    from fewshotsam2.cli import main

    d = shared_dir / "data" / "abdomen-ct"
    out = tmp_path / "out.nii.gz"
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # the JSON lines carry them
        rc = main(["segment", "--query", str(d / "ct-b" / "dicom"), "--support", str(d / "ct-a" / "image.nii.gz"),
                   str(d / "ct-a" / "labels.nii.gz"), "--labels", "5", "--out", str(out), "--untrained",
                   "--image-size", "64", "--device", "cpu", "--method", "propagate", "--slice-range", "5:12",
                   "--progress", "json"])
    assert rc == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    done = [e for e in events if e["event"] == "done"][-1]
    (report,) = done["range_reports"]
    assert report["kind"] == "given" and report["planned"] == [5, 12] and report["segmented"] == [5, 12]
    # random weights predict the liver on every slice here: both ends are touched, neither is continued
    assert sorted(e["end"] for e in report["ends"]) == [5, 12] and not any(e["continued"] for e in report["ends"])
    said = [e["message"] for e in events if e["event"] == "warning" and "an end of its slice range" in e["message"]]
    assert len(said) == 2 and all("present on slice" in m for m in said)


@pytest.mark.slow  # a real-data pipeline: 128 IBSR slices, LPIPS range estimate, SAM2 at 64 px
def test_segment_auto_continues_past_an_estimated_end(shared_dir, monkeypatch):
    """`segment` with the default `auto` on an IBSR brain (CSF, estimated range shorter than the volume): where the
    random-weight prediction is still present on an estimated end, the range grows past it and says so."""
    from fewshotsam2.run.pipeline import SegmentOptions, SupportCase, segment
    from fewshotsam2.research.extent_eval import load_case
    from fewshotsam2.io.volume import Structure

    monkeypatch.setenv("FEWSHOTSAM2_LPIPS_WEIGHTS", str(shared_dir / "weights" / "lpips" / "alexnet_features.pth"))
    q_image, _, plane = load_case(shared_dir / "data" / "brain-mr" / "ibsr-01", 4)
    s_image, s_labels, _ = load_case(shared_dir / "data" / "brain-mr" / "ibsr-04", 4)
    options = SegmentOptions.from_flat(image_size=64, device="cpu", untrained=True, method="propagate", axis=plane,
                                       slice_range="auto")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = segment(q_image, [SupportCase(s_image, s_labels, "ibsr-04")], [Structure(1, "CSF", (1.0, 1.0, 0.0))], options,
                         progress=None)
    report = result.range_reports[1]
    print(f"RANGE {report.summary()}")
    plan = result.query_plan
    assert report.kind == "auto" and report.planned != (0, plan.n_slices - 1), "the estimate must not be the volume"
    continued = [e for e in report.ends if e.continued]
    assert continued, f"no estimated end was touched: {report}"
    lo, hi = report.segmented
    assert lo <= report.planned[0] and report.planned[1] <= hi and (lo, hi) != report.planned
    assert result.slice_ranges[1] == report.segmented
    has = np.moveaxis(result.labels.array == 1, plan.array_axis, 0).reshape(plan.n_slices, -1).any(axis=1)
    outside = np.ones(plan.n_slices, bool)
    outside[lo : hi + 1] = False
    assert not has[outside].any() and has[lo : hi + 1].any()
    for e in continued:
        assert any(m.startswith("CSF: present on slice") and f"slice {e.end}," in m for m in map(str, (w.message for w in said)))
