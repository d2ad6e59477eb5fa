"""Refine a result from the user's corrections: fix a few slices, re-propagate from them, keep the rest.

Semantics (sam2's own answer to "refining masks after propagation", facebookresearch/sam2 #154): a refine is one
`SAM2VideoPredictor` session per corrected structure, on the structure's slice range, whose conditioning frames are

* the method's own conditioning: the support slices (propagate and lpips: supports first on the timeline, as
  `propagate`), or reverse's conditional slices (their masks read from the previous result, which holds p_c
  there) and, with `keep_supports`, the supports;
* every corrected slice, given as the user drew it through the same mask-prompt path as a support (sam2's
  `add_new_mask`: hole filling, upsampling, `is_mask_from_pts=True`); a corrected slice replaces a conditional slice
  it coincides with.

The model runs with `clear_non_cond_mem_around_input=True`: every time propagation passes a conditioning frame,
the non-conditioning memories within `stride * num_maskmem` frames of it are dropped (old appearance next to a
new prompt confuses SAM2). Prediction runs `propagate_in_video` forward from the first corrected slice to the end
of the range, then `reverse=True` from it to the start. `Testing/run/test_refine_oracle.py` checks this against the
predictor itself.

The first run's non-conditioning memories are not kept (only its label map is): a refine starts a fresh session.

Approximation, opt-in (`stop_after_agreeing`, CLI `--stop-after-agreeing N`; default 0 = off, sam2's semantics
above): in each direction, prediction stops once the refined mask has agreed with the previous result (Dice >=
`agreement`, default 0.99; two empty masks agree) on N consecutive slices; the slices beyond keep their previous
value byte for byte, and the forward pass starts again at the next corrected slice, if any (without memories of
the slices it skipped). It assumes that a correction whose effect has faded over N slices has none further on; sam2 would
still re-predict those slices (with a trained model, usually close to the previous result; with random weights
nothing can be said). Not covered by the oracle test; results are not sam2's where it stops.

Which slices change: only those of a corrected structure, inside its slice range (grown to include every
corrected slice: a structure drawn past the end of the range gets a longer range). There every slice that is not a
conditioning slice is predicted again; corrected slices are written exactly as the user drew them (byte for
byte, every structure on them); conditional slices of reverse keep their previous value. Structures without a
correction and slices outside the range keep their previous value.
"""

from __future__ import annotations

import csv
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Mapping, Optional, Sequence

import numpy as np

from fewshotsam2.errors import InputError
from fewshotsam2.io.volume import Structure, Volume
from fewshotsam2.options import SegmentOptions
from fewshotsam2.run.progress import ProgressBar
from fewshotsam2.run.results import SegmentationResult
from fewshotsam2.slicing.slice_range import to_array_range, to_stack_range
from fewshotsam2.slicing.slices import SlicePlan

# the pipeline, the engine's feature cache and the memory bank (torch) are imported inside refine: the Slicer module
# reads `changed_slices` from this module in Slicer's own Python, where torch may not be installed

ProgressCallback = Callable[[str, int, int], None]


