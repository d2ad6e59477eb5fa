"""The one entry point: segment a query volume from labeled support volumes.

The command line, the Slicer Logic, `evaluate` and `bench` all call `segment`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import time
import warnings

import numpy as np

from .backends.base import QueryContext, StageClock, SupportSlice
from .extent import to_array_range
from .resources import ResourceEstimate, check_resources, estimate_resources
from .backends.reverse import select_conditional
from .checkpoints import VERSIONS, normalise_model_name
from .engine import SAM2Engine
from .errors import InputError
from .intensity import PRESET_NAMES, choose_preset, normalize
from .lpips_distance import body_box
from .slices import AXES, SlicePlan
from .support import select_support_slices
from .volume import Structure, Volume

ProgressCallback = Callable[[str, int, int], None]

METHODS = ("propagate", "reverse", "lpips")


@dataclass
class SupportCase:
    """One labeled support volume. `labels` is an integer label map on `image`'s grid."""

    image: Volume
    labels: Volume
    name: str = "support"


@dataclass
class SegmentOptions:
    method: str = "reverse"
    model: str = "tiny"
    version: str = "2.1"
    image_size: int = 1024
    device: str = "auto"
    checkpoint: Optional[str] = None
    untrained: bool = False
    cache_dir: Optional[str] = None
    axis: str = "auto"
    preset: str = "auto"
    shots: int = 1
    # reverse propagation
    top_k: int = 5
    min_score: float = 0.0
    keep_supports: bool = False
    # LPIPS matching
    augmentations: int = 3
    lpips_net: str = "alex"
    lpips_weights: Optional[str] = None
    seed: int = 0
    batch_size: int = 8
    # which query slices are segmented: "auto" (estimated per structure from the supports, see extent.py),
    # "off" (every slice) or "FIRST:LAST" (inclusive indices along the query array's slice axis)
    slice_range: str = "off"  # the command line and the Slicer module default to "auto"
    extent_margin_mm: float = 15.0
    feature_storage: str = "auto"  # engine feature cache: auto | float32 | bfloat16


@dataclass
class SliceScore:
    """Per query slice and structure: the backend's confidence and what it decided."""

    structure: str
    value: int
    slice_index: int
    score: float  # reverse: pi (mean Dice on the supports); lpips: LPIPS distance (lower = closer)
    selected: bool  # reverse: conditional slice; lpips: always False
    matched_support: str = ""  # lpips: which augmented support image matched, e.g. "support0:slice41:aug2"
    matched_slice: int = -1  # lpips: slice index (in the support's slice stack) of the matched support image


@dataclass
class SegmentationResult:
    labels: Volume  # multi-label map on the query's grid; voxel values = Structure.value
    structures: list[Structure]
    scores: list[SliceScore] = field(default_factory=list)
    encoder_calls: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    slice_axis: int = 0  # the array axis of `labels.array` the slices were taken along
    # reverse: the forward predictions p_i per structure value, bool arrays shaped like labels.array
    forward_masks: dict[int, "np.ndarray"] = field(default_factory=dict)
    # per structure value: the inclusive range of array indices along `slice_axis` that was segmented
    # (None: the estimated range was empty, nothing segmented); outside it the labels are background
    slice_ranges: dict[int, Optional[tuple[int, int]]] = field(default_factory=dict)
    estimate: Optional["ResourceEstimate"] = None


def _backend(method: str):
    from .backends import lpips_matching, propagate, reverse

    backends = {"propagate": propagate, "reverse": reverse, "lpips": lpips_matching}
    if method not in backends:
        raise InputError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    return backends[method]


