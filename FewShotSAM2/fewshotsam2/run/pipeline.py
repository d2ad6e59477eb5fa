"""One segmentation run: a query volume and typed supports in, a label map and per-slice decisions out.

`segment` is the Python API's entry point; `Segmenter` (segmenter.py) wraps it for files and the front ends.
A run is `prepare` (slice plans, windowed stacks, every input check, the ranges the user gave: a `Run`, the
per-run state; cheap, before the model is built), `Run.estimate_ranges` (the ranges left to estimate from the
supports) and `Run.execute` (each structure on its range with the engine, then the label map).
"""

from __future__ import annotations

import csv
import io
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

from fewshotsam2 import constants
from fewshotsam2.backends import get_backend
from fewshotsam2.backends.base import Backend, QueryContext, StageClock, StructureJob, SupportSlice
from fewshotsam2.model.device import pick_device
from fewshotsam2.model.engine import SAM2Engine
from fewshotsam2.errors import InputError
from fewshotsam2.slicing.extent import ExtentEstimator, StackInfo, slice_tilt_degrees
from fewshotsam2.slicing.intensity import choose_preset
from fewshotsam2.run.non_overlap import LabelComposer
from fewshotsam2.matching.lpips_distance import body_box
from fewshotsam2.options import LpipsOptions, PropagateOptions, ReverseOptions, SegmentOptions  # noqa: F401  (re-exported)
from fewshotsam2.model.resources import ResourceEstimate, check_resources, estimate_resources
from fewshotsam2.run.range_ends import extend_past_range_ends, range_report
from fewshotsam2.run.results import LpipsMatch, RangeReport, SegmentationResult, SliceScore, UsedSupportSlice  # noqa: F401  (re-exported)
from fewshotsam2.settings import LPIPS_WEIGHTS_ENV
from fewshotsam2.slicing.slice_range import check_slice_range, resolve_slice_ranges, to_array_range, to_stack_range
from fewshotsam2.slicing.slice_stack import SliceStack
from fewshotsam2.slicing.slices import SlicePlan
from fewshotsam2.slicing.support import select_support_slices
from fewshotsam2.supports.support_loader import SupportCase  # noqa: F401  (re-exported: pipeline.SupportCase)
from fewshotsam2.io.volume import LabelMap, Structure, Volume
from fewshotsam2.run.progress import ProgressBar
from fewshotsam2.requirements import require_lpips
from fewshotsam2.io.atomic import write_text_atomic

ProgressCallback = Callable[[str, int, int], None]

METHODS = constants.METHODS
StackRange = Optional[tuple[int, int]]  # inclusive range of query stack indices; None: an empty estimate


def make_engine(options: SegmentOptions) -> SAM2Engine:
    """The SAM2 engine `options` asks for (builds the model; downloads the checkpoint on first use)."""
    return SAM2Engine.from_options(options)


@dataclass
class PreparedSupport:
    """A support ready for the engine: its slice plan (cut in the query's plane), its windowed slices and, for
    backends that compare slices at one field of view, its body box."""

    case: SupportCase
    plan: SlicePlan
    stack: SliceStack
    body_box: Optional[tuple] = None


