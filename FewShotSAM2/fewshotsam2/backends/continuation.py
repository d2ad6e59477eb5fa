"""Past a range end: a backend's own prediction, a slice further at a time, until the structure has ended.

A slice range (`--slice-range auto`) is an estimate. When a structure's prediction is still present on a range end
that is not a volume end, the structure may go on beyond it (a lesion lower in the query than in the support). A
backend therefore leaves, per range end, an `Edge`: what its pass had in memory when it stopped there. Continuing
is then nothing new for SAM2:

* `PropagationEdge` (propagate, reverse): more steps of the same pass -- the same conditioning memories, the
  pass's FIFO of recent predictions, the next timeline positions. sam2's own `SAM2VideoPredictor` on the video
  extended by those slices gives the same logits (`Testing/backends/test_range_continuation.py`).
* `SliceEdge` (lpips): every query slice is predicted on its own, so a slice beyond the end is predicted exactly
  as it would have been inside the range.

Each further slice is predicted; the first empty prediction ends the structure. Empty means what SAM2 says: its
object score <= 0 (SAM2 then sets every mask logit to -1024) or no pixel with a logit above 0.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional, Sequence

import numpy as np

from fewshotsam2.model.engine import Memory
from fewshotsam2.backends.base import Engine
from fewshotsam2.backends.memory_bank import propagate_sequence

OnSlice = Callable[[int], None]  # called with the number of slices predicted so far


class Edge(abc.ABC):
    """How to predict the slices beyond one end of the range, outward from it."""

    @abc.abstractmethod
    def predict(self, engine: Engine, keys: Sequence[Hashable], images: np.ndarray, remaining: int) -> np.ndarray:
        """The mask of the next slice outward (`keys[0]`, image `images[0]`); `remaining` slices (this one
        included) lie between the range end and the volume end on this side."""


@dataclass
class PropagationEdge(Edge):
    """A propagation pass stopped at the range end: continue it slice by slice.

    `position` is the timeline position of the last slice the pass predicted (or would have: the range end);
    the next one is `position + step`. `num_frames` is the pass's timeline length; SAM2 reads it only to bound
    how far back object pointers go (`min(num_frames, 16)`), and the continued video is longer by the slices
    beyond the end. `below`: memories placed just before the lowest position the continuation can reach (the
    reverse backend's supports, kept with `keep_supports`, "just before the query volume").
    """

    cond: dict[int, Memory]
    recent: dict[int, Memory]
    position: int
    step: int
    reverse: bool
    num_frames: int
    below: list[Memory] = field(default_factory=list)
    _cond: Optional[dict] = None

    def predict(self, engine: Engine, keys: Sequence[Hashable], images: np.ndarray, remaining: int) -> np.ndarray:
        if self._cond is None:
            # the continuation reaches position + step * remaining at most; `below` goes just beyond the lowest
            lowest = min([self.position + self.step * remaining, self.position] + list(self.cond) + list(self.recent))
            cond = dict(self.cond)
            for j, memory in enumerate(self.below):
                cond[lowest - 1 - j] = memory
            # SAM2 stops reading object pointers at a negative frame index: the whole timeline moves up so that
            # every position is >= 0 (SAM2 reads positions only as differences otherwise)
            shift = max(0, -min([lowest] + list(cond)))
            self._cond = {t + shift: m for t, m in cond.items()}
            self._recent = {t + shift: m for t, m in self.recent.items()}
            self._position = self.position + shift
            highest = max([self._position + self.step * remaining, self._position] + list(self._cond))
            self._num_frames = max(self.num_frames + remaining, highest + 1)
        self._position += self.step
        (mask,) = propagate_sequence(engine, [keys[0]], [self._position], self._cond, self._num_frames,
                                     self.reverse, self._recent)
        return mask


@dataclass
class SliceEdge(Edge):
    """A method that predicts each slice on its own: `segment(engine, keys, images)` -> masks."""

    segment: Callable[[Engine, Sequence[Hashable], np.ndarray], list]

    def predict(self, engine: Engine, keys: Sequence[Hashable], images: np.ndarray, remaining: int) -> np.ndarray:
        return np.asarray(self.segment(engine, [keys[0]], images[:1])[0], bool)


@dataclass
class Continued:
    """What continuing past one range end found: masks of the slices predicted beyond it, outward."""

    masks: list[np.ndarray]
    ended: bool  # True: the last mask is empty (the structure ended); False: the volume ended first

    @property
    def reached(self) -> int:
        """How many slices beyond the range end hold the structure."""
        return len(self.masks) - (1 if self.ended else 0)


def continue_past(engine: Engine, edge: Edge, keys: Sequence[Hashable], images, on_slice: Optional[OnSlice] = None,
                  ) -> Continued:
    """Predict `keys` (the slices beyond the range end, outward, up to the volume end) one at a time with `edge`,
    until a prediction is empty. `images[i]` is the slice of `keys[i]` (read only by a `SliceEdge`)."""
    masks: list[np.ndarray] = []
    for i in range(len(keys)):
        mask = edge.predict(engine, keys[i:], images[i : i + 1] if isinstance(edge, SliceEdge) else None,
                            len(keys) - i)
        masks.append(mask)
        if on_slice is not None:
            on_slice(i + 1)
        if not mask.any():
            return Continued(masks, True)
    return Continued(masks, False)