def validate_options(options: SegmentOptions) -> None:
    """Refuse bad settings before any work (and before the model is built)."""
    _backend(options.method)
    normalise_model_name(options.model)
    if str(options.version) not in VERSIONS:
        raise InputError(f"unknown SAM2 version '{options.version}': choose one of {', '.join(VERSIONS)}")
    if options.axis not in AXES:
        raise InputError(f"unknown slice axis '{options.axis}': choose one of {', '.join(AXES)}")
    if options.preset not in PRESET_NAMES:
        raise InputError(f"unknown intensity preset '{options.preset}': choose one of {', '.join(PRESET_NAMES)}")
    if options.shots < 1:
        raise InputError(f"--shots must be at least 1, got {options.shots}")
    if options.image_size % 32 or options.image_size < 64:
        raise InputError(f"--image-size must be a multiple of 32 and at least 64, got {options.image_size}")
    if options.method == "reverse":
        select_conditional([], options.top_k, options.min_score)
    if options.augmentations < 0:
        raise InputError(f"--augmentations must be 0 or more, got {options.augmentations}")
    from .extent import parse_slice_range
    from .engine import FEATURE_STORAGE

    parse_slice_range(options.slice_range)
    if not options.extent_margin_mm >= 0:
        raise InputError(f"--extent-margin must be 0 mm or more, got {options.extent_margin_mm}")
    if options.feature_storage not in FEATURE_STORAGE:
        raise InputError(f"unknown feature storage '{options.feature_storage}': choose one of "
                         f"{', '.join(FEATURE_STORAGE)}")


def make_engine(options: SegmentOptions) -> SAM2Engine:
    return SAM2Engine(
        model=options.model,
        version=options.version,
        image_size=options.image_size,
        device=options.device,
        checkpoint=options.checkpoint,
        untrained=options.untrained,
        cache_dir=options.cache_dir,
        batch_size=options.batch_size,
        feature_storage=options.feature_storage,
    )