@dataclass
class Run:
    """The state of one `segment` call, from preparation to the label map (sam2's `inference_state` plays this
    part in its video predictor): built by `prepare`, consumed by `execute`."""

    query: Volume
    plan: SlicePlan
    info: StackInfo  # the query's windowed slices with their geometry (shared with the range estimate)
    supports: list[PreparedSupport]
    structures: list[Structure]
    options: SegmentOptions
    backend: Backend
    ranges: dict[int, StackRange] = field(default_factory=dict)  # per structure value, once known
    to_estimate: list[Structure] = field(default_factory=list)  # slice range "auto": estimated from the supports
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @property
    def n(self) -> int:
        return self.info.images.shape[0]

    @property
    def overlap_rule(self) -> str:
        """Who keeps a voxel two structures claim (`options.overlap`; one structure: nothing to decide)."""
        return self.options.overlap if len(self.structures) > 1 else "order"

    @property
    def keys(self) -> list:
        return [("query", i) for i in range(self.n)]

    def uses(self) -> np.ndarray:
        """How many structures read each query slice (its features are dropped after the last one)."""
        uses = np.zeros(self.n, dtype=int)
        for r in self.ranges.values():
            if r is not None:
                uses[r[0] : r[1] + 1] += 1
        return uses

    def array_range(self, value: int) -> Optional[tuple[int, int]]:
        r = self.ranges[value]
        return None if r is None else to_array_range(self.plan, *r)

    def describe_ranges(self) -> list[str]:
        out = []
        for st in self.structures:
            r = self.array_range(st.value)
            out.append(f"{st.name}: slices {r[0]}-{r[1]} of {self.n} along array axis {self.plan.array_axis}"
                       if r is not None else f"{st.name}: empty slice range, not segmented")
        return out

    # ------------------------------------------------------------------------------------------ execution

    def estimate_ranges(self) -> None:
        """Estimate the slice ranges the user left to the supports (LPIPS, seconds to a minute)."""
        if self.to_estimate:
            t0 = time.perf_counter()
            self.ranges.update(estimated_ranges(self, self.to_estimate))
            self.to_estimate = []
            self.timings["extent"] = self.timings.get("extent", 0.0) + time.perf_counter() - t0

    def execute(self, engine, progress: ProgressCallback,
                notify: Optional[Callable[[str], None]] = None) -> SegmentationResult:
        """Segment every structure on its range with `engine`; the label map and the per-slice decisions."""
        self.estimate_ranges()
        engine.reset()
        engine.set_feature_storage(self.options.feature_storage)
        uses = self.uses()
        estimate = estimate_resources(engine, self.options.method, int(uses.sum()), int((uses > 0).sum()),
                                      self.info.images.shape[1:], len(self.structures), self.options.feature_storage,
                                      int(uses.sum()) if self.overlap_rule == "logits" else 0,
                                      layered=self.overlap_rule == "allow")
        if notify is not None:
            for line in self.describe_ranges():
                notify(line)
            notify(estimate.describe())
        check_resources(estimate, engine)
        if estimate.feature_storage is not None:
            engine.set_feature_storage(*estimate.feature_storage)
        with _engine_limits(engine, estimate):
            return self._segment_structures(engine, estimate, uses, progress)

    def _segment_structures(self, engine, estimate: ResourceEstimate, uses: np.ndarray,
                            progress: ProgressCallback) -> SegmentationResult:
        keys = self.keys
        engine.add_stack(keys, self.info.images)
        clock = StageClock(engine, self.timings)
        if estimate.upfront:
            # on a GPU with room for every slice in range: encode them up front, in batches
            todo = [keys[i] for i in range(self.n) if uses[i] > 0]
            progress(f"Encoding slice 0/{len(todo)}", 0, len(todo))  # bars start at 0 before the first batch
            with clock.stage("encode"):
                engine.encode(todo, progress=lambda d, t: progress(f"Encoding slice {d}/{t}", d, t))
        shared_cache: dict = {}  # per-run results the backends reuse across structures
        if self.backend.needs_body_box:
            shared_cache["body_box"] = self.info.body_box()  # of the whole query, not the range
        out = _Outputs(self)
        kinds = range_kinds(self.options, self.structures)
        jobs = []
        for structure in self.structures:
            r = self.ranges[structure.value]
            if r is None:
                out.reports[structure.value] = range_report(structure.name, structure.value, kinds[structure.value],
                                                            None, None, [])
                continue
            first, last = r
            uses[first : last + 1] -= 1
            # the backend sees only the slices of the range
            context = QueryContext(keys=keys[first : last + 1], images=self.info.images[first : last + 1],
                                   spacing=self.plan.in_plane_spacing, cache=shared_cache,
                                   keep_logits=self.overlap_rule == "logits")
            jobs.append(StructureJob(structure.value, structure.name, self._support_slices(structure, engine),
                                     context, first,
                                     last_use=[keys[i] for i in range(first, last + 1) if uses[i] == 0],
                                     read_again=[keys[i] for i in range(first, last + 1) if uses[i] > 0]))
        # every structure (propagate: in one pass, batched over structures), in listing order
        by_value = {s.value: s for s in self.structures}
        for job, result in self.backend.run_many(engine, jobs, self.options.method_options, progress, clock):
            structure = by_value[job.value]
            out.add(structure, job.first, result)
            first, last = job.first, job.first + len(job.query.keys) - 1

            def stage_progress(stage: str, done: int, total: int, _name=structure.name) -> None:
                progress(f"{_name}: {stage}", done, total)

            # a range end the prediction still touches: continued past (estimated) or warned about (range_ends.py)
            seg_first, seg_last, masks, ends = extend_past_range_ends(
                engine, result, keys, self.info.images, first, last, kinds[structure.value] == "auto",
                structure.name, self.plan.slice_index_to_array_index, stage_progress)
            engine.release(keys[i] for i in range(seg_first, seg_last + 1) if uses[i] == 0 and not first <= i <= last)
            if (seg_first, seg_last) != (first, last):  # continued slices: the structure listed first keeps a voxel
                out.composer.extend(structure.value, seg_first, masks)
            self.ranges[structure.value] = (seg_first, seg_last)  # the result reports the range segmented
            out.reports[structure.value] = range_report(structure.name, structure.value, kinds[structure.value],
                                                        to_array_range(self.plan, first, last),
                                                        self.array_range(structure.value), ends)
        self.timings["total"] = time.perf_counter() - self.started
        return out.result(engine.encoder_calls, estimate)

    def _support_slices(self, structure: Structure, engine) -> list[SupportSlice]:
        """The labeled support slices that prompt SAM2 for `structure`, registered with the engine."""
        slices = []
        for s_idx, support in enumerate(self.supports):
            mask_stack = support.plan.stack(support.case.mask(structure.value))
            if not mask_stack.any():
                continue  # a support holds only some structures (prepare checked that one holds each)
            _warn_small_support(mask_stack, structure, support.case.name)
            # the smallest integer type, not int64 (2.5 GB for a 600-slice 512 x 512 support)
            label_stack = mask_stack.astype(np.min_scalar_type(structure.value)) * structure.value
            for idx in select_support_slices(label_stack, structure.value, self.options.shots):
                key = ("support", s_idx, idx)
                engine.add_frames({key: support.stack[idx]})
                slices.append(SupportSlice(key, mask_stack[idx].copy(), s_idx, idx, support.stack[idx],
                                           support.plan.slice_index_to_array_index(idx),
                                           support.plan.in_plane_spacing, support.body_box))
        return slices


