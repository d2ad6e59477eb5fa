"""Plain SAM2 propagation, the baseline: [support slices with their masks, query slices...] as one video."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..options import PropagateOptions
from .base import Backend, Engine, QueryContext, StageClock, StageProgress, StructureResult, SupportSlice
from .continuation import PropagationEdge
from .memory_bank import propagate_sequence


class PropagateBackend(Backend):
    name = "propagate"
    options_type = PropagateOptions

    def run(
        self,
        engine: Engine,
        query: QueryContext,
        supports: Sequence[SupportSlice],
        options: PropagateOptions,
        progress: StageProgress,
        clock: StageClock,
    ) -> StructureResult:
        query_keys = query.keys
        k = len(supports)
        n = len(query_keys)
        with clock.stage("propagate"):
            memory = engine.memorize([s.key for s in supports], [s.mask for s in supports])
            # supports are frames 0..k-1 (conditioning), query slices follow as frames k..k+n-1
            cond = {j: memory.select(j) for j in range(k)}
            progress(f"Propagating slice 0/{n}", 0, n)  # the bar shows before the first slice is encoded
            recent: dict = {}
            masks = propagate_sequence(
                engine,
                query_keys,
                positions=list(range(k, k + n)),
                cond=cond,
                num_frames=k + n,
                recent=recent,
                on_slice=lambda done, total: progress(f"Propagating slice {done}/{total}", done, total),
            )
        # above: the same pass, further; below: the same method on the slices below, outward ([supports, q_first-1,
        # q_first-2, ...]: plain propagation only runs one way)
        edges = {"above": PropagationEdge(cond, recent, k + n - 1, +1, False, k + n),
                 "below": PropagationEdge(cond, {}, k - 1, +1, False, k)}
        return StructureResult(masks=np.stack(masks), supports=list(supports), edges=edges)
