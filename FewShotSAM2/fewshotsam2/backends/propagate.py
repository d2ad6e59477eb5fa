"""Plain SAM2 propagation, the baseline: [support slices with their masks, query slices...] as one video.

Several structures run in one pass (`run_many`): each is an object of the same video with its own memory bank, as
in sam2's video predictor with several object ids; predictions are batched over structures (`structure_batch`).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from fewshotsam2.options import PropagateOptions
from fewshotsam2.backends.base import (Backend, Engine, QueryContext, StageClock, StageProgress, StructureJob, StructureResult,
                   SupportSlice)
from fewshotsam2.backends.continuation import PropagationEdge
from fewshotsam2.backends.memory_bank import propagate_sequence
from fewshotsam2.backends.structure_batch import Track, propagate_tracks


class PropagateBackend(Backend):
    name = "propagate"
    options_type = PropagateOptions
    reads_query_once = True

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
        logits = []
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
                on_memory=(lambda pos, m: logits.append(m.pred_masks[0, 0].cpu().numpy())) if query.keep_logits
                else None,
            )
        # above: the same pass, further; below: the same method on the slices below, outward ([supports, q_first-1,
        # q_first-2, ...]: plain propagation only runs one way)
        edges = {"above": PropagationEdge(cond, recent, k + n - 1, +1, False, k + n),
                 "below": PropagationEdge(cond, {}, k - 1, +1, False, k)}
        return StructureResult(masks=np.stack(masks), supports=list(supports), edges=edges,
                               logits=np.stack(logits) if query.keep_logits else None)


    def run_many(self, engine: Engine, jobs: Sequence[StructureJob], options: Any, progress: StageProgress,
                 clock: StageClock) -> Iterator[tuple[StructureJob, StructureResult]]:
        """One pass over the query for all structures with the same number of support slices (one timeline);
        a structure alone in its group runs as `run` does (one structure: exactly today's result)."""
        by_shots: dict[int, list[StructureJob]] = {}
        for job in jobs:
            by_shots.setdefault(len(job.supports), []).append(job)
        if len(by_shots) == 1 and len(jobs) == 1:
            yield from super().run_many(engine, jobs, options, progress, clock)
            return
        results: dict[int, StructureResult] = {}
        for shots, group in by_shots.items():
            if len(group) == 1:
                for job, result in super().run_many(engine, group, options, progress, clock):
                    results[id(job)] = result
                continue
            results.update(self._one_pass(engine, group, shots, progress, clock))
        for job in jobs:  # in listing order (the overlap rule's tie-break)
            yield job, results.pop(id(job))

    def _one_pass(self, engine: Engine, group: Sequence[StructureJob], shots: int, progress: StageProgress,
                  clock: StageClock) -> dict[int, StructureResult]:
        names = ", ".join(job.name for job in group)
        start = min(job.first for job in group)
        stop = max(job.first + len(job.query.keys) - 1 for job in group)
        keys: dict[int, object] = {}
        for job in group:
            keys.update({job.first + i: key for i, key in enumerate(job.query.keys)})
        with clock.stage("propagate"):
            tracks = []
            for job in group:
                memory = engine.memorize([s.key for s in job.supports], [s.mask for s in job.supports])
                tracks.append(Track({j: memory.select(j) for j in range(shots)}, job.first,
                                    job.first + len(job.query.keys) - 1))
            total = stop - start + 1
            progress(f"{names}: Propagating slice 0/{total}", 0, total)
            propagate_tracks(engine, keys, tracks, shots,
                             on_slice=lambda done, total: progress(f"{names}: Propagating slice {done}/{total}",
                                                                   done, total))
        # range ends, as `run` leaves them: above, the pass goes on for this structure alone (its memory bank, its
        # FIFO as it stopped, the next positions of the pass's timeline); below, the same method on the slices
        # below, outward ([supports, first - 1, first - 2, ...])
        num_frames = shots + stop - start + 1
        return {id(job): StructureResult(
                    np.stack(t.masks), list(job.supports),
                    edges={"above": PropagationEdge(t.cond, t.recent, shots + t.last - start, +1, False, num_frames),
                           "below": PropagationEdge(t.cond, {}, shots - 1, +1, False, shots)},
                    logits=np.stack(t.logits) if job.query.keep_logits else None)
                for job, t in zip(group, tracks)}