class _Outputs:
    """What a run collects per structure: the label stack, the scores, the support slices used."""

    def __init__(self, run: Run) -> None:
        self.run = run
        top = max(s.value for s in run.structures)
        shape = run.info.images.shape
        # where two structures claim a voxel, the overlap rule decides (non_overlap.py)
        self.composer = LabelComposer(shape, np.min_scalar_type(top) if top < 65536 else np.int32, run.overlap_rule)
        self.stack = self.composer.labels
        self.scores: list[SliceScore] = []
        self.used: list[UsedSupportSlice] = []
        self.forward_masks: dict[int, np.ndarray] = {}
        self.reports: dict[int, RangeReport] = {}

    def add(self, structure: Structure, first: int, result) -> None:
        plan = self.run.plan
        self.composer.add(structure.value, first, result.masks, result.logits)
        self.used += [UsedSupportSlice(structure.value, s.support, s.stack_index, s.array_index)
                      for s in result.supports]
        if result.scores is not None:
            selected = set(result.selected)
            for i, score in enumerate(result.scores):
                self.scores.append(SliceScore(structure.name, structure.value,
                                              plan.slice_index_to_array_index(first + i), first + i, float(score),
                                              result.higher_is_better, i in selected,
                                              None if result.matches is None else result.matches[i]))
        if result.forward_masks is not None:
            full = np.zeros(self.stack.shape, dtype=bool)
            full[first : first + result.forward_masks.shape[0]] = result.forward_masks
            self.forward_masks[structure.value] = plan.unstack(full)

    def result(self, encoder_calls: int, estimate: ResourceEstimate) -> SegmentationResult:
        run = self.run
        structures = list(run.structures)
        if self.composer.rule == "allow":
            # each structure its whole mask; overlapping ones in separate layers (written as a .seg.nrrd only)
            by_value = {s.value: s for s in structures}
            layered = LabelMap.from_masks(run.query, [(by_value[v], run.plan.unstack(m)) for v, m in
                                                       self.composer.masks()])
            placed = {s.value: s for s in layered.structures}
            labels = layered.volume
            structures = [placed.get(s.value, s) for s in structures]
        else:
            labels = run.query.with_array(run.plan.unstack(self.stack))
        ranges = {s.value: run.array_range(s.value) for s in run.structures}
        return SegmentationResult(labels, structures, self.scores, encoder_calls, run.timings,
                                  run.plan.array_axis, self.forward_masks, self.used, run.plan,
                                  [s.plan for s in run.supports], ranges, estimate, self.reports)