def segment(
    query: Volume,
    supports: list[SupportCase],
    structures: list[Structure],
    options: SegmentOptions,
    progress: Optional[ProgressCallback] = None,
    engine: Optional[SAM2Engine] = None,
    notify: Optional[Callable[[str], None]] = None,
) -> SegmentationResult:
    """Segment `structures` (by label value) in `query` from the labeled `supports`.

    Every structure is segmented on its own; where two structures claim a voxel, the one listed first keeps it.
    Raise `errors.Cancelled` from `progress` to stop: nothing is returned and nothing was written.
    `notify(text)` receives the slice ranges and the memory/time estimate before the work starts.
    """
    progress = progress or (lambda stage, done, total: None)
    validate_options(options)
    if not supports:
        raise InputError("at least one support (image + labels) is needed")
    if not structures:
        raise InputError("no structure to segment: give at least one label value")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # query and supports -> canonical slice stacks in [0, 1]
    qplan = SlicePlan.for_volume(query, options.axis)
    # "auto" is resolved once per volume: the choice both normalises it and compares modalities
    query_kind = choose_preset(query)
    qstack = qplan.stack(normalize(query, query_kind if options.preset == "auto" else options.preset))
    prepared = []
    for s_idx, case in enumerate(supports):
        if not case.labels.same_grid(case.image):
            raise InputError(f"{case.name}: the label map is not on its image's grid (read it with read_labels)")
        support_kind = choose_preset(case.image)
        if support_kind != query_kind:
            warnings.warn(f"{case.name} and the query look like different modalities (CT vs other); "
                          "cross-modality support is allowed but less reliable", stacklevel=2)
        plan = SlicePlan.for_volume(case.image, options.axis)
        image_stack = plan.stack(normalize(case.image, support_kind if options.preset == "auto" else options.preset))
        # the LPIPS backend compares slices at one scale, centred on the body (see backends/lpips_matching.py)
        box = body_box(image_stack, plan.in_plane_spacing) if options.method == "lpips" else None
        prepared.append((plan, image_stack, plan.stack(case.labels.array), box))
    timings["prepare"] = time.perf_counter() - t0

    with_time = time.perf_counter()
    ranges = structure_ranges(qplan, qstack, prepared, structures, options)
    timings["extent"] = time.perf_counter() - with_time
    n = qstack.shape[0]
    # how often each query slice is still needed: features are dropped after their last use
    uses = np.zeros(n, dtype=int)
    for r in ranges.values():
        if r is not None:
            uses[r[0] : r[1] + 1] += 1

    if engine is None:
        engine = make_engine(options)
    estimate = estimate_resources(engine, options.method, int(uses.sum()), int((uses > 0).sum()),
                                  qstack.shape[1:], len(structures))
    if notify is not None:
        for st in structures:
            r = ranges[st.value]
            notify(f"{st.name}: slices {'-'.join(map(str, to_array_range(qplan, *r)))} of {n} along array axis "
                   f"{qplan.array_axis}" if r is not None else f"{st.name}: empty slice range, not segmented")
        notify(estimate.describe())
    check_resources(estimate, engine)
    engine.reset()
    if estimate.feature_storage is not None:
        engine.set_feature_storage(*estimate.feature_storage)
    query_keys = [("query", i) for i in range(n)]
    engine.add_frames(dict(zip(query_keys, qstack)))
    clock = StageClock(engine, timings)
    if estimate.upfront:
        # the whole cache fits the budget: encode every slice in range up front, in batches (faster on a GPU)
        todo = [query_keys[i] for i in range(n) if uses[i] > 0]
        with clock.stage("encode"):
            engine.encode(todo, progress=lambda d, t: progress(f"Encoding slice {d}/{t}", d, t))
    backend = _backend(options.method)
    body_box_cache: dict = {}

    out_stack = np.zeros(qstack.shape, dtype=np.uint16)
    scores: list[SliceScore] = []
    forward_masks: dict[int, np.ndarray] = {}
    slice_ranges: dict[int, Optional[tuple[int, int]]] = {}
    for structure in structures:
        r = ranges[structure.value]
        if r is None:
            slice_ranges[structure.value] = None
            continue
        first, last = r
        slice_ranges[structure.value] = to_array_range(qplan, first, last)
        inside = list(range(first, last + 1))
        uses[first : last + 1] -= 1
        last_use = [query_keys[i] for i in inside if uses[i] == 0]
        support_slices = []
        for s_idx, (plan, image_stack, label_stack, box) in enumerate(prepared):
            if not (label_stack == structure.value).any():
                if len(prepared) > 1:
                    continue  # several supports: each only needs the structures it has
                raise InputError(f"structure {structure.value} ({structure.name}) is absent from {supports[s_idx].name}")
            for idx in select_support_slices(label_stack, structure.value, options.shots):
                key = ("support", s_idx, idx)
                engine.add_frames({key: image_stack[idx]})
                support_slices.append(SupportSlice(key, label_stack[idx] == structure.value, s_idx, idx,
                                                   image_stack[idx], plan.slice_index_to_array_index(idx),
                                                   plan.in_plane_spacing, box))
        if not support_slices:
            raise InputError(f"structure {structure.value} ({structure.name}) is absent from every support")

        def stage_progress(stage: str, done: int, total: int, _name=structure.name) -> None:
            progress(f"{_name}: {stage}", done, total)

        # the backend sees only the slices inside the range; the body box is the whole query's
        context = QueryContext(keys=[query_keys[i] for i in inside], images=qstack[first : last + 1],
                               spacing=qplan.in_plane_spacing, cache=body_box_cache)
        if "body_box" not in body_box_cache and options.method == "lpips":
            body_box_cache["body_box"] = body_box(qstack, qplan.in_plane_spacing)
        if options.method in ("propagate", "lpips"):
            engine.use_once(last_use)  # these read each query slice once: drop its features right after
        result = backend.run(engine, context, support_slices, options, stage_progress, clock)
        engine.release(last_use)  # reverse reads them twice (forward, self-propagation): dropped here
        free = out_stack[first : last + 1] == 0
        out_stack[first : last + 1][result.masks & free] = structure.value
        for i, score, selected, matched, matched_slice in result.scores:
            scores.append(SliceScore(structure.name, structure.value, qplan.slice_index_to_array_index(first + i),
                                     score, selected, matched, matched_slice))
        if result.forward_masks is not None:
            full = np.zeros(qstack.shape, dtype=bool)
            full[first : last + 1] = result.forward_masks
            forward_masks[structure.value] = qplan.unstack(full)

    labels = query.with_array(qplan.unstack(out_stack))
    if labels.array.max() < 256:
        labels = labels.with_array(labels.array.astype(np.uint8))
    timings["total"] = time.perf_counter() - t0
    return SegmentationResult(labels, list(structures), scores, engine.encoder_calls, timings,
                              qplan.array_axis, forward_masks, slice_ranges, estimate)


