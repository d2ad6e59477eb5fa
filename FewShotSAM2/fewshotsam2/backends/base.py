"""What every backend receives and returns."""

from __future__ import annotations

import abc
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Hashable, Iterator, Optional, Protocol, Sequence

import numpy as np

from ..engine import Memory, Prediction
from ..overlap import dice  # noqa: F401  (backends score with the package's one Dice)
from ..results import LpipsMatch

StageProgress = Callable[[str, int, int], None]


class Engine(Protocol):
    """The part of `SAM2Engine` the backends use (a stand-in predictor implements the same)."""

    batch_size: int
    encoder_calls: int
    memory_reach: int  # how many frames back SAM2 reads non-conditioning memories (see SAM2Engine.memory_reach)

    def add_frames(self, frames) -> None: ...
    def memorize(self, keys: Sequence[Hashable], masks: Sequence[np.ndarray]) -> Memory: ...
    def predict(self, keys, frame_idx, cond, recent=None, num_frames=None, reverse=False) -> Prediction: ...
    def predict_batched(self, keys, frame_idx, cond, num_frames=None) -> Prediction: ...
    # the feature cache between passes (see SAM2Engine.feature_budget)
    def release(self, keys) -> None: ...
    def keep_if_room(self, keys) -> None: ...
    def over_feature_budget(self) -> bool: ...


@dataclass
class SupportSlice:
    """One labeled support slice, already registered with the engine under `key`."""

    key: Hashable
    mask: np.ndarray  # bool (h, w)
    support: int  # which support volume
    stack_index: int  # position in that support's slice stack
    image: Optional[np.ndarray] = None  # float [0, 1] (h, w); needed by the LPIPS backend
    array_index: int = -1  # the same slice as an index along the support volume's own array axis
    spacing: tuple = (1.0, 1.0)  # in-plane (row, column) mm
    body_box: Optional[tuple] = None  # LPIPS backend: (centre row, centre column, extent mm) of the support's body


@dataclass
class QueryContext:
    """The query's slices for one run, shared by every structure."""

    keys: list  # engine frame keys, one per slice of the query's slice stack
    images: np.ndarray  # float [0, 1] (n, h, w)
    spacing: tuple = (1.0, 1.0)  # in-plane (row, column) mm
    cache: dict = field(default_factory=dict)  # per-run results reused across structures (the query's body box)


@dataclass
class StructureResult:
    """What a backend returns for one structure, in the query's slice-stack order."""

    masks: np.ndarray  # bool (n_slices, h, w)
    supports: list[SupportSlice]  # the support slices the backend used
    scores: Optional[np.ndarray] = None  # float per slice; None when the method scores nothing (propagate)
    higher_is_better: bool = True  # reverse: pi (a Dice); lpips: a distance (lower = closer)
    selected: list[int] = field(default_factory=list)  # reverse: the conditional slices, best first
    matches: Optional[list[LpipsMatch]] = None  # lpips: per slice, the support image it matched
    forward_masks: Optional[np.ndarray] = None  # reverse: p_i for every slice


class Backend(abc.ABC):
    """One few-shot method: segments one structure in the query from labeled support slices.

    The pipeline has prepared everything: the query's slices are registered with (and encoded by) the engine,
    the support slices are registered under their keys, and `options` is this method's validated options
    object (`options_type`).
    """

    name: ClassVar[str]
    options_type: ClassVar[type]
    # what the pipeline prepares for it: the body boxes of the query and the supports (LPIPS at one field of view)
    needs_body_box: ClassVar[bool] = False
    # whether it reads each query slice's features once per structure (then they are dropped right after use)
    reads_query_once: ClassVar[bool] = True

    @abc.abstractmethod
    def run(
        self,
        engine: Engine,
        query: QueryContext,
        supports: Sequence[SupportSlice],
        options: Any,
        progress: StageProgress,
        clock: "StageClock",
    ) -> StructureResult: ...


class StageClock:
    """Wall time per stage, minus the image encoding done inside it (reported as its own stage)."""

    def __init__(self, engine: Engine, timings: dict[str, float]) -> None:
        self.engine = engine
        self.timings = timings

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        enc0 = getattr(self.engine, "encode_seconds", 0.0)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            encoded = getattr(self.engine, "encode_seconds", 0.0) - enc0
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0 - encoded
            self.timings["encode"] = self.timings.get("encode", 0.0) + encoded
