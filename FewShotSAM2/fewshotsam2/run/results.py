"""What a run returns: the label map plus, per query slice, what the method decided and on which support slices.

Slice indices in these types are array indices along `SegmentationResult.slice_axis` of the query (or of the
support volume, for support slices and matches) unless a name says `stack_index`: the position in the
canonical slice stack of `slices.SlicePlan` (see `query_plan` and `support_plans`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:
    from fewshotsam2.model.resources import ResourceEstimate
    from fewshotsam2.slicing.slices import SlicePlan
    from fewshotsam2.io.volume import Structure, Volume


@dataclass(frozen=True)
class LpipsMatch:
    """The augmented support image that matched a query slice best (LPIPS matching)."""

    support: int  # which support volume (index into the supports given to `segment`)
    stack_index: int  # the support slice's position in that support's slice stack
    array_index: int  # the same slice along the support volume's own array axis
    augmentation: int  # 0: the support slice itself; n > 0: its n-th augmented copy

    def __str__(self) -> str:
        aug = "original" if self.augmentation == 0 else f"aug{self.augmentation}"
        return f"support{self.support}:slice{self.stack_index}:{aug}"


@dataclass(frozen=True)
class SliceScore:
    """Per query slice and structure: the method's score for it and what the method decided.

    reverse: score = pi, the mean Dice of the slice's prediction predicting the supports back (higher is
    better); `selected` marks the conditional slices. lpips: score = LPIPS distance to the matched support
    image (lower is better); `match` says which image that was.
    """

    structure: str
    value: int
    slice_index: int  # array index along SegmentationResult.slice_axis
    stack_index: int  # position in the query's canonical slice stack
    score: float
    higher_is_better: bool
    selected: bool = False
    match: Optional[LpipsMatch] = None


@dataclass(frozen=True)
class UsedSupportSlice:
    """A labeled support slice that prompted SAM2 for one structure."""

    value: int  # the structure's label value
    support: int  # which support volume
    stack_index: int  # position in that support's slice stack
    array_index: int  # along that support volume's own array axis (its plan's `array_axis`)


@dataclass(frozen=True)
class RangeEnd:
    """An end of a structure's slice range (not a volume end) on which its prediction was present (array indices)."""

    side: str  # "below" / "above": the end before the range's first / after its last slice in the canonical stack
    end: int  # the range's end slice
    last_present: Optional[int]  # continued: the farthest slice beyond `end` holding the structure (None: none)
    last_predicted: Optional[int]  # continued: the farthest slice predicted (None: not continued, a user's range)
    ended: bool  # continued: the structure ended (an empty prediction) before the volume did

    @property
    def continued(self) -> bool:
        return self.last_predicted is not None

    def describe(self) -> str:
        text = f"present on slice {self.end}, an end of its "
        if not self.continued:
            return text + "slice range (given by the user); it may go on beyond: widen --slice-range or use off"
        text += "estimated slice range; prediction continued past it: "
        if self.last_present is None:
            return text + f"it ends there (slice {self.last_predicted} predicted empty)"
        if self.ended:
            return text + f"present up to slice {self.last_present} (slice {self.last_predicted} predicted empty)"
        return text + f"present up to slice {self.last_present}, the volume's end"


@dataclass(frozen=True)
class RangeReport:
    """One structure's slice range: what was estimated or given, what was segmented, and the ends it touched."""

    structure: str
    value: int
    kind: str  # "auto" (estimated), "off" (every slice) or "given" (FIRST:LAST)
    planned: Optional[tuple[int, int]]  # the range before any continuation (None: an empty estimate)
    segmented: Optional[tuple[int, int]]  # the range segmented (None: not segmented)
    ends: tuple[RangeEnd, ...] = ()

    @property
    def touched(self) -> bool:
        return bool(self.ends)

    def summary(self) -> str:
        """One short line: 'liver 12-47 (auto 12-40; continued to 47)'."""
        if self.segmented is None:
            return f"{self.structure}: not segmented (empty estimated range)"
        text = f"{self.structure} {self.segmented[0]}-{self.segmented[1]} ({self.kind}"
        if self.planned is not None and self.planned != self.segmented:
            text += f" {self.planned[0]}-{self.planned[1]}"
        for e in self.ends:
            if not e.continued:
                text += f"; touches its end {e.end}"
            elif e.last_present is None:
                text += f"; touched {e.end}, ends there"
            else:
                text += f"; continued to {e.last_present}" + ("" if e.ended else " (volume end)")
        return text + ")"

    def to_json(self) -> dict:
        return {"structure": self.structure, "value": self.value, "kind": self.kind,
                "planned": None if self.planned is None else list(self.planned),
                "segmented": None if self.segmented is None else list(self.segmented),
                "ends": [{"end": e.end, "continued": e.continued, "last_present": e.last_present,
                          "last_predicted": e.last_predicted, "ended": e.ended} for e in self.ends],
                "summary": self.summary()}


@dataclass
class SegmentationResult:
    labels: "Volume"  # multi-label map on the query's grid; voxel values = Structure.value
    structures: list["Structure"]
    scores: list[SliceScore] = field(default_factory=list)  # empty for propagate (it scores nothing)
    encoder_calls: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    slice_axis: int = 0  # the array axis of `labels.array` the slices were taken along
    # reverse: the forward predictions p_i per structure value, bool arrays shaped like labels.array
    forward_masks: dict[int, np.ndarray] = field(default_factory=dict)
    support_slices: list[UsedSupportSlice] = field(default_factory=list)
    query_plan: Optional["SlicePlan"] = None  # how the query was sliced
    support_plans: list["SlicePlan"] = field(default_factory=list)  # how each support was sliced
    # per structure value: the inclusive range of array indices along `slice_axis` that was segmented (None: the
    # estimated range was empty and the structure was left out); outside it the labels are background
    slice_ranges: dict[int, Optional[tuple[int, int]]] = field(default_factory=dict)
    estimate: Optional["ResourceEstimate"] = None  # peak memory and time estimated before the run
    # per structure value: its range as planned and as segmented, and the range ends its prediction touched
    range_reports: dict[int, RangeReport] = field(default_factory=dict)

    def voxels(self) -> dict[str, int]:
        """Per structure name, its voxel count, each from its own layer (`--overlap allow` keeps overlaps)."""
        from fewshotsam2.io.volume import structure_mask  # results.py is imported without SimpleITK

        return {s.name: int(structure_mask(self.labels, s).sum()) for s in self.structures}

    def support_slices_of(self, value: int, support: Optional[int] = None) -> list[UsedSupportSlice]:
        """The support slices used for structure `value` (of one support volume, if given)."""
        return [s for s in self.support_slices if s.value == value and (support is None or s.support == support)]