def structure_ranges(qplan: SlicePlan, qstack: np.ndarray, prepared: list, structures: list[Structure],
                     options: SegmentOptions) -> dict[int, Optional[tuple[int, int]]]:
    """Per structure value, the inclusive range of query stack slices to segment (None: empty estimate)."""
    from .extent import ExtentEstimator, StackInfo, check_slice_range, parse_slice_range, to_stack_range

    n = qstack.shape[0]
    given = parse_slice_range(options.slice_range)
    if given == (0, -1):  # off
        return {s.value: (0, n - 1) for s in structures}
    if given is not None:
        check_slice_range(given[0], given[1], n, qplan.array_axis)
        r = to_stack_range(qplan, *given)
        return {s.value: r for s in structures}
    try:
        estimator = ExtentEstimator(options.lpips_net, options.lpips_weights, _lpips_device(options),
                                    margin_mm=options.extent_margin_mm)
    except InputError as exc:
        # the range only saves time: without the LPIPS weights, segment every slice rather than nothing
        warnings.warn(f"slice range estimation is off, every slice is segmented: {exc}", stacklevel=3)
        return {s.value: (0, n - 1) for s in structures}
    query_info = StackInfo(qstack, qplan.in_plane_spacing, qplan.slice_spacing)
    support_infos = [StackInfo(image_stack, plan.in_plane_spacing, plan.slice_spacing, label_stack)
                     for plan, image_stack, label_stack, _ in prepared]
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


def _lpips_device(options: SegmentOptions) -> str:
    from .engine import pick_device

    return str(pick_device(options.device))


def write_scores(path: str, scores: list[SliceScore],
                 slice_ranges: Optional[dict[int, Optional[tuple[int, int]]]] = None,
                 structures: Optional[list[Structure]] = None) -> None:
    """The per-slice scores as CSV (structure, slice index, score, selected, matched support), atomically.

    With `slice_ranges`, every row also holds its structure's segmented range (range_first, range_last: array
    indices along the slice axis, empty when the range was empty), and a structure without per-slice scores
    (plain propagation, an empty range) gets one row with only its range.
    """
    import csv
    import os
    import tempfile

    ranges = slice_ranges or {}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".scores-", suffix=".csv", dir=folder)

    def bounds(value: int) -> list:
        if slice_ranges is None:
            return []
        r = ranges.get(value)
        return ["", ""] if r is None else [r[0], r[1]]

    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["structure", "value", "slice_index", "score", "selected", "matched_support", "matched_slice"]
                       + (["range_first", "range_last"] if slice_ranges is not None else []))
            for s in scores:
                w.writerow([s.structure, s.value, s.slice_index, f"{s.score:.6f}", int(s.selected),
                            s.matched_support, s.matched_slice if s.matched_slice >= 0 else ""] + bounds(s.value))
            scored = {s.value for s in scores}
            for st in structures or []:
                if st.value not in scored and st.value in ranges:
                    w.writerow([st.name, st.value, "", "", "", "", ""] + bounds(st.value))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