def range_kinds(options: SegmentOptions, structures: list[Structure]) -> dict[int, str]:
    """Per structure value: "auto" (estimated), "off" (every slice) or "given" (FIRST:LAST), as --slice-range says."""
    specs = resolve_slice_ranges(options.slice_range, structures)
    return {v: {"whole": "off", "range": "given"}.get(spec.kind, "auto") for v, spec in specs.items()}


@contextmanager
def _engine_limits(engine, estimate: ResourceEstimate) -> Iterator[None]:
    """The run's prediction batch and feature budget (capped on the CPU by the estimate); the engine's own
    settings come back afterwards, so an engine serves the next run as it was built."""
    saved = engine.batch_size, engine.feature_budget
    engine.batch_size, engine.feature_budget = estimate.batch_size, estimate.feature_budget
    try:
        yield
    finally:
        engine.batch_size, engine.feature_budget = saved


# ---------------------------------------------------------------------------------------------- preparation


def prepare(query: Volume, supports: list[SupportCase], structures: list[Structure],
            options: SegmentOptions) -> Run:
    """Check the inputs, cut every volume in the query's plane, and decide each structure's slice range.

    Nothing is encoded yet; a bad input is an InputError here, before the model is built or used.
    """
    if not isinstance(options, SegmentOptions):
        raise TypeError(f"options must be a SegmentOptions (SegmentOptions.from_flat builds one), got {options!r}")
    if not supports:
        raise InputError("at least one support (image + labels) is needed")
    if not structures:
        raise InputError("no structure to segment: give at least one label value")
    t0 = time.perf_counter()
    check_query(query)
    backend = get_backend(options.method)
    plan = SlicePlan.for_volume(query, options.axis)
    # "auto" is resolved once per volume: the choice both normalises it and compares modalities
    query_kind = choose_preset(query)
    # windowed one slice at a time when read: a float32 copy of a 600-slice CT would be 630 MB
    stack = SliceStack.of(query, plan, query_kind if options.preset == "auto" else options.preset)
    prepared = [_prepare_support(case, plan, query_kind, options, backend) for case in supports]
    for structure in structures:  # before any encoder call: a structure no support holds cannot be segmented
        if not any(case.mask(structure.value).any() for case in supports):
            where = supports[0].name if len(supports) == 1 else "every support"
            raise InputError(f"structure {structure.value} ({structure.name}) is absent from {where}")
    info = StackInfo(stack, plan.in_plane_spacing, plan.slice_spacing, tilt=slice_tilt_degrees(query, plan))
    run = Run(query, plan, info, prepared, list(structures), options, backend, started=t0)
    run.ranges, run.to_estimate = given_ranges(run)
    run.timings["prepare"] = time.perf_counter() - t0
    return run


def _prepare_support(case: SupportCase, qplan: SlicePlan, query_kind: str, options: SegmentOptions,
                     backend: Backend) -> PreparedSupport:
    if not case.labels.same_grid(case.image):
        raise InputError(f"{case.name}: the label map is not on its image's grid (read it with read_labels)")
    support_kind = choose_preset(case.image)
    warn_if_other_modality(case.image, query_kind, f"the support image of {case.name}", support_kind)
    plan = SlicePlan(case.image, qplan.plane)
    with warnings.catch_warnings():  # the oblique warning, if any, was just given by the plan above
        warnings.simplefilter("ignore")
        own_plane = SlicePlan.for_volume(case.image, "auto").plane
    if options.axis == "auto" and own_plane != qplan.plane:
        warnings.warn(f"{case.name} was acquired {own_plane}, the query {qplan.plane}: the support is cut in the "
                      f"query's {qplan.plane} plane too (choose another plane with --axis)", stacklevel=3)
    stack = SliceStack.of(case.image, plan, support_kind if options.preset == "auto" else options.preset)
    # the LPIPS backend compares slices at one scale, centred on the body (see backends/lpips_matching.py)
    box = body_box(stack, plan.in_plane_spacing) if backend.needs_body_box else None
    return PreparedSupport(case, plan, stack, box)


