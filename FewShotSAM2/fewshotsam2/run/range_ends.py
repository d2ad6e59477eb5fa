"""The ends of a structure's slice range: nothing is cut off there without a word.

After a backend has segmented a structure on its range, each range end that is not a volume end is checked:

* the prediction is empty on that end slice: the structure ended inside the range; nothing to do;
* it is present and the range was estimated (`--slice-range auto`): prediction goes on past the end, a slice at a
  time with the backend's own memory (backends/continuation.py), until SAM2 predicts the structure absent (object
  score <= 0 or an empty mask) or the volume ends; the range grows by the slices predicted, and a warning names
  the structure, the end slice and where the structure ended;
* it is present and the user gave the range (FIRST:LAST): the range is kept and a warning names the structure and
  the slice, so the user can widen it.

What happened is kept in a `RangeReport` per structure (SegmentationResult.range_reports): the command line prints
it, the scores CSV and `batch`'s summary hold it, the Slicer module shows it in its status line.
"""

from __future__ import annotations

import warnings
from typing import Callable, Hashable, Optional, Sequence

import numpy as np

from fewshotsam2.backends.base import StructureResult
from fewshotsam2.backends.continuation import continue_past
from fewshotsam2.run.results import RangeEnd, RangeReport


class _Outward:
    """Slices `indices` of a (lazy) stack, read when sliced: `[i : j]` -> (j - i, h, w)."""

    def __init__(self, stack, indices: Sequence[int]) -> None:
        self.stack, self.indices = stack, list(indices)

    def __getitem__(self, item: slice) -> np.ndarray:
        return np.stack([np.asarray(self.stack[i]) for i in self.indices[item]])


def extend_past_range_ends(engine, result: StructureResult, keys: Sequence[Hashable], stack, first: int, last: int,
                           estimated: bool, name: str, to_array: Callable[[int], int],
                           progress: Callable[[str, int, int], None]) -> tuple[int, int, np.ndarray, list[RangeEnd]]:
    """Check both ends of the stack range `first..last` of `result`; continue past an estimated end the structure
    still touches. Returns the stack range segmented now, its masks (the range's, with the continued slices on
    either side) and one `RangeEnd` per end the structure touched. `to_array` maps a stack index to an array index
    (for the messages: users see array indices)."""
    n = len(keys)
    masks = result.masks
    below: list[np.ndarray] = []
    above: list[np.ndarray] = []
    ends: list[RangeEnd] = []
    for side, end, beyond in (("below", first, range(first - 1, -1, -1)), ("above", last, range(last + 1, n))):
        end_mask = masks[0] if side == "below" else masks[-1]
        if not len(beyond) or not end_mask.any():
            continue  # a volume end, or the structure ended inside the range
        edge = result.edges.get(side)
        if not estimated or edge is None:
            ends.append(RangeEnd(side, to_array(end), None, None, False))
            warnings.warn(f"{name}: {ends[-1].describe()}", stacklevel=3)
            continue
        outward = list(beyond)
        label = f"{name}: past the range end (slice {to_array(end)})"
        progress(f"{label} 0/{len(outward)}", 0, len(outward))
        found = continue_past(engine, edge, [keys[i] for i in outward], _Outward(stack, outward),
                              lambda done: progress(f"{label} {done}/{len(outward)}", done, len(outward)))
        last_present = outward[found.reached - 1] if found.reached else None
        record = RangeEnd(side, to_array(end), None if last_present is None else to_array(last_present),
                          to_array(outward[len(found.masks) - 1]), found.ended)
        ends.append(record)
        warnings.warn(f"{name}: {record.describe()}", stacklevel=3)
        if side == "below":
            below = found.masks[::-1]
        else:
            above = found.masks
    if below or above:
        masks = np.concatenate(([np.stack(below)] if below else []) + [masks] + ([np.stack(above)] if above else []))
    return first - len(below), last + len(above), masks, ends


def range_report(name: str, value: int, kind: str, estimated: Optional[tuple[int, int]],
                 segmented: Optional[tuple[int, int]], ends: list[RangeEnd]) -> RangeReport:
    """One structure's report (array indices)."""
    return RangeReport(name, value, kind, estimated, segmented, tuple(ends))
