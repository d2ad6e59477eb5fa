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
    )


def segment(
    query: Volume,
    supports: list[SupportCase],
    structures: list[Structure],
    options: SegmentOptions,
    progress: Optional[ProgressCallback] = None,
    engine: Optional[SAM2Engine] = None,
) -> SegmentationResult:
    """Segment `structures` (by label value) in `query` from the labeled `supports`.

    Every structure is segmented on its own; where two structures claim a voxel, the one listed first keeps it.
    Raise `errors.Cancelled` from `progress` to stop: nothing is returned and nothing was written.
    """
    progress = progress or (lambda stage, done, total: None)
    validate_options(options)
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
    qstack = qplan.stack(normalize(query, query_kind if options.preset == "auto" else options.preset))
    prepared = []
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
        image_stack = plan.stack(normalize(case.image, support_kind if options.preset == "auto" else options.preset))
        # the LPIPS backend compares slices at one scale, centred on the body (see backends/lpips_matching.py)
        box = body_box(image_stack, plan.in_plane_spacing) if options.method == "lpips" else None
        prepared.append((plan, image_stack, case, box))
    for structure in structures:  # before any encoder call: a structure no support holds cannot be segmented
        holders = [case.name for case in supports if case.mask(structure.value).any()]
        if not holders:
            where = supports[0].name if len(supports) == 1 else "every support"
            raise InputError(f"structure {structure.value} ({structure.name}) is absent from {where}")
    timings["prepare"] = time.perf_counter() - t0

    if engine is None:
        engine = make_engine(options)
    engine.reset()
    query_keys = [("query", i) for i in range(qstack.shape[0])]
    engine.add_frames(dict(zip(query_keys, qstack)))
    clock = StageClock(engine, timings)
    # every query slice is needed by every backend: encode them all up front, with a visible progress
    n = len(query_keys)
    with clock.stage("encode"):
        engine.encode(query_keys, progress=lambda d, t: progress(f"Encoding slice {d}/{t}", d, t))
    context = QueryContext(keys=query_keys, images=qstack, spacing=qplan.in_plane_spacing)
    backend = _backend(options.method)

    top = max(s.value for s in structures)
    out_stack = np.zeros(qstack.shape, dtype=np.uint16 if top < 65536 else np.int32)
    scores: list[SliceScore] = []
    forward_masks: dict[int, np.ndarray] = {}
    for structure in structures:
        support_slices = []
        for s_idx, (plan, image_stack, case, box) in enumerate(prepared):
            mask_stack = plan.stack(case.mask(structure.value))
            label_stack = np.where(mask_stack, structure.value, 0)
            if not mask_stack.any():
                if len(prepared) > 1:
                    continue  # several supports: each only needs the structures it has
                raise InputError(f"structure {structure.value} ({structure.name}) is absent from {supports[s_idx].name}")
            _warn_small_support(mask_stack, structure, case.name)
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

        result = backend.run(engine, context, support_slices, options, stage_progress, clock)
        free = out_stack == 0
        out_stack[result.masks & free] = structure.value
        for i, score, selected, matched, matched_slice in result.scores:
            scores.append(SliceScore(structure.name, structure.value, qplan.slice_index_to_array_index(i),
                                     score, selected, matched, matched_slice))
        if result.forward_masks is not None:
            forward_masks[structure.value] = qplan.unstack(result.forward_masks)

    labels = query.with_array(qplan.unstack(out_stack))
    if labels.array.max() < 256:
        labels = labels.with_array(labels.array.astype(np.uint8))
    timings["total"] = time.perf_counter() - t0
    return SegmentationResult(labels, list(structures), scores, engine.encoder_calls, timings,
                              qplan.array_axis, forward_masks)


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


def write_scores(path: str, scores: list[SliceScore]) -> None:
    """The per-slice scores as CSV (structure, slice index, score, selected, matched support), atomically."""
    import csv
    import os
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".scores-", suffix=".csv", dir=folder)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["structure", "value", "slice_index", "score", "selected", "matched_support", "matched_slice"])
            for s in scores:
                w.writerow([s.structure, s.value, s.slice_index, f"{s.score:.6f}", int(s.selected),
                            s.matched_support, s.matched_slice if s.matched_slice >= 0 else ""])
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
