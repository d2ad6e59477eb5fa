"""What every backend receives and returns."""

from __future__ import annotations

import abc
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Hashable, Iterator, Optional, Protocol, Sequence

import numpy as np

from fewshotsam2.model.engine import Memory, Prediction
from fewshotsam2.run.overlap import dice  # noqa: F401  (backends score with the package's one Dice)
from fewshotsam2.run.results import LpipsMatch

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
    keep_logits: bool = False  # return each slice's low-resolution logits (overlaps decided by logits)


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
    # per range end ("below": before slice 0 of the range, "above": after its last), how to go on predicting past
    # it (backends/continuation.py); a backend that cannot leaves it out
    edges: dict = field(default_factory=dict)
    # with QueryContext.keep_logits: per slice the low-resolution logits (S/4, S/4) float32 the mask comes from
    logits: Optional[np.ndarray] = None


@dataclass
class StructureJob:
    """One structure of a run: its support slices and its range of the query, plus what the pipeline's feature
    cache needs to know (which of its query slices no later structure reads, which a later one reads again)."""

    value: int
    name: str
    supports: list[SupportSlice]
    query: QueryContext  # the slices of the structure's range
    first: int  # stack index of query.keys[0]
    last_use: list = field(default_factory=list)  # query keys read by no later structure
    read_again: list = field(default_factory=list)  # query keys a later structure reads


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

    def run_many(self, engine: Engine, jobs: Sequence[StructureJob], options: Any, progress: StageProgress,
                 clock: "StageClock") -> Iterator[tuple[StructureJob, StructureResult]]:
        """Every structure, in listing order: one `run` each (a backend with a batched pass overrides this).
        `progress` gets the structure's name before the stage. Yields (job, result) as each is done."""
        for job in jobs:
            engine.keep_if_room(job.read_again)  # kept while the feature budget allows, else encoded again
            if self.reads_query_once:
                engine.use_once(job.last_use)  # dropped right after their one read
            result = self.run(engine, job.query, job.supports, options, _named(progress, job.name), clock)
            engine.release(job.last_use)
            yield job, result


def _named(progress: StageProgress, name: str) -> StageProgress:
    return lambda stage, done, total: progress(f"{name}: {stage}", done, total)


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