def segment(
    query: Volume,
    supports: list[SupportCase],
    structures: list[Structure],
    options: SegmentOptions,
    progress: ProgressCallback | bool | None = True,
    engine: Optional[SAM2Engine] = None,
    notify: Optional[Callable[[str], None]] = None,
) -> SegmentationResult:
    """Segment `structures` (by label value) in `query` from the labeled `supports` (see `support_loader`).

    Every structure is segmented on the query slices of its range (`options.slice_range`; outside it the output
    is background), with its own memory bank (propagate: all in one pass, batched over structures); where two
    structures claim a voxel, `options.overlap` decides: "logits" (default: the higher SAM2 logit, as sam2's
    video predictor with `non_overlap_masks=True`) or "order" (the one listed first).
    `progress`: True (default) shows a progress bar on stderr; None or False: silent; or a callback
    `progress(stage, done, total)`. Raise `errors.Cancelled` from it to stop: nothing is returned or written.
    `notify(text)` receives the slice ranges and the memory/time estimate before the work starts.
    """
    if progress is True:
        with ProgressBar() as bar:
            return segment(query, supports, structures, options, bar, engine, notify)
    run = prepare(query, supports, structures, options)
    if engine is None:
        engine = make_engine(options)  # a checkpoint problem shows before the range estimate's seconds
    return run.execute(engine, progress or (lambda stage, done, total: None), notify)


def given_ranges(run: Run) -> tuple[dict[int, StackRange], list[Structure]]:
    """The ranges the user gave (whole, FIRST:LAST; checked against the query) per structure value, and the
    structures whose range is left to the estimate."""
    ranges: dict[int, StackRange] = {}
    auto = []
    specs = resolve_slice_ranges(run.options.slice_range, run.structures)
    for s in run.structures:  # per structure: whole, FIRST:LAST, or auto (estimated below)
        spec = specs[s.value]
        if spec.kind == "whole":
            ranges[s.value] = (0, run.n - 1)
        elif spec.kind == "range":
            check_slice_range(spec.first, spec.last, run.n, run.plan.array_axis)
            ranges[s.value] = to_stack_range(run.plan, spec.first, spec.last)
        else:
            auto.append(s)
    return ranges, auto


def estimated_ranges(run: Run, structures: list[Structure]) -> dict[int, StackRange]:
    """Per structure value, the range the extent estimator finds from the supports (None: empty)."""
    require_lpips()  # missing lpips is an error, not "every slice": installing it is the fix
    options = run.options
    weights = (options.extent_weights or getattr(options.method_options, "weights", None)
               or os.environ.get(LPIPS_WEIGHTS_ENV))
    try:
        estimator = ExtentEstimator("alex", weights, str(pick_device(options.device)), margin_mm=options.extent_margin)
    except InputError as exc:
        if weights:  # weights the user named must work: a bad file is an error, not a silent full run
            raise
        # the range only saves time: without the AlexNet weights, segment every slice rather than nothing
        warnings.warn(f"slice range estimation is off, every slice is segmented: {exc}", stacklevel=3)
        return {s.value: (0, run.n - 1) for s in structures}
    support_infos = []
    for support in run.supports:
        # which slices hold each structure (the output's values, whatever the support's own numbering)
        present = {st.value: support.plan.stack(support.case.mask(st.value)).reshape(support.stack.shape[0], -1)
                   .any(axis=1) for st in structures}
        support_infos.append(StackInfo(support.stack, support.plan.in_plane_spacing, support.plan.slice_spacing,
                                       present=present, box=support.body_box,
                                       tilt=slice_tilt_degrees(support.case.image, support.plan)))
    found = estimator.estimate(run.info, support_infos, [(s.value, s.name) for s in structures])
    ranges: dict[int, StackRange] = {}
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


def warn_if_other_modality(image: Volume, query_kind: str, name: str, kind: Optional[str] = None) -> None:
    """Warn when a support image looks like another modality than the query (CT windows vs percentiles);
    `kind`: the image's `choose_preset`, when already known."""
    if (kind or choose_preset(image)) != query_kind:
        warnings.warn(f"{name} and the query look like different modalities (CT vs other); cross-modality support "
                      "is allowed but less reliable", stacklevel=3)


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
    def bounds(value: int) -> list:
        if slice_ranges is None:
            return []
        r = slice_ranges.get(value)
        return ["", ""] if r is None else [r[0], r[1]]

    f = io.StringIO(newline="")
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
    # a full disk: CannotWrite, one line and exit 2 (inside publish_together the --out file is not kept either)
    write_text_atomic(path, f.getvalue())
