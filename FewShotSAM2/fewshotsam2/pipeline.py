"""The one entry point: segment a query volume from labeled support volumes.

The command line, the Slicer Logic, `evaluate` and `bench` all call `segment`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from . import constants
from .atomic import atomic_path
from .backends import get_backend
from .backends.base import QueryContext, StageClock, StructureJob, SupportSlice
from .engine import SAM2Engine, pick_device
from .extent import StackInfo
from .errors import InputError
from .slice_range import to_array_range
from .resources import check_resources, estimate_resources
from .intensity import choose_preset
from .non_overlap import LabelComposer
from .lpips_distance import body_box
from .options import LpipsOptions, PropagateOptions, ReverseOptions, SegmentOptions  # noqa: F401  (re-exported)
from .results import LpipsMatch, SegmentationResult, SliceScore, UsedSupportSlice  # noqa: F401  (re-exported)
from .slice_stack import SliceStack
from .slices import SlicePlan
from .support import select_support_slices
from .volume import Structure, Volume

ProgressCallback = Callable[[str, int, int], None]

METHODS = constants.METHODS


@dataclass
class SupportCase:
    """One labeled support volume. `labels` is an integer label map on `image`'s grid.

    `masks` (optional): output structure value -> bool mask on `image`'s grid, for supports whose segments are not
    `labels.array == value` (overlapping .seg.nrrd layers, other value numbering than the output's).
    """

    image: Volume
    labels: Volume
    name: str = "support"
    masks: Optional[dict[int, np.ndarray]] = None

    def mask(self, value: int) -> np.ndarray:
        """The voxels of output structure `value` in this support."""
        if self.masks is not None:
            return self.masks[value] if value in self.masks else np.zeros(self.labels.shape, dtype=bool)
        return self.labels.array == value


def make_engine(options: SegmentOptions) -> SAM2Engine:
    """The SAM2 engine `options` asks for (builds the model; downloads the checkpoint on first use)."""
    return SAM2Engine.from_options(options)


def segment(
    query: Volume,
    supports: list[SupportCase],
    structures: list[Structure],
    options: SegmentOptions,
    progress: ProgressCallback | bool | None = True,
    engine: Optional[SAM2Engine] = None,
    notify: Optional[Callable[[str], None]] = None,
) -> SegmentationResult:
    """Segment `structures` (by label value) in `query` from the labeled `supports`.

    Every structure is segmented on the query slices of its range (`options.slice_range`; outside it the output
    is background), with its own memory bank (propagate: all in one pass, batched over structures); where two
    structures claim a voxel, `options.overlap` decides: "logits" (default: the higher SAM2 logit, as sam2's
    video predictor with `non_overlap_masks=True`) or "order" (the one listed first).
    `progress`: True (default) shows a progress bar on stderr; None or False: silent; or a callback
    `progress(stage, done, total)`. Raise `errors.Cancelled` from it to stop: nothing is returned or written.
    `notify(text)` receives the slice ranges and the memory/time estimate before the work starts.
    """
    if progress is True:
        from .progress import ProgressBar

        with ProgressBar() as bar:
            return segment(query, supports, structures, options, bar, engine, notify)
    progress = progress or (lambda stage, done, total: None)
    if not isinstance(options, SegmentOptions):
        raise TypeError(f"options must be a SegmentOptions (SegmentOptions.from_flat builds one), got {options!r}")
    if not supports:
        raise InputError("at least one support (image + labels) is needed")
    if not structures:
        raise InputError("no structure to segment: give at least one label value")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    check_query(query)
    # query and supports -> canonical slice stacks in [0, 1], all cut in the query's anatomical plane
    qplan = SlicePlan.for_volume(query, options.axis)
    # "auto" is resolved once per volume: the choice both normalises it and compares modalities
    query_kind = choose_preset(query)
    # windowed one slice at a time when read: a float32 copy of a 600-slice CT would be 630 MB
    qstack = SliceStack.of(query, qplan, query_kind if options.preset == "auto" else options.preset)
    prepared = []
    support_plans = []
    for s_idx, case in enumerate(supports):
        if not case.labels.same_grid(case.image):
            raise InputError(f"{case.name}: the label map is not on its image's grid (read it with read_labels)")
        support_kind = choose_preset(case.image)
        if support_kind != query_kind:
            warnings.warn(f"{case.name} and the query look like different modalities (CT vs other); "
                          "cross-modality support is allowed but less reliable", stacklevel=2)
        plan = SlicePlan(case.image, qplan.plane)
        with warnings.catch_warnings():  # the oblique warning, if any, was just given by the plan above
            warnings.simplefilter("ignore")
            own_plane = SlicePlan.for_volume(case.image, "auto").plane
        if options.axis == "auto" and own_plane != qplan.plane:
            warnings.warn(f"{case.name} was acquired {own_plane}, the query {qplan.plane}: the support is cut in the "
                          f"query's {qplan.plane} plane too (choose another plane with --axis)", stacklevel=2)
        support_plans.append(plan)
        image_stack = SliceStack.of(case.image, plan, support_kind if options.preset == "auto" else options.preset)
        # the LPIPS backend compares slices at one scale, centred on the body (see backends/lpips_matching.py)
        box = body_box(image_stack, plan.in_plane_spacing) if options.method == "lpips" else None
        prepared.append((plan, image_stack, case, box))
    for structure in structures:  # before any encoder call: a structure no support holds cannot be segmented
        holders = [case.name for case in supports if case.mask(structure.value).any()]
        if not holders:
            where = supports[0].name if len(supports) == 1 else "every support"
            raise InputError(f"structure {structure.value} ({structure.name}) is absent from {where}")
    timings["prepare"] = time.perf_counter() - t0

    t_range = time.perf_counter()
    # the query's stack with its geometry: the range estimate and the LPIPS backend share its body box
    query_info = StackInfo(qstack, qplan.in_plane_spacing, qplan.slice_spacing)
    ranges = structure_ranges(qplan, query_info, prepared, structures, options)
    timings["extent"] = time.perf_counter() - t_range
    n = qstack.shape[0]
    # how many structures still need each query slice: its features are dropped after the last one
    uses = np.zeros(n, dtype=int)
    for r in ranges.values():
        if r is not None:
            uses[r[0] : r[1] + 1] += 1

    if engine is None:
        engine = make_engine(options)
    engine.reset()
    engine.set_feature_storage(options.feature_storage)
    estimate = estimate_resources(engine, options.method, int(uses.sum()), int((uses > 0).sum()),
                                  qstack.shape[1:], len(structures), options.feature_storage,
                                  int(uses.sum()) if options.overlap == "logits" and len(structures) > 1 else 0)
    if notify is not None:
        for st in structures:
            r = ranges[st.value]
            notify(f"{st.name}: slices {'-'.join(map(str, to_array_range(qplan, *r)))} of {n} along array axis "
                   f"{qplan.array_axis}" if r is not None else f"{st.name}: empty slice range, not segmented")
        notify(estimate.describe())
    check_resources(estimate, engine)
    if estimate.feature_storage is not None:
        engine.set_feature_storage(*estimate.feature_storage)
    requested_batch = engine.batch_size
    engine.batch_size, engine.feature_budget = estimate.batch_size, estimate.feature_budget
    try:
        return _segment_structures(query, qplan, query_info, prepared, support_plans, supports, structures,
                                   options, ranges, uses, engine, estimate, progress, timings, t0)
    finally:
        engine.batch_size, engine.feature_budget = requested_batch, None


def _segment_structures(query, qplan, query_info, prepared, support_plans, supports, structures, options, ranges,
                        uses, engine, estimate, progress, timings, t0) -> SegmentationResult:
    """Every structure on its range with the prepared engine; then the label map and the result."""
    qstack = query_info.images
    n = qstack.shape[0]
    query_keys = [("query", i) for i in range(n)]
    engine.add_stack(query_keys, qstack)
    clock = StageClock(engine, timings)
    if estimate.upfront:
        # on a GPU with room for every slice in range: encode them up front, in batches
        todo = [query_keys[i] for i in range(n) if uses[i] > 0]
        # bars start at 0 before the first batch, which takes seconds on a CPU
        progress(f"Encoding slice 0/{len(todo)}", 0, len(todo))
        with clock.stage("encode"):
            engine.encode(todo, progress=lambda d, t: progress(f"Encoding slice {d}/{t}", d, t))
    backend = get_backend(options.method)
    shared_cache: dict = {}  # per-run results the backends reuse across structures (the query's body box)
    if options.method == "lpips":
        shared_cache["body_box"] = query_info.body_box()  # of the whole query, not the range

    top = max(s.value for s in structures)
    # the label stack; where two structures claim a voxel, options.overlap decides (non_overlap.py)
    composer = LabelComposer(qstack.shape, np.min_scalar_type(top) if top < 65536 else np.int32,
                             options.overlap if len(structures) > 1 else "order")
    scores: list[SliceScore] = []
    used: list[UsedSupportSlice] = []
    forward_masks: dict[int, np.ndarray] = {}
    slice_ranges: dict[int, Optional[tuple[int, int]]] = {}
    jobs: list[StructureJob] = []
    for structure in structures:
        r = ranges[structure.value]
        slice_ranges[structure.value] = None if r is None else to_array_range(qplan, *r)
        if r is None:
            continue
        first, last = r
        uses[first : last + 1] -= 1
        support_slices = []
        for s_idx, (plan, image_stack, case, box) in enumerate(prepared):
            mask_stack = plan.stack(case.mask(structure.value))
            if not mask_stack.any():
                if len(prepared) > 1:
                    continue  # several supports: each only needs the structures it has
                raise InputError(f"structure {structure.value} ({structure.name}) is absent from {supports[s_idx].name}")
            _warn_small_support(mask_stack, structure, case.name)
            # the smallest integer type, not int64 (2.5 GB for a 600-slice 512 x 512 support)
            label_stack = mask_stack.astype(np.min_scalar_type(structure.value)) * structure.value
            for idx in select_support_slices(label_stack, structure.value, options.shots):
                key = ("support", s_idx, idx)
                engine.add_frames({key: image_stack[idx]})
                support_slices.append(SupportSlice(key, mask_stack[idx].copy(), s_idx, idx,
                                                   image_stack[idx], plan.slice_index_to_array_index(idx),
                                                   plan.in_plane_spacing, box))
        if not support_slices:
            raise InputError(f"structure {structure.value} ({structure.name}) is absent from every support")
        # the backend sees only the slices of the range
        context = QueryContext(keys=query_keys[first : last + 1], images=qstack[first : last + 1],
                               spacing=qplan.in_plane_spacing, cache=shared_cache,
                               keep_logits=composer.rule == "logits")
        jobs.append(StructureJob(structure.value, structure.name, support_slices, context, first,
                                 last_use=[query_keys[i] for i in range(first, last + 1) if uses[i] == 0],
                                 read_again=[query_keys[i] for i in range(first, last + 1) if uses[i] > 0]))

    by_value = {s.value: s for s in structures}
    for job, result in backend.run_many(engine, jobs, options.method_options, progress, clock):
        structure, first = by_value[job.value], job.first
        composer.add(structure.value, first, result.masks, result.logits)
        used += [UsedSupportSlice(structure.value, s.support, s.slice_index, s.array_index) for s in result.supports]
        if result.scores is not None:
            selected = set(result.selected)
            for i, score in enumerate(result.scores):
                scores.append(SliceScore(structure.name, structure.value, qplan.slice_index_to_array_index(first + i),
                                         first + i, float(score), result.higher_is_better, i in selected,
                                         None if result.matches is None else result.matches[i]))
        if result.forward_masks is not None:
            full = np.zeros(qstack.shape, dtype=bool)
            full[first : first + len(result.forward_masks)] = result.forward_masks
            forward_masks[structure.value] = qplan.unstack(full)
    out_stack = composer.labels

    labels = query.with_array(qplan.unstack(out_stack))
    timings["total"] = time.perf_counter() - t0
    return SegmentationResult(labels, list(structures), scores, engine.encoder_calls, timings,
                              qplan.array_axis, forward_masks, used, qplan, support_plans, slice_ranges, estimate)


def structure_ranges(qplan: SlicePlan, query_info: StackInfo, prepared: list, structures: list[Structure],
                     options: SegmentOptions) -> dict[int, Optional[tuple[int, int]]]:
    """Per structure value, the inclusive range of query stack slices to segment (None: an empty estimate)."""
    from .slice_range import check_slice_range, resolve_slice_ranges, to_stack_range

    n = query_info.images.shape[0]
    ranges: dict[int, Optional[tuple[int, int]]] = {}
    auto = []
    specs = resolve_slice_ranges(options.slice_range, structures)
    for s in structures:  # per structure: off, FIRST:LAST or auto (estimated below)
        given = specs[s.value]
        if given == (0, -1):
            ranges[s.value] = (0, n - 1)
        elif given is not None:
            check_slice_range(given[0], given[1], n, qplan.array_axis)
            ranges[s.value] = to_stack_range(qplan, *given)
        else:
            auto.append(s)
    if auto:
        ranges.update(estimated_ranges(query_info, prepared, auto, options))
    return ranges


def estimated_ranges(query_info: StackInfo, prepared: list, structures: list[Structure],
                     options: SegmentOptions) -> dict[int, Optional[tuple[int, int]]]:
    """Per structure value, the range the extent estimator finds from the supports (None: empty)."""
    import os

    from .extent import ExtentEstimator
    from .lpips_distance import LPIPS_WEIGHTS_ENV

    n = query_info.images.shape[0]
    weights = (options.extent_weights or getattr(options.method_options, "weights", None)
               or os.environ.get(LPIPS_WEIGHTS_ENV))
    try:
        estimator = ExtentEstimator("alex", weights, str(pick_device(options.device)), margin_mm=options.extent_margin)
    except InputError as exc:
        # the range only saves time: without the AlexNet weights, segment every slice rather than nothing
        warnings.warn(f"slice range estimation is off, every slice is segmented: {exc}", stacklevel=3)
        return {s.value: (0, n - 1) for s in structures}
    support_infos = []
    for plan, image_stack, case, box in prepared:
        # which slices hold each structure (the output's values, whatever the support's own numbering)
        present = {st.value: plan.stack(case.mask(st.value)).reshape(image_stack.shape[0], -1).any(axis=1)
                   for st in structures}
        support_infos.append(StackInfo(image_stack, plan.in_plane_spacing, plan.slice_spacing, present=present,
                                       box=box))
    found = estimator.estimate(query_info, support_infos, [(s.value, s.name) for s in structures])
    ranges: dict[int, Optional[tuple[int, int]]] = {}
    for r in found:
        if r.empty:
            warnings.warn(f"structure {r.value} ({r.name}): its estimated slice range in the query is empty (the "
                          "supports place it outside the query); it is left out. Use --slice-range off or "
                          "FIRST:LAST to segment it anyway", stacklevel=3)
            ranges[r.value] = None
        else:
            ranges[r.value] = (r.first, r.last)
    return ranges


SCORE_COLUMNS = ("structure", "value", "slice_index", "score", "higher_is_better", "selected", "matched_support",
                 "matched_slice")
RANGE_COLUMNS = ("range_first", "range_last")


def check_query(query: Volume) -> None:
    """Refuse a query there is nothing to segment in: every voxel the same value."""
    a = query.array
    if a.size and a.min() == a.max():
        raise InputError(f"the query is constant (every voxel is {a.flat[0]:g}): there is nothing to segment; "
                         "check the file")


def _warn_small_support(mask_stack: np.ndarray, structure: Structure, support: str) -> None:
    """A one-voxel support structure prompts SAM2 with next to nothing: say so (it still runs). Fewer labeled
    slices than --shots is said by `select_support_slices`."""
    if int(np.count_nonzero(mask_stack)) == 1:
        warnings.warn(f"support structure '{structure.name}' in {support} is a single voxel: SAM2 gets almost no "
                      "prompt; the result is unreliable", stacklevel=3)


def write_scores(path: str, scores: list[SliceScore],
                 slice_ranges: Optional[dict[int, Optional[tuple[int, int]]]] = None,
                 structures: Optional[list[Structure]] = None) -> None:
    """The per-slice scores as CSV, atomically. `matched_support` names the matched support image
    (support<n>:slice<stack index>:original|aug<n>); `matched_slice` is its array index in that support.

    With `slice_ranges` every row also holds its structure's segmented range (`range_first`, `range_last`: array
    indices along the slice axis; empty when the estimated range was empty), and a structure without scored
    slices (an empty range) gets one row with its name and the empty range."""
    import csv

    def bounds(value: int) -> list:
        if slice_ranges is None:
            return []
        r = slice_ranges.get(value)
        return ["", ""] if r is None else [r[0], r[1]]

    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(SCORE_COLUMNS + (RANGE_COLUMNS if slice_ranges is not None else ()))
            for s in scores:
                w.writerow([s.structure, s.value, s.slice_index, f"{s.score:.6f}", int(s.higher_is_better),
                            int(s.selected), "" if s.match is None else str(s.match),
                            "" if s.match is None else s.match.array_index] + bounds(s.value))
            scored = {s.value for s in scores}
            for st in structures or []:
                if slice_ranges is not None and st.value not in scored:
                    w.writerow([st.name, st.value] + [""] * (len(SCORE_COLUMNS) - 2) + bounds(st.value))