@dataclass
class PreviousRun:
    """What refine needs of the first run beyond its label map (array indices along the query's slice axis).

    `ranges`: per structure value, the segmented range (None: empty); a structure missing here gets its range
    estimated again from the options, as the first run did. `selected`: reverse's conditional slices per value.
    """

    ranges: dict[int, Optional[tuple[int, int]]] = field(default_factory=dict)
    selected: dict[int, list[int]] = field(default_factory=dict)

    @classmethod
    def of(cls, result: SegmentationResult) -> "PreviousRun":
        selected: dict[int, list[int]] = {}
        for s in result.scores:
            if s.selected:
                selected.setdefault(s.value, []).append(s.slice_index)
        return cls(dict(result.slice_ranges), selected)

    @classmethod
    def from_scores_csv(cls, path: str | Path, structures: Sequence[Structure]) -> "PreviousRun":
        """From the first run's `--scores` CSV (`pipeline.write_scores`): its selected slices and ranges."""
        by_name = {s.name: s.value for s in structures}
        values = {s.value for s in structures}
        ranges: dict[int, Optional[tuple[int, int]]] = {}
        selected: dict[int, list[int]] = {}
        try:
            with open(path, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    value = int(row["value"]) if row.get("value") else by_name.get(row.get("structure", ""))
                    if value not in values:
                        continue
                    if row.get("range_first"):
                        ranges[value] = (int(row["range_first"]), int(row["range_last"]))
                    elif "range_first" in row:
                        ranges.setdefault(value, None)
                    if row.get("selected") == "1" and row.get("slice_index"):
                        selected.setdefault(value, []).append(int(row["slice_index"]))
        except (OSError, KeyError, ValueError, csv.Error) as exc:
            raise InputError(f"{path}: not a scores CSV of `fewshotsam2 segment --scores` ({exc})") from None
        return cls(ranges, selected)


@dataclass
class RefineResult(SegmentationResult):
    """A `SegmentationResult` plus what the refine took as corrections (array indices per structure value)."""

    corrected_slices: dict[int, list[int]] = field(default_factory=dict)
    cache_hits: int = 0
    predicted_slices: dict[int, int] = field(default_factory=dict)  # per structure value: slices predicted again

    @property
    def changed(self) -> bool:
        return any(self.corrected_slices.values())


def changed_slices(previous: np.ndarray, corrected: np.ndarray, values: Sequence[int], axis: int) -> dict[int, list[int]]:
    """Per value, the indices along `axis` where `corrected` differs from `previous` for that value."""
    out = {}
    other = tuple(a for a in range(3) if a != axis)
    for v in values:
        diff = (previous == v) != (corrected == v)
        out[v] = [int(i) for i in np.flatnonzero(diff.any(axis=other))]
    return out


def check_refine_inputs(query: Volume, structures: Sequence[Structure], previous: Volume, corrected: Volume) -> None:
    """The refusals of the issue: wrong grids, unknown segments, a structure erased as a whole."""
    if not previous.same_grid(query):
        raise InputError("the previous result is not on the query's grid (it must be the label map segment wrote "
                         "for this query)")
    if not corrected.same_grid(query):
        raise InputError("the corrected label map is not on the query's grid (edit the result on the query itself)")
    known = {s.value for s in structures}
    extra = sorted(set(np.unique(corrected.array).tolist()) - known - {0})
    if extra:
        raise InputError(f"the corrected label map holds value {extra[0]}, which is no structure of the previous "
                         f"result ({', '.join(f'{s.name}={s.value}' for s in structures)})")
    for s in structures:
        if (previous.array == s.value).any() and not (corrected.array == s.value).any():
            raise InputError(f"the edits remove the whole of '{s.name}': refine needs some of it (segment again "
                             "without it instead)")


def refine(
    query: Volume,
    supports: list,
    structures: list[Structure],
    options,
    previous_labels: Volume,
    corrections: Volume,
    progress: ProgressCallback | bool | None = None,
    engine=None,
    slices: Optional[Mapping[int, Sequence[int]]] = None,
    previous: Optional[PreviousRun | SegmentationResult] = None,
    notify: Optional[Callable[[str], None]] = None,
    stop_after_agreeing: int = 0,
    agreement: float = 0.99,
) -> RefineResult:
    """Refine `previous_labels` (the first run's label map) from `corrections` (the same map after the user's edits).

    `supports`, `structures` and `options` are those of the first run. `slices`: per structure value, the array
    indices (along the query's slice axis) taken as corrections; None = every slice where `corrections` differs from
    `previous_labels` for that structure. `previous`: the first run's result (or a `PreviousRun`) for its slice
    ranges and reverse's conditional slices; without it ranges are estimated again from `options` and
    `--method reverse` cannot refine. Returns a `RefineResult`; with no corrected slice its labels are the previous
    ones, unchanged (`changed` is False). See the module docstring for which slices change.
    `stop_after_agreeing` > 0: the opt-in approximation of the module docstring (0: off, sam2's semantics).
    """
    if progress is True:
        with ProgressBar() as bar:
            return refine(query, supports, structures, options, previous_labels, corrections, bar, engine, slices,
                          previous, notify, stop_after_agreeing, agreement)
    progress = progress or (lambda stage, done, total: None)
    from fewshotsam2.run.pipeline import check_query, make_engine, prepare

    if not isinstance(options, SegmentOptions):
        raise TypeError(f"options must be a SegmentOptions, got {options!r}")
    if not supports:
        raise InputError("at least one support (image + labels) is needed")
    if stop_after_agreeing < 0 or not 0.0 <= agreement <= 1.0:
        raise InputError(f"stop after agreeing on N slices needs N >= 0 (0: off) and an agreement (Dice) in [0, 1]; "
                         f"got {stop_after_agreeing} and {agreement:g}")
    t0 = time.perf_counter()
    check_query(query)
    check_refine_inputs(query, structures, previous_labels, corrections)
    if isinstance(previous, SegmentationResult):
        previous = PreviousRun.of(previous)
    previous = previous or PreviousRun()
    qplan = SlicePlan.for_volume(query, options.axis)
    n = qplan.n_slices
    values = [s.value for s in structures]
    prev_stack = qplan.stack(previous_labels.array)
    corr_stack = qplan.stack(corrections.array)
    if slices is None:
        wanted = changed_slices(previous_labels.array, corrections.array, values, qplan.array_axis)
    else:
        unknown = sorted(set(slices) - set(values))
        if unknown:
            raise InputError(f"corrections name structure value {unknown[0]}, which the previous result does not hold")
        wanted = {v: sorted({int(i) for i in slices.get(v, [])}) for v in values}
        for v, idx in wanted.items():
            bad = [i for i in idx if not 0 <= i < n]
            if bad:
                raise InputError(f"corrected slice {bad[0]} is outside the query's {n} slices along array axis "
                                 f"{qplan.array_axis}")
    corrected = {v: sorted(qplan.array_index_to_slice_index(i) for i in idx) for v, idx in wanted.items() if idx}
    result_slices = {v: sorted(idx) for v, idx in wanted.items() if idx}
    if not corrected:
        return RefineResult(previous_labels, list(structures), slice_axis=qplan.array_axis, query_plan=qplan,
                            slice_ranges=dict(previous.ranges), timings={"total": time.perf_counter() - t0})
    if options.method == "reverse":
        missing = [s.name for s in structures if s.value in corrected and s.value not in previous.selected]
        if missing:
            raise InputError(f"reverse: the first run's conditional slices of '{missing[0]}' are unknown; give the "
                             "first run's result (its scores CSV on the command line: --previous-scores)")
    if notify is not None:
        for s in structures:
            if s.value in result_slices:
                notify(f"{s.name}: corrected slices {', '.join(map(str, result_slices[s.value]))} along array "
                       f"axis {qplan.array_axis}")

    # the first run's slice plans, windowed stacks and input checks (pipeline.prepare), for the corrected structures
    todo = [s for s in structures if s.value in corrected]
    run = prepare(query, supports, todo, options)
    qstack = run.info.images
    for s in todo:  # the first run's ranges where known; the others as the first run decided them
        if s.value in previous.ranges:
            r = previous.ranges[s.value]
            run.ranges[s.value] = None if r is None else to_stack_range(qplan, *r)
            run.to_estimate = [t for t in run.to_estimate if t.value != s.value]
    run.estimate_ranges()
    ranges = run.ranges

    if engine is None:
        engine = make_engine(options)
        from fewshotsam2.model.feature_cache import FeatureCache  # torch

        engine.feature_cache = FeatureCache.from_settings()
    engine.reset()
    engine.set_feature_storage(options.feature_storage)
    query_keys = [("query", i) for i in range(n)]
    engine.add_stack(query_keys, qstack)
    timings: dict[str, float] = {"prepare": time.perf_counter() - t0}
    out = prev_stack.copy()
    order = {v: i for i, v in enumerate(values)}  # the first listed structure keeps a contested voxel
    final_ranges = dict(previous.ranges)
    predicted_count: dict[int, int] = {}
    t_run = time.perf_counter()
    for s in todo:
        cs = corrected[s.value]
        r = ranges.get(s.value)
        first, last = (min(cs), max(cs)) if r is None else (min(r[0], cs[0]), max(r[1], cs[-1]))
        final_ranges[s.value] = to_array_range(qplan, first, last)
        masks, predicted_count[s.value] = _refine_structure(engine, s, options, run, query_keys[first : last + 1],
                                  [c - first for c in cs], [(corr_stack[c] == s.value) for c in cs],
                                  [qplan.array_index_to_slice_index(i) - first
                                   for i in previous.selected.get(s.value, [])
                                   if first <= qplan.array_index_to_slice_index(i) <= last],
                                  prev_stack[first : last + 1] == s.value,
                                  lambda stage, done, total, _n=s.name: progress(f"{_n}: {stage}", done, total),
                                  stop_after_agreeing, agreement)
        part = out[first : last + 1]
        part[part == s.value] = 0
        lower = np.isin(part, [v for v in values if order[v] > order[s.value]])
        part[masks & ((part == 0) | lower)] = s.value
    for c in sorted({c for cs in corrected.values() for c in cs}):
        out[c] = corr_stack[c]  # written exactly as drawn
    timings["refine"] = time.perf_counter() - t_run
    timings["total"] = time.perf_counter() - t0
    labels = query.with_array(qplan.unstack(out).astype(previous_labels.array.dtype, copy=False))
    return RefineResult(labels, list(structures), [], engine.encoder_calls, timings, qplan.array_axis,
                        query_plan=qplan, slice_ranges=final_ranges, corrected_slices=result_slices,
                        cache_hits=int(getattr(engine, "cache_hits", 0)), predicted_slices=predicted_count)


def _refine_structure(engine, structure: Structure, options, run, keys: list, corrected: list[int],
                      corrected_masks: list[np.ndarray], selected: list[int], previous: np.ndarray,
                      progress: ProgressCallback, stop_after: int = 0,
                      agreement: float = 0.99) -> tuple[np.ndarray, int]:
    """One structure on its (grown) range: the masks of every slice of `keys` (range-local indices) and how many
    slices were predicted again."""
    from fewshotsam2.backends.memory_bank import memorize_in_batches  # torch

    n = len(keys)
    support_slices = run._support_slices(structure, engine)  # the first run's, registered with the engine
    if not support_slices:
        raise InputError(f"structure {structure.value} ({structure.name}) is absent from every support")
    k = len(support_slices)
    prompts = dict(zip(corrected, corrected_masks))  # a correction replaces a conditional slice it coincides with
    cond = {}
    if options.method == "reverse":
        offset, num_frames = 0, n  # as reverse's self-propagation: query slice i at frame i
        for c in selected:
            prompts.setdefault(c, previous[c])  # the previous result holds p_c on a conditional slice
        if options.method_options.keep_supports:
            memory = engine.memorize([s.key for s in support_slices], [s.mask for s in support_slices])
            for j in range(k):
                cond[-1 - j] = memory.select(j)
    else:  # propagate and lpips: the supports first, as propagate's video
        offset, num_frames = k, k + n
        memory = engine.memorize([s.key for s in support_slices], [s.mask for s in support_slices])
        for j in range(k):
            cond[j] = memory.select(j)
    frames = sorted(prompts)
    memory = memorize_in_batches(engine, [keys[c] for c in frames], [prompts[c] for c in frames])
    for j, c in enumerate(frames):
        cond[offset + c] = memory.select(j)
    engine.use_once(keys)  # each query slice is read once more at most: no feature kept after it
    def agrees(pos: int, mask: np.ndarray) -> bool:  # used only with stop_after > 0 (the approximation)
        return dice(mask, previous[pos - offset]) >= agreement

    predicted = propagate_with_corrections(engine, {offset + i: keys[i] for i in range(n)}, cond,
                                           offset + min(corrected), offset, offset + n - 1, num_frames, progress,
                                           agrees if stop_after > 0 else None, stop_after,
                                           [offset + c for c in corrected])
    masks = previous.copy()
    for pos, m in predicted.items():
        masks[pos - offset] = m
    for c in corrected:
        masks[c] = prompts[c]
    return masks, len(predicted)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def propagate_with_corrections(engine, keys: Mapping[int, Hashable], cond: Mapping[int, object], start: int, lo: int,
                               hi: int, num_frames: int, progress: ProgressCallback,
                               agrees: Optional[Callable[[int, np.ndarray], bool]] = None, stop_after: int = 0,
                               restart: Sequence[int] = ()) -> dict[int, np.ndarray]:
    """sam2's `propagate_in_video` forward from `start` to `hi`, then `reverse=True` from `start` to `lo`, with
    `clear_non_cond_mem_around_input`: at each conditioning frame passed, non-conditioning memories within
    `stride * num_maskmem` frames are dropped. Returns the predicted masks by timeline position.

    The opt-in approximation (`stop_after` > 0 and `agrees(position, mask)`): a pass stops predicting after
    `stop_after` consecutive predictions that agree with the previous result and starts again at the next position
    of `restart` (the corrected slices) it reaches, with the memories it has (none of the skipped slices)."""
    model = engine.model
    window = model.memory_temporal_stride_for_eval * model.num_maskmem
    reach = engine.memory_reach
    store: dict = {}  # sam2's non_cond_frame_outputs, bounded to what a later prediction can read
    masks: dict[int, np.ndarray] = {}
    total = sum(1 for p in range(lo, hi + 1) if p not in cond)
    progress(f"Refining slice 0/{total}", 0, total)
    stopping = agrees is not None and stop_after > 0
    skipped = 0
    for reverse, order in ((False, range(start, hi + 1)), (True, range(start, lo - 1, -1))):
        agreeing, stopped = 0, False
        for pos in order:
            if pos in cond:
                for t in range(pos - window, pos + window + 1):
                    store.pop(t, None)
                if stopped and pos in restart:
                    agreeing, stopped = 0, False
                continue
            if stopped:
                skipped += 1
                continue
            pred = engine.predict([keys[pos]], pos, cond, recent=store, num_frames=num_frames, reverse=reverse)
            masks[pos] = pred.masks[0]
            store[pos] = pred.memory
            if reverse:  # later reverse steps read only frames below pos + reach
                drop = [t for t in store if t >= pos + reach]
            else:  # forward reads frames above pos - reach; the reverse pass, frames below start + reach
                drop = [t for t in store if t <= pos - reach and t >= start + reach]
            for t in drop:
                del store[t]
            progress(f"Refining slice {len(masks) + skipped}/{total}", len(masks) + skipped, total)
            if stopping:
                agreeing = agreeing + 1 if agrees(pos, pred.masks[0]) else 0
                stopped = agreeing >= stop_after  # the memories stay: the reverse pass reads those near start
        if stopped:
            progress(f"Refining slice {len(masks) + skipped}/{total}", len(masks) + skipped, total)
    return masks
